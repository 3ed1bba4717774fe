"""`steadyvla ckpt ls|verify RUN_DIR`: what is on disk and whether it can be resumed."""

from __future__ import annotations

import json
from pathlib import Path

from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, TRAINER_STATE_JSON
from steadyvla.checkpoint.manager import CheckpointError, CheckpointManager


def _manager(run_dir: Path) -> CheckpointManager:
    if not (run_dir / CHECKPOINTS_DIR).is_dir():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINTS_DIR}/ directory (expected <run_root_dir>/<run_id>)")
    return CheckpointManager(run_dir, log=lambda _msg: None)


def _summary(ckpt: Path) -> str:
    try:
        state = json.loads((ckpt / TRAINER_STATE_JSON).read_text())
    except (OSError, ValueError):
        return ""
    pos = state.get("data_position", {})
    return f"epoch {pos.get('epoch', '?')} sample {pos.get('position', '?')}, world size {state.get('world_size', '?')}"


def ckpt_ls(run_dir: Path) -> int:
    """Print one line per checkpoint (fast: sizes only, no hashing)."""
    infos = _manager(run_dir).list_checkpoints(deep=False)
    if not infos:
        print(f"{run_dir}: no checkpoints")
        return 0
    for info in infos:
        mark = "latest" if info.is_latest else ""
        status = "complete" if info.complete else "INCOMPLETE: " + "; ".join(info.problems)
        print(f"{info.name:<40} step {info.step:>8}  {status:<10} {mark:<6} {_summary(info.path)}")
    return 0


def ckpt_verify(run_dir: Path) -> int:
    """Hash every file against its manifest; exit 1 if any checkpoint fails or none is usable."""
    manager = _manager(run_dir)
    infos = manager.list_checkpoints(deep=True)
    for info in infos:
        verdict = "ok" if info.complete else "CORRUPT/INCOMPLETE"
        print(f"{info.name}: {verdict}")
        for problem in info.problems:
            print(f"    {problem}")
    chosen = manager.resolve_latest()
    if chosen is None:
        print("no usable checkpoint: resume: auto would refuse to start (it never overwrites checkpoints it "
              "cannot verify); `resume: never` with another run_id starts over" if infos else
              "no checkpoint: resume: auto would start fresh")
        return 1
    print(f"resume: auto would continue from {chosen}")
    return 0 if all(i.complete for i in infos) else 1
