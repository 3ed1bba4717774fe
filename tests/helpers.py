"""Helpers shared by the end-to-end tests: run the CLI, read checkpoints, hash trees."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from steadyvla.checkpoint.layout import ADAPTER_WEIGHTS, METRICS_JSONL, TRAINER_STATE_TENSORS

REPO = Path(__file__).resolve().parents[1]


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
    return [json.loads(line) for line in (run_dir / METRICS_JSONL).read_text().splitlines()]


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
