"""Helpers shared by the end-to-end tests: run the CLI, read checkpoints, hash trees."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from steadyvla.checkpoint.layout import ADAPTER_WEIGHTS, METRICS_JSONL, TRAINER_STATE_TENSORS
from steadyvla.memory_runtime import MEMORY_METRIC_KEYS
from steadyvla.train.metrics import TIMING_METRIC_KEYS

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
MAX_STEPS = 8  # of the small resume runs below


def cli_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "steadyvla.cli", *args]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra or {})
    return env


def run_cli(args: list[str], extra_env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(args), env=cli_env(extra_env), capture_output=True, text=True, timeout=timeout)


def config_args(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return out


def metrics_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl records without the memory and timing keys: RSS, GPU peaks and wall times are not
    deterministic, every other key is compared bit for bit between runs (tests of those keys read the
    file itself)."""
    rows = [json.loads(line) for line in (run_dir / METRICS_JSONL).read_text().splitlines()]
    skipped = (*MEMORY_METRIC_KEYS, *TIMING_METRIC_KEYS)
    return [{k: v for k, v in row.items() if k not in skipped} for row in rows]


def checkpoint_tensors(ckpt: Path) -> dict:
    """Adapter + optimizer tensors (RNG included) of one checkpoint, keyed by file."""
    tensors = {f"adapter/{k}": v for k, v in load_file(str(ckpt / ADAPTER_WEIGHTS)).items()}
    tensors.update({f"state/{k}": v for k, v in load_file(str(ckpt / TRAINER_STATE_TENSORS)).items()})
    return tensors


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert a[key].view(-1).view(dtype=__import__("torch").uint8).equal(
            b[key].view(-1).view(dtype=__import__("torch").uint8)), f"{key} differs"


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to prove a failed start touched nothing)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def resume_values(synthetic_root: Path, run_root: Path, **extra) -> dict:
    """Config of the small, fully random (augmentation, dropout, cosine warmup) resume test run."""
    values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(run_root),
                  run_id="exact", batch_size=2, grad_accumulation_steps=2, max_steps=MAX_STEPS, save_steps=2,
                  lora_rank=4, learning_rate=0.003, lr_scheduler="cosine", lr_warmup_steps=2,
                  min_learning_rate=0.0003, image_aug=True, lora_dropout=0.1, progress_bar=False, seed=5)
    values.update(extra)
    return values


def finetune_args(values: dict) -> list[str]:
    """`steadyvla finetune` arguments for a config dict (on top of configs/demo.yaml)."""
    return ["finetune", "--config", str(DEMO_CONFIG), *config_args(values)]


def run_dir_of(values: dict) -> Path:
    from steadyvla.config import build_config
    from steadyvla.train.run_dir import run_dir_for

    return run_dir_for(build_config(values))


def wait_for_metrics(run_dir: Path, n_lines: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Block until the run's metrics.jsonl has `n_lines` lines (fails if `proc` exits first)."""
    metrics = run_dir / METRICS_JSONL
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n_lines:
            return
        assert proc.poll() is None, f"run ended with {proc.returncode} before {n_lines} metrics lines"
        time.sleep(0.01)
    raise AssertionError(f"no {n_lines} metrics lines within {timeout}s")


COMPARED_KEYS = ("step", "train_loss", "action_accuracy", "l1_loss", "lr", "epoch")


def assert_same_as_reference(values: dict, reference: tuple[list[dict], dict]) -> None:
    """The run of `values` logged steps 1..MAX_STEPS exactly as the uninterrupted reference run and ended
    with bitwise the same adapter, optimizer and RNG tensors."""
    ref_rows, ref_tensors = reference
    run_dir = run_dir_of(values)
    rows = metrics_lines(run_dir)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    for got, want in zip(rows, ref_rows):
        assert {k: got[k] for k in COMPARED_KEYS} == {k: want[k] for k in COMPARED_KEYS}
    assert_bitwise_equal(checkpoint_tensors(run_dir / "checkpoints" / f"step-{MAX_STEPS:06d}"), ref_tensors)


def tiny_lora_run(root: Path, synthetic_root: Path) -> Path:
    """A finished 2-step LoRA run of the tiny preset on the synthetic dataset (32 px demo images, on
    this machine's device) under `root`; its run dir (checkpoint at step 2)."""
    from steadyvla.config import build_config
    from steadyvla.train.finetune import finetune

    cfg = build_config(dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(root),
                            batch_size=4, max_steps=2, save_steps=2, lora_rank=4, learning_rate=3e-2,
                            progress_bar=False, seed=3, demo_image_size=32))
    finetune(cfg, log=lambda _m: None)
    return next(root.iterdir())
