"""`steadyvla finetune`: build everything from the config, resume if there is something to resume,
and run the shared loop. The start-up shared with full training lives in train/setup.py."""

from __future__ import annotations

from typing import Callable

import torch

from steadyvla.config import DEMO_DATASET_NAME, ConfigError, RunConfig  # noqa: F401 - doctor imports it here
from steadyvla.distributed import DistEnv, wrap_data_parallel
from steadyvla.eval.periodic import PeriodicEvalHook
from steadyvla.hooks import TrainHook
from steadyvla.memory_report import Preflight
from steadyvla.model.build import action_tokenizer_for, build_vla, load_tokenizer, model_spec, wrap_lora
from steadyvla.data.sampler import DataPosition
from steadyvla.train.checkpointing import TrainerCheckpointer, TrainState, load_into
from steadyvla.train.fast_paths import apply_fast_paths, fused_enabled
from steadyvla.train.loop import LoopResult
from steadyvla.train.optim import build_optimizer, build_scheduler, rebuild_scheduler
from steadyvla.train.resume import ResumePlan, config_changes, plan_resume
from steadyvla.train.setup import (  # noqa: F401 - re-exported: cli, doctor, import_legacy and tests use them here
    SCHEDULE_REBUILT_RECORD, USER_ERRORS, RunDirLock, Start, action_statistics, open_training_data, preflight,
    prepare_start, record_checked_start, run_guarded, say, seed_everything, train_on_data, unavailable_settings,
)
from steadyvla.train.signals import PreemptionFlag


def finetune(cfg: RunConfig, log: Callable[[str], None] = say) -> LoopResult:
    """Run (or continue) a LoRA fine-tuning run described by `cfg`; `method_enabled` adds the
    ICSM + HSW + Thermostat hook to the same loop. Under torchrun, data-parallel over the ranks."""
    if not cfg.use_lora:
        raise ConfigError("config field `use_lora`: false is full training; use `steadyvla train` for that")
    return run_guarded(cfg, lambda env, rank_log, preemption: _finetune(cfg, env, rank_log, preemption), log)


def enable_activation_checkpointing(llm: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward. Non-reentrant: works with frozen inputs and the method's
    hooks. transformers 5.2x renamed the method (the old name warns)."""
    enable = getattr(llm, "activation_checkpointing_enable", None) or llm.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def _finetune(cfg: RunConfig, env: DistEnv, log: Callable[[str], None], preemption: PreemptionFlag) -> LoopResult:
    run_dir = prepare_start(cfg, log)
    with RunDirLock(run_dir, env) as lock:
        plan: ResumePlan = plan_resume(cfg, run_dir, log)  # may raise before anything is written
        changes = config_changes(cfg, plan, env.world_size)
        if plan.checkpoint is not None and plan.step >= cfg.max_steps:
            log(f"run already complete: checkpoint step {plan.step} >= max_steps {cfg.max_steps}; nothing to do")
            return LoopResult(plan.step, preempted=False)
        memory = preflight(cfg, env, log)  # before the run dir is created: a refusal writes nothing
        start = record_checked_start(cfg, env, log, run_dir, plan, changes, preemption, lock.ensure())
        if start.already_stopped:
            return LoopResult(plan.step, preempted=False, stopped_early=True)
        return _train(start, memory)


def _train(start: Start, memory: Preflight) -> LoopResult:
    """Build the LoRA model, restore the plan's checkpoint, run the loop (the run dir is locked)."""
    cfg, env, log, plan = start.cfg, start.env, start.log, start.plan
    device = env.device
    tokenizer = load_tokenizer(cfg)
    spec = model_spec(cfg, tokenizer)
    action_tokenizer = action_tokenizer_for(tokenizer, spec)
    model = wrap_lora(build_vla(cfg, tokenizer, device), cfg)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model.get_base_model().language_model)
    if env.rank > 0:  # same weights on every rank (seeded init), different dropout draws
        seed_everything(cfg.seed + env.rank)
    fast = apply_fast_paths(model, cfg, device)  # after activation checkpointing: it wraps the compiled blocks
    if fast:
        log(f"fast paths: {', '.join(fast)}")
    train_model = wrap_data_parallel(model, env)
    optimizer = build_optimizer(model, cfg, fused=fused_enabled(cfg, device))
    scheduler = build_scheduler(optimizer, cfg)
    hooks: list[TrainHook] = []
    if cfg.method_enabled:
        from steadyvla.method.hook import MethodHook

        hooks.append(MethodHook(cfg, model, tokenizer, start.artifacts, start.probe, device))
    if start.eval_tasks:
        hooks.append(PeriodicEvalHook(cfg, model, tokenizer, spec, start.all_stats, start.eval_tasks, start.run_dir,
                                      env, log))
    state = TrainState(model, optimizer, scheduler, DataPosition(), hooks=hooks)
    if plan.checkpoint is not None:
        load_into(state, plan.checkpoint, rank=env.rank, log=say)
        if plan.rewind_mark is not None and plan.rewind_mark not in state.rewinds:
            state.rewinds.append(plan.rewind_mark)  # later starts with the same flag must not go back again
        rebuild_scheduler(scheduler, cfg)
        log(f"restored step {state.global_step}, epoch {state.data_position.epoch}, sample "
            f"{state.data_position.position} of {len(start.source)}, lr {scheduler.get_last_lr()[0]:.3e}")
    else:
        if plan.adapter_weights is not None:
            from steadyvla.checkpoint.legacy import load_adapter_weights

            count = load_adapter_weights(model, plan.adapter_weights, cfg)
            log(f"loaded {count} LoRA tensors from {plan.adapter_weights}")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log(f"fresh start in {start.run_dir}: {len(start.source)} frames, {start.source.num_episodes} episodes; "
            f"LoRA r={cfg.lora_rank}: {trainable:,} trainable of {total:,} parameters")
    checkpointer = TrainerCheckpointer(start.run_dir, cfg, log, env, start.inputs)
    result = train_on_data(start, state, train_model, checkpointer, tokenizer, spec, action_tokenizer,
                           memory.estimate)
    result.model = model
    return result
