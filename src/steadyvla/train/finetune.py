"""`steadyvla finetune`: build everything from the config, resume if there is something to resume,
and run the shared loop."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from steadyvla.checkpoint.layout import DATASET_STATISTICS
from steadyvla.atomic_files import mkdir_durable
from steadyvla.checkpoint.manager import CheckpointError
from steadyvla.checkpoint.run_lock import RunDirBusy, RunLock
from steadyvla.config import DEMO_DATASET_NAME, ConfigError, RunConfig
from steadyvla.config_compat import compat_notes
from steadyvla.data.dataset import PaddedCollator, VLADataset
from steadyvla.data.frames import FrameSource
from steadyvla.data.sampler import DataPosition, ResumableBatchSampler
from steadyvla.data.stats import compute_action_statistics, load_dataset_statistics, write_dataset_statistics
from steadyvla.data.transforms import ImageTransform
from steadyvla.distributed import DistEnv, barrier, init_distributed, shutdown, wrap_data_parallel
from steadyvla.eval.periodic import PeriodicEvalHook, periodic_eval_tasks, stopped_early_message
from steadyvla.memory_report import Preflight, enforce, preflight_for
from steadyvla.model.build import action_tokenizer_for, build_vla, load_tokenizer, model_spec, openvla_source, wrap_lora
from steadyvla.model.prompt import PromptBuilder
from steadyvla.train.checkpointing import TrainerCheckpointer, TrainState, load_into
from steadyvla.train.fast_paths import apply_fast_paths, fused_enabled
from steadyvla.hooks import TrainHook
from steadyvla.train.loop import LoopResult, run_loop
from steadyvla.train.metrics import MetricsLogger
from steadyvla.train.optim import build_optimizer, build_scheduler, rebuild_scheduler, schedule_change
from steadyvla.train.resume import ResumePlan, apply_rewind, config_changes, plan_resume
from steadyvla.train.run_dir import record_error, record_start, run_dir_for
from steadyvla.train.run_inputs import check_run_inputs, collect_run_inputs
from steadyvla.train.signals import PreemptionFlag, ignore_preemption_signals

USER_ERRORS = (ConfigError, CheckpointError, RunDirBusy)  # refusals: `error:` line, exit status 2
T = TypeVar("T")
# starts.jsonl `changed_fields` entry when a new max_steps changed the restored lr schedule
SCHEDULE_REBUILT_RECORD = "lr_schedule_rebuilt"


def say(message: str) -> None:
    """User-facing progress message."""
    print(f"[steadyvla] {message}", flush=True)


def open_training_data(cfg: RunConfig, log: Callable[[str], None] = say) -> FrameSource:
    """The dataset at data_root_dir/dataset_name; the MetaWorld demo is generated on first use."""
    from steadyvla.data.registry import open_frame_source

    root = Path(cfg.data_root_dir) / cfg.dataset_name
    if cfg.dataset_name == DEMO_DATASET_NAME:
        from steadyvla.data.demo_metaworld import ensure_demo_dataset

        if not root.exists():
            log(f"{root} is missing: generating the MetaWorld demo dataset once (cached for later runs)")
        # reuses the cached dataset when its settings match, regenerates it when they changed
        ensure_demo_dataset(root, episodes_per_task=cfg.demo_episodes_per_task, image_size=cfg.demo_image_size,
                            seed=cfg.seed)
    elif not root.exists():
        raise ConfigError(
            f"config fields `data_root_dir`/`dataset_name`: {root} does not exist (expected a LeRobot v3 "
            f"dataset or an RLDS builder dir there; dataset_name {DEMO_DATASET_NAME!r} generates the demo)"
        )
    return open_frame_source(Path(cfg.data_root_dir), cfg.dataset_name, image_key=cfg.image_key)


def action_statistics(cfg: RunConfig, source: FrameSource, run_dir: Path, resuming: bool) -> tuple[dict, bool]:
    """Reload (resume) or compute (fresh start) the run's statistics {dataset_name: entry}; also
    whether they were computed and still have to be written. Reads only: a corrupt file is a
    ConfigError before the start is recorded."""
    path = run_dir / DATASET_STATISTICS
    computed = not (resuming and path.exists())
    if computed:
        stats = {cfg.dataset_name: compute_action_statistics(source.actions(), num_trajectories=source.num_episodes)}
    else:
        try:
            stats = load_dataset_statistics(path)
        except ValueError as err:
            raise ConfigError(f"{err}. Restore that file, or delete it to have it recomputed from the dataset "
                              "(which the checkpoint's fingerprint shows is unchanged)") from None
    if cfg.dataset_name not in stats:
        raise ConfigError(f"config field `dataset_name`: {cfg.dataset_name!r} not in {path} (has {list(stats)})")
    return stats, computed


def unavailable_settings(cfg: RunConfig) -> list[str]:
    """Messages for settings the users' configs carry that this version accepts but does not act on."""
    notes = compat_notes(cfg)
    if cfg.merge_lora_during_training:
        notes.append("merge_lora_during_training: true is ignored: merging during training reloads the base "
                      "model and caused the users' host OOM kills; checkpoints hold the PEFT adapter instead, and "
                      "`steadyvla merge --checkpoint RUN_DIR --out DIR` merges one offline")
    if cfg.early_stopping_enabled and not cfg.enable_periodic_eval:
        notes.append("early_stopping_enabled: true has no effect without enable_periodic_eval: true (early "
                     "stopping watches the periodic evaluation's score)")
    return notes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finetune(cfg: RunConfig, log: Callable[[str], None] = say) -> LoopResult:
    """Run (or continue) a LoRA fine-tuning run described by `cfg`; `method_enabled` adds the
    ICSM + HSW + Thermostat hook to the same loop. Under torchrun, data-parallel over the ranks."""
    if not cfg.use_lora:
        raise ConfigError("config field `use_lora`: false is full training; use `steadyvla train` for that")
    env = init_distributed()
    # from the very start: a preemption signal during setup is honoured after the first step, not fatal
    preemption = PreemptionFlag().install()
    try:
        return _finetune(cfg, env, log if env.is_main else (lambda _message: None), preemption)
    except USER_ERRORS:
        raise  # their message says it all; a refused start writes nothing
    except Exception as err:
        if env.is_main:
            err.traceback_file = record_error(run_dir_for(cfg), err)  # type: ignore[attr-defined]
        raise
    finally:
        preemption.uninstall()
        shutdown(env)


def enable_activation_checkpointing(llm: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward. Non-reentrant: works with frozen inputs and the method's
    hooks. transformers 5.2x renamed the method (the old name warns)."""
    enable = getattr(llm, "activation_checkpointing_enable", None) or llm.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def preflight(cfg: RunConfig, env: DistEnv, log: Callable[[str], None]) -> Preflight:
    """The memory preflight: stops the start (MemoryWillNotFit, exit 2) when the run will not fit,
    unless `force`."""
    report = preflight_for(cfg, env.device, env.world_size)
    enforce(report, cfg, log)
    return report


def _main_rank_first(env: DistEnv, work: Callable[[], T]) -> T:
    """Run `work` on rank 0 first (it may generate the demo data or ICSM artifacts once), then on
    the other ranks, which find the result on disk."""
    result = work() if env.is_main else None
    barrier(env)
    return result if env.is_main else work()


def _lock_run_dir(run_dir: Path, env: DistEnv) -> RunLock | None:
    """Rank 0 owns the run dir for the life of the run (the other ranks only read it)."""
    if not env.is_main:
        return None
    mkdir_durable(run_dir)  # fsyncs run_root_dir: the new run dir's entry survives a crash
    return RunLock.acquire(run_dir)


def _check_resume_inputs(cfg: RunConfig, plan: ResumePlan, inputs: dict, changes: dict,
                         log: Callable[[str], None]) -> None:
    """Refuse a resume on changed inputs (before anything is written); note a rebuilt lr schedule
    in `changes` (what starts.jsonl records)."""
    icsm_dir = None
    if cfg.method_enabled:
        from steadyvla.method.build_icsm import artifact_dir

        icsm_dir = artifact_dir(cfg)
    check_run_inputs(cfg, plan.checkpoint, plan.state, inputs, icsm_dir)
    rebuilt = schedule_change(plan.state["scheduler"], plan.state.get("config", {}).get("max_steps"), cfg)
    if rebuilt is not None:
        changes[SCHEDULE_REBUILT_RECORD] = rebuilt
        log(f"lr schedule rebuilt for max_steps {cfg.max_steps} (checkpoint: {rebuilt['max_steps']['checkpoint']}): "
            f"next lr {rebuilt['next_lr']['now']:.3e} instead of {rebuilt['next_lr']['checkpoint']:.3e}")


def _finetune(cfg: RunConfig, env: DistEnv, log: Callable[[str], None], preemption: PreemptionFlag) -> LoopResult:
    run_dir = run_dir_for(cfg)
    if cfg.vla_path:  # a bad checkpoint dir fails here, before anything is written
        openvla_source(cfg)
    for note in unavailable_settings(cfg):
        log(note)
    # An existing run dir is locked before it is read, so the plan cannot race a live run; a new one is
    # created only once the config has been checked (a refused start leaves no directory behind).
    lock = _lock_run_dir(run_dir, env) if run_dir.exists() else None
    try:
        plan: ResumePlan = plan_resume(cfg, run_dir, log)  # may raise before anything is written
        changes = config_changes(cfg, plan)
        if plan.checkpoint is not None and plan.step >= cfg.max_steps:
            log(f"run already complete: checkpoint step {plan.step} >= max_steps {cfg.max_steps}; nothing to do")
            return LoopResult(plan.step, preempted=False)
        memory = preflight(cfg, env, log)  # before the run dir is created: a refusal writes nothing
        if lock is None:
            lock = _lock_run_dir(run_dir, env)
        return _train(cfg, env, log, run_dir, plan, changes, preemption, lock, memory)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, env: DistEnv, log: Callable[[str], None], run_dir: Path, plan: ResumePlan,
           changes: dict, preemption: PreemptionFlag, lock: RunLock | None, memory: Preflight) -> LoopResult:
    """Build model and data, restore the plan's checkpoint, run the loop (the run dir is locked)."""
    source = _main_rank_first(env, lambda: open_training_data(cfg, log))
    artifacts = probe = None
    if cfg.method_enabled:  # before seeding: building the teacher must not shift the run's RNG
        from steadyvla.method.build_icsm import ensure_icsm, load_probe

        probe = load_probe(cfg, source)
        artifacts = _main_rank_first(env, lambda: ensure_icsm(cfg, source, log, probe))
    inputs = collect_run_inputs(source, artifacts, probe)
    if plan.checkpoint is not None:
        _check_resume_inputs(cfg, plan, inputs, changes, log)
    all_stats, stats_computed = action_statistics(cfg, source, run_dir, resuming=plan.checkpoint is not None)
    stats = all_stats[cfg.dataset_name]["action"]
    eval_tasks = periodic_eval_tasks(cfg, source, len(stats["q01"]), log)  # None: off
    if eval_tasks and plan.checkpoint is not None:
        stopped = stopped_early_message(cfg, plan.state, eval_tasks, run_dir)
        if stopped is not None:
            log(stopped)
            return LoopResult(plan.step, preempted=False, stopped_early=True)
    seed_everything(cfg.seed)
    if env.is_main:
        if plan.checkpoint is not None and plan.state.get("world_size", 1) != env.world_size:
            changes["world_size"] = {"checkpoint": plan.state.get("world_size", 1), "now": env.world_size}
            log(f"world size {changes['world_size']['checkpoint']} -> {env.world_size}: the global sample order "
                "continues where it stopped; the global batch is now batch_size x world size")
        # only once every check passed: a refused start changes nothing on disk
        if lock is not None:
            lock.announce()
        apply_rewind(run_dir, plan, log)
        record_start(run_dir, cfg, resumed_from=str(plan.checkpoint) if plan.checkpoint else None,
                     resumed_step=plan.step, changes=changes,
                     rewind={"from": plan.rewind_from, "to": plan.checkpoint.name} if plan.rewind_from else None)
        if stats_computed:
            write_dataset_statistics(run_dir / DATASET_STATISTICS, all_stats)
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

        hooks.append(MethodHook(cfg, model, tokenizer, artifacts, probe, device))
    if eval_tasks:
        hooks.append(PeriodicEvalHook(cfg, model, tokenizer, spec, all_stats, eval_tasks, run_dir, env, log))
    state = TrainState(model, optimizer, scheduler, DataPosition(), hooks=hooks)
    if plan.checkpoint is not None:
        load_into(state, plan.checkpoint, rank=env.rank, log=say)
        if plan.rewind_mark is not None and plan.rewind_mark not in state.rewinds:
            state.rewinds.append(plan.rewind_mark)  # later starts with the same flag must not go back again
        rebuild_scheduler(scheduler, cfg)
        log(f"restored step {state.global_step}, epoch {state.data_position.epoch}, sample "
            f"{state.data_position.position} of {len(source)}, lr {scheduler.get_last_lr()[0]:.3e}")
    else:
        if plan.adapter_weights is not None:
            from steadyvla.checkpoint.legacy import load_adapter_weights

            count = load_adapter_weights(model, plan.adapter_weights, cfg)
            log(f"loaded {count} LoRA tensors from {plan.adapter_weights}")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log(f"fresh start in {run_dir}: {len(source)} frames, {source.num_episodes} episodes; "
            f"LoRA r={cfg.lora_rank}: {trainable:,} trainable of {total:,} parameters")

    # always OpenVLA's training prompt: `prompt_template` is the method's probe prompt (DESIGN.md §6)
    dataset = VLADataset(source, PromptBuilder(tokenizer), action_tokenizer, stats,
                         ImageTransform(spec, cfg.image_aug, cfg.seed))
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, rank=env.rank,
                                    world_size=env.world_size, start=state.data_position)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=PaddedCollator(int(tokenizer.pad_token_id)),
                        pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0,
                        # own generator: creating the iterator must not draw from the restored global RNG
                        generator=torch.Generator().manual_seed(cfg.seed),
                        worker_init_fn=ignore_preemption_signals if cfg.num_workers > 0 else None)
    logger = MetricsLogger(run_dir, resume_step=state.global_step, enabled=env.is_main)
    logger.load_state_dict(state.metrics_state)
    if cfg.use_wandb and env.is_main:
        from steadyvla.train.wandb_log import WandbTracker

        logger.tracker = WandbTracker(run_dir, cfg, log)
    checkpointer = TrainerCheckpointer(run_dir, cfg, log, env, inputs)
    try:
        result = run_loop(cfg, state, iter(loader), sampler, action_tokenizer, logger, checkpointer, preemption,
                          env, train_model, log, memory_estimate=memory.estimate)
    finally:
        checkpointer.wait()
        logger.close()
    result.model = model
    result.memory_estimate = memory.estimate
    if not result.preempted and env.is_main:
        from steadyvla.report.summary import run_summary

        ended = "stopped early: " if result.stopped_early else "done: "
        log(ended + run_summary(run_dir))
    return result
