"""Start-up shared by `steadyvla finetune` (LoRA) and `steadyvla train` (full): the process-group and
signal lifecycle, the run-dir lock, the checks before anything is written, data, statistics, the
start record, and the data pipeline + loop once the model and its state are built."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from steadyvla.atomic_files import mkdir_durable
from steadyvla.checkpoint.layout import DATASET_STATISTICS
from steadyvla.checkpoint.manager import CheckpointError
from steadyvla.checkpoint.run_lock import RunDirBusy, RunLock
from steadyvla.config import DEMO_DATASET_NAME, ConfigError, RunConfig
from steadyvla.config_compat import compat_notes
from steadyvla.data.dataset import PaddedCollator, VLADataset
from steadyvla.data.frames import FrameSource
from steadyvla.data.sampler import ResumableBatchSampler
from steadyvla.data.stats import compute_action_statistics, load_dataset_statistics, write_dataset_statistics
from steadyvla.data.transforms import ImageTransform
from steadyvla.distributed import DistEnv, barrier, init_distributed, shutdown
from steadyvla.eval.periodic import periodic_eval_tasks, stopped_early_message
from steadyvla.memory_report import Preflight, enforce, preflight_for
from steadyvla.model.prompt import PromptBuilder
from steadyvla.train.checkpointing import TrainState
from steadyvla.train.loop import LoopResult, run_loop
from steadyvla.train.metrics import MetricsLogger
from steadyvla.train.optim import schedule_change
from steadyvla.train.resume import ResumePlan, apply_rewind
from steadyvla.train.run_dir import record_error, record_start, run_dir_for
from steadyvla.train.run_inputs import check_run_inputs, collect_run_inputs
from steadyvla.train.signals import PreemptionFlag, ignore_preemption_signals

USER_ERRORS = (ConfigError, CheckpointError, RunDirBusy)  # refusals: `error:` line, exit status 2
T = TypeVar("T")
# starts.jsonl `changed_fields` entry when a new max_steps changed the restored lr schedule
SCHEDULE_REBUILT_RECORD = "lr_schedule_rebuilt"
Log = Callable[[str], None]


def say(message: str) -> None:
    """User-facing progress message."""
    print(f"[steadyvla] {message}", flush=True)


def open_training_data(cfg: RunConfig, log: Log = say) -> FrameSource:
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


def prepare_start(cfg: RunConfig, log: Log) -> Path:
    """Checks and notes every start makes before touching the run dir: a bad `vla_path` fails here,
    before anything is written; settings that do nothing are announced. Returns the run dir."""
    if cfg.vla_path:
        from steadyvla.model.build import openvla_source

        openvla_source(cfg)
    for note in unavailable_settings(cfg):
        log(note)
    return run_dir_for(cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# cuBLAS repeats its results bit for bit only with a fixed workspace layout (NVIDIA's documented value)
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def use_deterministic_kernels(cfg: RunConfig) -> None:
    """`deterministic: true`: only deterministic CUDA kernels (attention backward without atomics,
    cuBLAS with a fixed workspace), so two runs, or a run and its resume, agree bit for bit on the
    GPU too. Call before the first CUDA matmul."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
        torch.use_deterministic_algorithms(True)


def run_guarded(cfg: RunConfig, body: Callable[[DistEnv, Log, PreemptionFlag], T], log: Log = say) -> T:
    """Start the process group, catch preemption signals from the very start (honoured after the
    first step, not fatal), run `body`, record an unexpected failure's traceback in the run dir."""
    use_deterministic_kernels(cfg)
    env = init_distributed()
    preemption = PreemptionFlag().install()
    try:
        return body(env, log if env.is_main else (lambda _message: None), preemption)
    except USER_ERRORS:
        raise  # their message says it all; a refused start writes nothing
    except Exception as err:
        if env.is_main:
            err.traceback_file = record_error(run_dir_for(cfg), err)  # type: ignore[attr-defined]
        raise
    finally:
        preemption.uninstall()
        shutdown(env)


def main_rank_first(env: DistEnv, work: Callable[[], T]) -> T:
    """Run `work` on rank 0 first (it may generate the demo data or ICSM artifacts once), then on
    the other ranks, which find the result on disk."""
    result = work() if env.is_main else None
    barrier(env)
    return result if env.is_main else work()


class RunDirLock:
    """Rank 0 owns the run dir for the life of the run (the other ranks only read it). An existing run
    dir is locked at once, before it is read, so a resume plan cannot race a live run; a new one is
    created (by `ensure`) only once the config has been checked: a refused start leaves no directory."""

    def __init__(self, run_dir: Path, env: DistEnv):
        self.run_dir, self.env = run_dir, env
        self.lock: RunLock | None = None
        if run_dir.exists():
            self.ensure()

    def ensure(self) -> RunLock | None:
        if self.lock is None and self.env.is_main:
            mkdir_durable(self.run_dir)  # fsyncs run_root_dir: the new run dir's entry survives a crash
            self.lock = RunLock.acquire(self.run_dir)
        return self.lock

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()


def check_resume_inputs(cfg: RunConfig, plan: ResumePlan, inputs: dict, changes: dict, log: Log) -> None:
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


@dataclass
class Start:
    """What every start has once its checks passed and it is recorded: data, inputs, statistics."""

    cfg: RunConfig
    env: DistEnv
    log: Log
    run_dir: Path
    plan: ResumePlan
    preemption: PreemptionFlag
    source: FrameSource
    inputs: dict[str, Any]
    stats: dict[str, Any]
    artifacts: Any = None  # ICSM artifacts (method runs)
    probe: Any = None  # probe set (method runs)
    all_stats: dict[str, Any] | None = None  # dataset_statistics.json's content {dataset_name: entry}
    eval_tasks: list[str] | None = None  # periodic evaluation's tasks (None: off)
    already_stopped: bool = False  # early stopping ended this run before; nothing was recorded


def record_checked_start(cfg: RunConfig, env: DistEnv, log: Log, run_dir: Path, plan: ResumePlan, changes: dict,
                         preemption: PreemptionFlag, lock: RunLock | None) -> Start:
    """Open the data (and the method's artifacts), check a resume's inputs, seed, then (rank 0, only
    once every check passed) rewind if asked and record the start. The run dir is locked. A LoRA
    checkpoint of a preset holds the adapter alone (the base is rebuilt from the seed), so where the
    base was drawn is a run input."""
    source = main_rank_first(env, lambda: open_training_data(cfg, log))
    artifacts = probe = None
    if cfg.method_enabled:  # before seeding: building the teacher must not shift the run's RNG
        from steadyvla.method.build_icsm import ensure_icsm, load_probe

        probe = load_probe(cfg, source)
        artifacts = main_rank_first(env, lambda: ensure_icsm(cfg, source, log, probe))
    base_init = env.device.type if cfg.use_lora and not cfg.vla_path else None
    inputs = collect_run_inputs(source, artifacts, probe, base_init)
    if plan.checkpoint is not None:
        check_resume_inputs(cfg, plan, inputs, changes, log)
    all_stats, stats_computed = action_statistics(cfg, source, run_dir, resuming=plan.checkpoint is not None)
    stats = all_stats[cfg.dataset_name]["action"]
    eval_tasks = periodic_eval_tasks(cfg, source, len(stats["q01"]), log)  # None: off
    start = Start(cfg, env, log, run_dir, plan, preemption, source, inputs, stats, artifacts, probe, all_stats,
                  eval_tasks)
    if eval_tasks and plan.checkpoint is not None:
        stopped = stopped_early_message(cfg, plan.state, eval_tasks, run_dir)
        if stopped is not None:
            log(stopped)
            start.already_stopped = True
            return start
    seed_everything(cfg.seed)
    if env.is_main:
        if plan.checkpoint is not None and plan.state.get("world_size", 1) != env.world_size:
            changes["world_size"] = {"checkpoint": plan.state.get("world_size", 1), "now": env.world_size}
            log(f"world size {changes['world_size']['checkpoint']} -> {env.world_size}: the global sample order "
                "continues where it stopped; the global batch is now batch_size x grad_accumulation_steps x "
                "world size")
        # only once every check passed: a refused start changes nothing on disk
        if lock is not None:
            lock.announce()
        apply_rewind(run_dir, plan, log)
        record_start(run_dir, cfg, resumed_from=str(plan.checkpoint) if plan.checkpoint else None,
                     resumed_step=plan.step, changes=changes,
                     rewind={"from": plan.rewind_from, "to": plan.checkpoint.name} if plan.rewind_from else None)
        if stats_computed:
            write_dataset_statistics(run_dir / DATASET_STATISTICS, all_stats)
    return start


def preflight(cfg: RunConfig, env: DistEnv, log: Callable[[str], None]) -> Preflight:
    """The memory preflight: stops the start (MemoryWillNotFit, exit 2) when the run will not fit,
    unless `force`."""
    report = preflight_for(cfg, env.device, env.world_size)
    enforce(report, cfg, log)
    return report


def train_on_data(start: Start, state: TrainState, train_model: torch.nn.Module, checkpointer: Any, tokenizer,
                  spec, action_tokenizer, memory_estimate=None) -> LoopResult:
    """Dataset, resumable sampler from the restored data position, loader, metrics logger; run the loop."""
    cfg, env = start.cfg, start.env
    # always OpenVLA's training prompt: `prompt_template` is the method's probe prompt (DESIGN.md §6)
    dataset = VLADataset(start.source, PromptBuilder(tokenizer), action_tokenizer, start.stats,
                         ImageTransform(spec, cfg.image_aug, cfg.seed))
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, rank=env.rank,
                                    world_size=env.world_size, start=state.data_position)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=PaddedCollator(int(tokenizer.pad_token_id)),
                        pin_memory=env.device.type == "cuda", persistent_workers=cfg.num_workers > 0,
                        # own generator: creating the iterator must not draw from the restored global RNG
                        generator=torch.Generator().manual_seed(cfg.seed),
                        worker_init_fn=ignore_preemption_signals if cfg.num_workers > 0 else None)
    logger = MetricsLogger(start.run_dir, resume_step=state.global_step, enabled=env.is_main)
    logger.load_state_dict(state.metrics_state)
    if cfg.use_wandb and env.is_main:
        from steadyvla.train.wandb_log import WandbTracker

        logger.tracker = WandbTracker(start.run_dir, cfg, start.log)
    try:
        result = run_loop(cfg, state, iter(loader), sampler, action_tokenizer, logger, checkpointer,
                          start.preemption, env, train_model, start.log, memory_estimate=memory_estimate)
    finally:
        checkpointer.wait()
        logger.close()
    result.memory_estimate = memory_estimate
    if not result.preempted and env.is_main:
        from steadyvla.report.summary import run_summary

        start.log(("stopped early: " if result.stopped_early else "done: ") + run_summary(start.run_dir))
    return result
