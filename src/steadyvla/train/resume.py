"""Decide what a start resumes from, and refuse resumes that would silently change the run.

Checked before anything is written, so a refused start leaves every existing checkpoint as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, TRAINER_STATE_JSON
from steadyvla.checkpoint.legacy import (
    LEGACY_TRAINER_STATE, check_adapter_config, is_legacy_adapter_dir, read_adapter_weights,
)
from steadyvla.checkpoint.manager import CheckpointError, CheckpointManager
from steadyvla.config import ConfigError, RunConfig, critical_values
from steadyvla.train.checkpointing import REWINDS_KEY

# starts.jsonl `changed_fields` entry when resume_step_override accepted another resume_global_step
STEP_OVERRIDE_RECORD = "resume_global_step_ignored"


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
    adapter_weights: Path | None = None  # an old PEFT adapter dir: LoRA weights only, the rest fresh

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
    if cfg.resume_adapter_dir and is_legacy_adapter_dir(Path(cfg.resume_adapter_dir)):
        if manager.resolve_latest() is None:
            return _legacy_adapter_plan(cfg, Path(cfg.resume_adapter_dir), log)
        # the adapter was this run's starting point; the run went on from it (then was preempted)
        log(f"resume_adapter_dir {cfg.resume_adapter_dir} (an old PEFT adapter) was only this run's starting point: "
            f"{run_dir} already holds checkpoints of the run, so it continues from the newest one")
        explicit = None
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
    if step_mismatch(cfg, plan):
        check_resume_step(cfg, plan)
        log(f"resume_global_step {cfg.resume_global_step} ignored (resume_step_override: true): continuing from "
            f"the checkpoint's own step {plan.step}")
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


BATCH_SHAPE_FIELDS = ("batch_size", "grad_accumulation_steps")


def config_changes(cfg: RunConfig, plan: ResumePlan, world_size: int | None = None) -> dict[str, Any]:
    """Fields that differ from the checkpoint's config: resume-critical ones raise, others are returned.

    With `world_size` given and different from the checkpoint's, `batch_size` and
    `grad_accumulation_steps` may change as long as the global batch (their product x world size)
    stays the same: the run then continues with the same samples in every optimizer step."""
    if plan.checkpoint is None:
        return {}
    stored = plan.state.get("config", {})
    current = cfg.to_dict()
    was, now = critical_values(stored), critical_values(current)
    critical = [k for k in now if k in was and was[k] != now[k]]
    stored_world = int(plan.state.get("world_size", 1))
    if world_size is not None and world_size != stored_world and all(k in stored for k in BATCH_SHAPE_FIELDS):
        global_was = stored["batch_size"] * stored["grad_accumulation_steps"] * stored_world
        if global_was == cfg.batch_size * cfg.grad_accumulation_steps * world_size:
            critical = [k for k in critical if k not in BATCH_SHAPE_FIELDS]
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
