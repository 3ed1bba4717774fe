"""Shared fixtures: a synthetic dataset written once per session, and a config factory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from steadyvla.config import build_config  # noqa: E402
from helpers import MAX_STEPS, checkpoint_tensors, finetune_args, metrics_lines, resume_values, run_cli, run_dir_of  # noqa: E402
from synthetic import write_synthetic_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAMA_TOKENIZER_DIR = REPO.parent / "shared" / "reference" / "llama2-tokenizer"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """data_root_dir holding the synthetic dataset `synth`."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(root / "synth")
    return root


@pytest.fixture
def make_config(synthetic_root, tmp_path):
    """Build a small, fast RunConfig on the synthetic dataset; keyword args override."""

    def factory(**overrides):
        values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(tmp_path / "runs"),
                      batch_size=4, max_steps=6, save_steps=3, lora_rank=4, learning_rate=3e-3,
                      progress_bar=False, seed=3)
        values.update(overrides)
        return build_config(values)

    return factory


@pytest.fixture(scope="session")
def resume_reference(synthetic_root, tmp_path_factory):
    """Metrics and final tensors of the uninterrupted `resume_values` run (computed once per session)."""
    values = resume_values(synthetic_root, tmp_path_factory.mktemp("ref"))
    done = run_cli(finetune_args(values))
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = run_dir_of(values)
    return metrics_lines(run_dir), checkpoint_tensors(run_dir / "checkpoints" / f"step-{MAX_STEPS:06d}")
