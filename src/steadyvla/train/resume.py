"""Decide what a start resumes from, and refuse resumes that would silently change the run.

Checked before anything is written, so a refused start leaves every existing checkpoint as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, TRAINER_STATE_JSON
from steadyvla.checkpoint.manager import CheckpointError, CheckpointManager
from steadyvla.config import RESUME_CRITICAL_FIELDS, ConfigError, RunConfig
from steadyvla.train.checkpointing import REWINDS_KEY


@dataclass(frozen=True)
class ResumePlan:
    """Where training continues from (None = fresh start) and the state stored there.

    `rewind_mark` is set when the run goes back to an explicit target on purpose (`resume_rewind`);
    `rewind_from` then names the checkpoint `latest` pointed to before, if the rewind still has to
    move `latest` (a restart of an interrupted rewind finds it already moved)."""

    checkpoint: Path | None
    state: dict[str, Any]
    rewind_mark: str | None = None
    rewind_from: str | None = None

    @property
    def step(self) -> int:
        return int(self.state.get("global_step", 0)) if self.checkpoint else 0


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE_JSON).read_text())


def _step_of(ckpt: Path) -> int:
    return int(read_trainer_state(ckpt)["global_step"])


def _rewind_mark(ckpt: Path) -> str:
    return f"{ckpt.name}@{_step_of(ckpt)}"


def plan_resume(cfg: RunConfig, run_dir: Path, log: Callable[[str], None]) -> ResumePlan:
    """Apply `resume` / `resume_adapter_dir` / `resume_rewind` / `resume_global_step` (DESIGN.md §5)."""
    explicit = cfg.resume_adapter_dir or (cfg.resume if cfg.resume not in ("auto", "never") else None)
    manager = CheckpointManager(run_dir, log=log)
    if explicit:
        field = "resume_adapter_dir" if cfg.resume_adapter_dir else "resume"
        try:
            target = manager.resolve_explicit(Path(explicit))
        except CheckpointError as err:
            raise ConfigError(f"config field `{field}`: {err}") from err
        plan = _plan_explicit(cfg, manager, target, field, log)
    elif cfg.resume == "never":
        existing = manager.list_checkpoints(deep=False)
        if existing:
            raise ConfigError(
                f"config field `resume`: never, but {run_dir} already holds checkpoints up to step "
                f"{existing[-1].step}; pick another run_id / run_id_note, or delete that directory"
            )
        log("resume: never — starting fresh")
        return ResumePlan(None, {})
    else:
        ckpt, skipped = manager.resolve_latest_explained()
        if ckpt is None and skipped:
            raise ConfigError(_nothing_verifies(run_dir, skipped))
        if ckpt is None:
            log(f"resume: auto — no checkpoint in {run_dir}; starting fresh")
            return ResumePlan(None, {})
        log(f"resume: auto — continuing from {ckpt}")
        plan = ResumePlan(ckpt, read_trainer_state(ckpt))
    check_resume_step(cfg, plan)
    return plan


def _nothing_verifies(run_dir: Path, skipped: list[str]) -> str:
    detail = "".join(f"\n  {m}" for m in skipped)
    return (f"config field `resume`: auto, but no checkpoint in {run_dir / CHECKPOINTS_DIR} passes "
            f"verification:{detail}\nStarting fresh here would overwrite them, so nothing was changed. "
            f"See `steadyvla ckpt verify {run_dir}`; to start over, use `--resume never` with another "
            "run_id / run_id_note")


def _plan_explicit(cfg: RunConfig, manager: CheckpointManager, target: Path, field: str,
                   log: Callable[[str], None]) -> ResumePlan:
    """A named checkpoint is a starting point: once this run dir went past it, continue from its newest."""
    current = manager.resolve_latest()
    state = read_trainer_state(target)
    mark = _rewind_mark(target) if cfg.resume_rewind else None
    if current is None or current.resolve() == target.resolve():
        log(f"resuming from {target} (named explicitly)")
        return ResumePlan(target, state, rewind_mark=mark)
    step, current_state = int(state["global_step"]), read_trainer_state(current)
    current_step = int(current_state["global_step"])
    if cfg.resume_rewind and mark in current_state.get(REWINDS_KEY, []):
        log(f"resume_rewind to {target.name} (step {step}) was done by an earlier start and the run has "
            f"continued since: continuing from its newest checkpoint {current} (step {current_step}); drop "
            "`--resume_rewind true` from the command")
        return ResumePlan(current, current_state)
    if cfg.resume_rewind:
        if target.parent.resolve() != manager.root.resolve():
            raise ConfigError(f"config field `resume_rewind`: true, but {target} is not a checkpoint of this run "
                              f"dir ({manager.root}); a rewind can only go back within one run. Start a new run "
                              "(another run_id / run_id_note) from it instead")
        if step >= current_step:
            raise ConfigError(f"config field `resume_rewind`: true, but {target.name} (step {step}) is not older "
                              f"than this run's newest checkpoint {current.name} (step {current_step}); "
                              "drop `--resume_rewind true`")
        log(f"resume_rewind: going back from {current.name} (step {current_step}) to {target.name} (step "
            f"{step}): `latest` moves to it, metrics after step {step} are dropped, and the checkpoints after it "
            "are replaced as the run reaches their steps")
        return ResumePlan(target, state, rewind_mark=mark, rewind_from=current.name)
    if current_step >= step:
        log(f"{field} {target} (step {step}) is only a starting point: this run dir already continued past "
            f"it; continuing from its newest complete checkpoint {current} (step {current_step}). To go back "
            f"to step {step}, add `--resume_rewind true`")
        return ResumePlan(current, current_state)
    raise ConfigError(f"config field `{field}`: {target} is at step {step}, ahead of this run dir's newest "
                      f"complete checkpoint {current} (step {current_step}); it is not part of this run's "
                      "history. Use `resume: auto` to continue this run, or another run_id / run_id_note "
                      "to start a run from it")


def apply_rewind(run_dir: Path, plan: ResumePlan, log: Callable[[str], None]) -> None:
    """Move `latest` back to the rewind target (call under the run lock, before metrics are cut).

    `latest` moves first: if the process dies right after, a plain restart resumes from the target
    and cuts the metrics to it, so log, `latest` and checkpoints agree at every moment."""
    if plan.rewind_from is None or plan.checkpoint is None:
        return
    CheckpointManager(run_dir, log=log).set_latest(plan.checkpoint.name)
    log(f"`latest` now names {plan.checkpoint.name} (was {plan.rewind_from})")


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
