"""Decide what a start resumes from, and refuse resumes that would silently change the run.

Checked before anything is written, so a refused start leaves every existing checkpoint as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from steadyvla.checkpoint.layout import TRAINER_STATE_JSON
from steadyvla.checkpoint.legacy import (
    LEGACY_TRAINER_STATE, check_adapter_config, is_legacy_adapter_dir, read_adapter_weights,
)
from steadyvla.checkpoint.manager import CheckpointError, CheckpointManager
from steadyvla.config import RESUME_CRITICAL_FIELDS, ConfigError, RunConfig


@dataclass(frozen=True)
class ResumePlan:
    """Where training continues from (None = fresh start) and the state stored there."""

    checkpoint: Path | None
    state: dict[str, Any]
    adapter_weights: Path | None = None  # an old PEFT adapter dir: LoRA weights only, the rest fresh

    @property
    def step(self) -> int:
        return int(self.state.get("global_step", 0)) if self.checkpoint else 0


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE_JSON).read_text())


def plan_resume(cfg: RunConfig, run_dir: Path, log: Callable[[str], None]) -> ResumePlan:
    """Apply `resume` / `resume_adapter_dir` / `resume_global_step` (DESIGN.md §5)."""
    explicit = cfg.resume_adapter_dir or (cfg.resume if cfg.resume not in ("auto", "never") else None)
    manager = CheckpointManager(run_dir, log=log)
    if cfg.resume_adapter_dir and is_legacy_adapter_dir(Path(cfg.resume_adapter_dir)):
        existing = [c for c in manager.list_checkpoints() if c.complete] if run_dir.exists() else []
        if existing:
            raise ConfigError(
                f"config field `resume_adapter_dir`: {cfg.resume_adapter_dir} is an old PEFT adapter (a fresh start), "
                f"but {run_dir} already holds checkpoints up to step {existing[-1].step}; drop resume_adapter_dir to "
                "continue that run, or pick another run_id / run_id_note"
            )
        return _legacy_adapter_plan(cfg, Path(cfg.resume_adapter_dir), log)
    if explicit:
        try:
            ckpt = manager.resolve_explicit(Path(explicit))
        except CheckpointError as err:
            field = "resume_adapter_dir" if cfg.resume_adapter_dir else "resume"
            raise ConfigError(f"config field `{field}`: {err}") from err
        log(f"resuming from {ckpt} (named explicitly)")
    elif cfg.resume == "never":
        existing = [c for c in manager.list_checkpoints() if c.complete] if run_dir.exists() else []
        if existing:
            raise ConfigError(
                f"config field `resume`: never, but {run_dir} already holds checkpoints up to step "
                f"{existing[-1].step}; pick another run_id / run_id_note, or delete that directory"
            )
        log("resume: never — starting fresh")
        return ResumePlan(None, {})
    else:
        ckpt = manager.resolve_latest() if run_dir.exists() else None
        if ckpt is None:
            log(f"resume: auto — no complete checkpoint in {run_dir}; starting fresh")
            return ResumePlan(None, {})
        log(f"resume: auto — continuing from {ckpt}")
    plan = ResumePlan(ckpt, read_trainer_state(ckpt))
    check_resume_step(cfg, plan)
    return plan


def _legacy_adapter_plan(cfg: RunConfig, adapter_dir: Path, log: Callable[[str], None]) -> ResumePlan:
    check_adapter_config(adapter_dir, cfg)  # refused here, before anything is written
    read_adapter_weights(adapter_dir)
    log(f"resume_adapter_dir {adapter_dir} is a PEFT adapter from an older script, not a steadyvla checkpoint: "
        "its LoRA weights are loaded; the optimizer, the LR schedule, the step count and the data position "
        "start fresh")
    if (adapter_dir / LEGACY_TRAINER_STATE).exists():
        log(f"{adapter_dir / LEGACY_TRAINER_STATE} is not read here; `steadyvla ckpt import-legacy` converts it "
            "into a checkpoint that restores the optimizer and scheduler too")
    return ResumePlan(None, {}, adapter_weights=adapter_dir)


def check_resume_step(cfg: RunConfig, plan: ResumePlan) -> None:
    """`resume_global_step`: 0/null -> the stored step; another value must match (or be overridden)."""
    wanted = cfg.resume_global_step
    if wanted in (None, 0) or wanted == plan.step:
        return
    if cfg.resume_step_override:
        return
    raise ConfigError(
        f"config field `resume_global_step`: {wanted}, but checkpoint {plan.checkpoint} is at step {plan.step}; "
        "set it to 0 or null to use the stored step, or pass --resume_step_override true to force it"
    )


def config_changes(cfg: RunConfig, plan: ResumePlan) -> dict[str, Any]:
    """Fields that differ from the checkpoint's config: resume-critical ones raise, others are returned."""
    if plan.checkpoint is None:
        return {}
    stored = plan.state.get("config", {})
    current = cfg.to_dict()
    critical = [k for k in RESUME_CRITICAL_FIELDS if k in stored and stored[k] != current[k]]
    if critical:
        details = "; ".join(f"`{k}`: checkpoint {stored[k]!r}, now {current[k]!r}" for k in critical)
        raise ConfigError(
            f"config differs from checkpoint {plan.checkpoint} in fields that would make the resumed run wrong: "
            f"{details}. Use the checkpoint's values, or start a new run (another run_id / run_id_note)"
        )
    return {k: {"checkpoint": stored[k], "now": current[k]} for k in current if k in stored and stored[k] != current[k]}
