"""The users' full-training resume keys: `pretrained_checkpoint`, `is_resume`, `resume_step`,
`resume_epoch` (their train.py), checked before anything is written.

- `pretrained_checkpoint` + `is_resume: true`: continue from that checkpoint (a checkpoint dir, or a
  run dir -> its newest complete one), like `resume: <path>`.
- `pretrained_checkpoint` + `is_resume: false`: its model weights initialise a fresh run (optimizer,
  schedule, step and data position start over); it may also be a plain model-only safetensors file.
- `resume_step` / `resume_epoch` (optional): must equal the step / epoch the checkpoint records in its
  trainer_state.json (not its dir name); a mismatch is an error printing both values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from steadyvla.checkpoint.dcp_io import is_full_checkpoint
from steadyvla.checkpoint.manager import CheckpointError, CheckpointManager
from steadyvla.config import ConfigError, RunConfig
from steadyvla.train.resume import ResumePlan, read_trainer_state

FIELD = "pretrained_checkpoint"


@dataclass(frozen=True)
class WeightsInit:
    """Where a fresh full-training run takes its initial weights from (None: preset / vla_path)."""

    checkpoint: Path | None = None  # a full-training checkpoint dir (model part of its DCP state)
    weights_file: Path | None = None  # a plain model-only safetensors file


def resume_config(cfg: RunConfig) -> RunConfig:
    """The config `plan_resume` sees: `pretrained_checkpoint` with `is_resume: true` is `resume: <path>`."""
    if cfg.pretrained_checkpoint and cfg.is_resume:
        path = Path(cfg.pretrained_checkpoint)
        if path.is_file():
            raise ConfigError(f"config field `{FIELD}`: {path} is a file (model weights only): it cannot be resumed; "
                              "set `is_resume: false` to initialise a new run's weights from it")
        if cfg.resume not in ("auto", cfg.pretrained_checkpoint):
            raise ConfigError(f"config fields `{FIELD}` and `resume`: both name what to resume ({path} and "
                              f"{cfg.resume}); keep one")
        return dataclasses.replace(cfg, resume=str(path))
    return cfg


def weights_init(cfg: RunConfig, log) -> WeightsInit:
    """`pretrained_checkpoint` with `is_resume: false`: the checked source of the initial weights."""
    if not cfg.pretrained_checkpoint or cfg.is_resume:
        return WeightsInit()
    path = Path(cfg.pretrained_checkpoint)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError(f"config field `{FIELD}`: {path} is not a .safetensors file (a plain model file must "
                              "be safetensors: no pickle is loaded); or name a checkpoint dir or a run dir")
        return WeightsInit(weights_file=path)
    try:
        ckpt = CheckpointManager(path.parent, log=log).resolve_explicit(path)
    except CheckpointError as err:
        raise ConfigError(f"config field `{FIELD}`: {err}") from err
    if not is_full_checkpoint(ckpt):
        raise ConfigError(f"config field `{FIELD}`: {ckpt} is not a full-training checkpoint (no model_optim/); "
                          "a LoRA checkpoint is merged with `steadyvla merge` and used as `vla_path`")
    return WeightsInit(checkpoint=ckpt)


def named_record(cfg: RunConfig, plan: ResumePlan, init: WeightsInit, log) -> tuple[Path, dict] | None:
    """The checkpoint `resume_step` / `resume_epoch` are checked against: the one
    `pretrained_checkpoint` names, else the one the run resumes from."""
    if init.checkpoint is not None:
        return init.checkpoint, read_trainer_state(init.checkpoint)
    if cfg.pretrained_checkpoint and cfg.is_resume:
        target = CheckpointManager(Path(cfg.pretrained_checkpoint).parent, log=log).resolve_explicit(
            Path(cfg.pretrained_checkpoint))
        return target, read_trainer_state(target)
    if plan.checkpoint is not None:
        return plan.checkpoint, plan.state
    return None


def check_resume_position(cfg: RunConfig, plan: ResumePlan, init: WeightsInit, log) -> None:
    """`resume_step` / `resume_epoch` against the checkpoint's own record; errors print both values."""
    if cfg.resume_step is None and cfg.resume_epoch is None:
        return
    found = named_record(cfg, plan, init, log)
    if found is None:
        given = {k: getattr(cfg, k) for k in ("resume_step", "resume_epoch") if getattr(cfg, k) is not None}
        raise ConfigError(f"config fields {', '.join(f'`{k}`: {v}' for k, v in given.items())}: there is no "
                          "checkpoint to resume (none in the run dir, no `pretrained_checkpoint`); remove them")
    ckpt, record = found
    for key, stored in (("resume_step", int(record["global_step"])), ("resume_epoch", int(record["epoch"]))):
        value = getattr(cfg, key)
        if value is not None and value != stored:
            raise ConfigError(f"config field `{key}`: {value}, but checkpoint {ckpt} records "
                              f"{key.removeprefix('resume_')} {stored} (in its trainer_state.json); set `{key}: "
                              f"{stored}` or leave it out (null): the step and epoch always come from the checkpoint")
