"""Decide what a start resumes from, and refuse resumes that would silently change the run.

Checked before anything is written, so a refused start leaves every existing checkpoint as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from steadyvla.checkpoint.layout import TRAINER_STATE_JSON
from steadyvla.checkpoint.manager import CheckpointError, CheckpointManager
from steadyvla.config import ConfigError, RunConfig, critical_values


# starts.jsonl `changed_fields` entry when resume_step_override accepted another resume_global_step
STEP_OVERRIDE_RECORD = "resume_global_step_ignored"


@dataclass(frozen=True)
class ResumePlan:
    """Where training continues from (None = fresh start) and the state stored there."""

    checkpoint: Path | None
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state.get("global_step", 0)) if self.checkpoint else 0


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE_JSON).read_text())


def plan_resume(cfg: RunConfig, run_dir: Path, log: Callable[[str], None]) -> ResumePlan:
    """Apply `resume` / `resume_adapter_dir` / `resume_global_step` (DESIGN.md §5)."""
    explicit = cfg.resume_adapter_dir or (cfg.resume if cfg.resume not in ("auto", "never") else None)
    manager = CheckpointManager(run_dir, log=log)
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
    if step_mismatch(cfg, plan):
        check_resume_step(cfg, plan)
        log(f"resume_global_step {cfg.resume_global_step} ignored (resume_step_override: true): continuing from "
            f"the checkpoint's own step {plan.step}")
    return plan


def step_mismatch(cfg: RunConfig, plan: ResumePlan) -> bool:
    """True if `resume_global_step` names a step other than the checkpoint's (0/null name none)."""
    return plan.checkpoint is not None and cfg.resume_global_step not in (None, 0, plan.step)


def check_resume_step(cfg: RunConfig, plan: ResumePlan) -> None:
    """`resume_global_step` must match the stored step unless `resume_step_override` accepts the
    mismatch. The step is never forced: step, schedule, data position and RNG always come from the
    checkpoint, because a step counter that disagrees with them would make a different run."""
    if not step_mismatch(cfg, plan) or cfg.resume_step_override:
        return
    raise ConfigError(
        f"config field `resume_global_step`: {cfg.resume_global_step}, but checkpoint {plan.checkpoint} is at "
        f"step {plan.step}; set it to 0 or null to continue from the stored step, or pass "
        f"--resume_step_override true to accept the mismatch (the run still continues from step {plan.step})"
    )


def config_changes(cfg: RunConfig, plan: ResumePlan) -> dict[str, Any]:
    """Fields that differ from the checkpoint's config: resume-critical ones raise, others are returned."""
    if plan.checkpoint is None:
        return {}
    stored = plan.state.get("config", {})
    current = cfg.to_dict()
    was, now = critical_values(stored), critical_values(current)
    critical = [k for k in now if k in was and was[k] != now[k]]
    if critical:
        details = "; ".join(f"`{k}`: checkpoint {was[k]!r}, now {now[k]!r}" for k in critical)
        raise ConfigError(
            f"config differs from checkpoint {plan.checkpoint} in fields that would make the resumed run wrong: "
            f"{details}. Use the checkpoint's values, or start a new run (another run_id / run_id_note)"
        )
    changes = {k: {"checkpoint": stored[k], "now": current[k]} for k in current if k in stored and stored[k] != current[k]}
    if step_mismatch(cfg, plan):
        changes[STEP_OVERRIDE_RECORD] = {"requested": cfg.resume_global_step, "continued_at": plan.step}
    return changes
