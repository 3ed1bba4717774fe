"""`steadyvla train`: full-parameter training (FSDP2 or DDP under torchrun) on the same start-up,
data pipeline, loop and checkpoint package as LoRA fine-tuning (train/setup.py)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
from safetensors.torch import load_file

from steadyvla.config import ConfigError, RunConfig
from steadyvla.data.sampler import DataPosition
from steadyvla.distributed import DistEnv, one_rank_group
from steadyvla.eval.periodic import PeriodicEvalHook
from steadyvla.model.build import action_tokenizer_for, build_vla, load_tokenizer, model_spec
from steadyvla.parallel import freeze_parts, parallelize
from steadyvla.hooks import TrainHook
from steadyvla.memory_report import Preflight
from steadyvla.train.checkpointing import TrainState
from steadyvla.train.full_checkpointing import FullCheckpointer, load_full_checkpoint
from steadyvla.train.init_source import WeightsInit, check_resume_position, resume_config, weights_init
from steadyvla.train.loop import LoopResult
from steadyvla.train.optim import build_full_optimizer, build_scheduler, rebuild_scheduler
from steadyvla.train.resume import config_changes, plan_resume
from steadyvla.train.setup import (
    RunDirLock, Start, preflight, prepare_start, record_checked_start, run_guarded, say, seed_everything,
    train_on_data,
)
from steadyvla.train.signals import PreemptionFlag


def train(cfg: RunConfig, log: Callable[[str], None] = say) -> LoopResult:
    """Run (or continue) a full-training run described by `cfg` (`use_lora: false`)."""
    if cfg.use_lora:
        raise ConfigError("config field `use_lora`: true is LoRA fine-tuning (`steadyvla finetune`); full training "
                          "needs `use_lora: false`")
    return run_guarded(cfg, lambda env, rank_log, preemption: _train_full(cfg, env, rank_log, preemption), log)


def _train_full(cfg: RunConfig, env: DistEnv, log: Callable[[str], None], preemption: PreemptionFlag) -> LoopResult:
    run_dir = prepare_start(cfg, log)
    init = weights_init(cfg, log)
    with RunDirLock(run_dir, env) as lock:
        plan = plan_resume(resume_config(cfg), run_dir, log)  # may raise before anything is written
        check_resume_position(cfg, plan, init, log)
        changes = config_changes(cfg, plan, env.world_size)
        if plan.checkpoint is not None and plan.step >= cfg.max_steps:
            log(f"run already complete: checkpoint step {plan.step} >= max_steps {cfg.max_steps}; nothing to do")
            return LoopResult(plan.step, preempted=False)
        memory = preflight(cfg, env, log)  # before the run dir is created: a refusal writes nothing
        start = record_checked_start(cfg, env, log, run_dir, plan, changes, preemption, lock.ensure())
        if start.already_stopped:
            return LoopResult(plan.step, preempted=False, stopped_early=True)
        with one_rank_group(env) if cfg.strategy == "fsdp" else contextlib.nullcontext():
            return _run(start, init, memory)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every LLM decoder layer and ViT block in backward (non-reentrant)."""
    from steadyvla.train.finetune import enable_activation_checkpointing as enable_llm

    enable_llm(model.language_model)
    for tower in (model.vision_backbone.featurizer, model.vision_backbone.fused_featurizer):
        if tower is not None:
            tower.set_grad_checkpointing(True)


def _run(start: Start, init: WeightsInit, memory: Preflight) -> LoopResult:
    """Build, shard and restore the model, run the loop (the run dir is locked)."""
    cfg, env, log, plan = start.cfg, start.env, start.log, start.plan
    tokenizer = load_tokenizer(cfg)
    spec = model_spec(cfg, tokenizer)
    action_tokenizer = action_tokenizer_for(tokenizer, spec)
    # float32 master weights; `dtype` is the compute dtype (FSDP's param_dtype, or autocast)
    model = build_vla(dataclasses.replace(cfg, dtype="float32"), tokenizer, env.device)
    fresh = plan.checkpoint is None
    if fresh and init.weights_file is not None:
        missing, unexpected = model.load_state_dict(load_file(str(init.weights_file), device=str(env.device)),
                                                    strict=False)
        if missing or unexpected:
            raise ConfigError(f"config field `pretrained_checkpoint`: {init.weights_file} does not fit the model: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    freeze_parts(model, cfg)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if env.rank > 0:  # same weights on every rank (seeded init), different dropout draws
        seed_everything(cfg.seed + env.rank)
    train_model = parallelize(model, cfg, env)
    optimizer = build_full_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    hooks: list[TrainHook] = []
    if cfg.method_enabled:  # HSW hooks on the (sharded) decoder layers; probe forwards on every FSDP rank
        from steadyvla.method.hook import MethodHook

        hooks.append(MethodHook(cfg, model, tokenizer, start.artifacts, start.probe, env.device,
                                sharded=env.distributed and cfg.strategy == "fsdp"))
    if start.eval_tasks:  # after sharding: under FSDP every rank joins the evaluation's forwards
        hooks.append(PeriodicEvalHook(cfg, model, tokenizer, spec, start.all_stats, start.eval_tasks, start.run_dir,
                                      env, log))
    state = TrainState(model, optimizer, scheduler, DataPosition(), hooks=hooks)
    if not fresh:
        load_full_checkpoint(state, plan.checkpoint, rank=env.rank, log=say)
        if plan.rewind_mark is not None and plan.rewind_mark not in state.rewinds:
            state.rewinds.append(plan.rewind_mark)
        rebuild_scheduler(scheduler, cfg)
        log(f"restored step {state.global_step}, epoch {state.data_position.epoch}, sample "
            f"{state.data_position.position} of {len(start.source)}, lr {scheduler.get_last_lr()[0]:.3e}")
    else:
        if init.checkpoint is not None:
            from steadyvla.checkpoint.dcp_io import load_model_only

            load_model_only(model, init.checkpoint)
            log(f"initialised the model's weights from {init.checkpoint} (is_resume: false: optimizer, schedule, "
                "step and data position start fresh)")
        elif init.weights_file is not None:
            log(f"initialised the model's weights from {init.weights_file}")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log(f"fresh start in {start.run_dir}: {len(start.source)} frames, {start.source.num_episodes} episodes; full "
            f"training ({cfg.strategy}, {env.world_size} rank{'s' if env.distributed else ''}): {trainable:,} trainable "
            f"of {total:,} "
            "parameters")
    checkpointer = FullCheckpointer(start.run_dir, cfg, log, env, start.inputs)
    result = train_on_data(start, state, train_model, checkpointer, tokenizer, spec, action_tokenizer,
                           memory.estimate)
    result.model = model
    return result
