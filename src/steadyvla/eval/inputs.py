"""The files `--checkpoint` names, checked without importing the model stack (so a bad flag
fails in a fraction of a second): the checkpoint dir and its run's dataset statistics."""

from __future__ import annotations

from pathlib import Path

from steadyvla.checkpoint.layout import DATASET_STATISTICS
from steadyvla.checkpoint.manager import CheckpointManager
from steadyvla.config import ConfigError
from steadyvla.data.stats import load_dataset_statistics


def resolve_checkpoint(checkpoint: Path) -> Path:
    """The checkpoint dir named by `--checkpoint` (a run dir -> its newest complete checkpoint)."""
    try:
        return CheckpointManager(Path(checkpoint), log=lambda _m: None).resolve_explicit(Path(checkpoint))
    except Exception as err:  # CheckpointError or an unreadable dir: one line for the user
        raise ConfigError(f"--checkpoint: {err}") from err


def run_statistics(ckpt: Path) -> tuple[Path, dict]:
    """The run dir of `ckpt` and its dataset_statistics.json (required to un-normalise actions)."""
    run_dir = ckpt.parent.parent
    path = run_dir / DATASET_STATISTICS
    if not path.is_file():
        raise ConfigError(f"--checkpoint: {path} is missing; the run dir of {ckpt} must hold the "
                          f"{DATASET_STATISTICS} its training wrote (actions are un-normalised with it)")
    try:
        return run_dir, load_dataset_statistics(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--checkpoint: {path}: {err}") from err
