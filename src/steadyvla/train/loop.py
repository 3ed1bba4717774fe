"""THE training loop, shared by LoRA baseline, the method (through hooks) and full training.

Per optimizer step: `grad_accumulation_steps` micro-batches (forward, backward), hooks, clip,
AdamW step, scheduler step, one metrics record; a checkpoint every `save_steps` optimizer steps,
at the last step, when a preemption signal arrived, and where a hook asks for one (periodic eval
steps). A hook that asks to stop (early stopping) ends the run after a checkpoint of that step.

The host never waits for the device inside a step: a step's metrics stay device tensors, their
copy to the host is queued right behind the step's kernels, and its metrics.jsonl line is written
while the next step runs (or before a save, so every checkpoint's step has its line on disk); the
next batch's copy to the GPU runs on a side stream during the step before it (train/prefetch.py).
`step_time_s` is the wall time from the start of a step to the start of the next one, which the
device's pace sets once the host runs one step ahead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from steadyvla.config import RunConfig
from steadyvla.data.sampler import ResumableBatchSampler
from steadyvla.distributed import DistEnv, any_rank, mean_across_ranks
from steadyvla.memory_estimate import MemoryEstimate
from steadyvla.memory_runtime import memory_metrics
from steadyvla.model.action_tokenizer import ActionTokenizer
from steadyvla.parallel import gradient_sync
from steadyvla.train.checkpointing import TrainerCheckpointer, TrainState
from steadyvla.train.fast_paths import fused_enabled
from steadyvla.train.metrics import CKPT_BLOCKING_S, DATA_WAIT_S, STEP_TIME_S, MetricsInFlight, MetricsLogger
from steadyvla.train.oom import StepStart, stop_after_oom
from steadyvla.train.prefetch import prefetched
from steadyvla.train.signals import PreemptionFlag
from steadyvla.train.step import MODEL_INPUTS, accumulate_gradients, apply_update, finish_step  # noqa: F401

__all__ = ["LoopResult", "run_loop", "MODEL_INPUTS"]


@dataclass
class LoopResult:
    """How the loop ended."""

    final_step: int
    preempted: bool
    stopped_early: bool = False  # a hook (early stopping) ended the run before max_steps
    model: torch.nn.Module | None = None  # the trained model (set by the entry point)
    memory_estimate: MemoryEstimate | None = None  # the preflight's (set by the entry point)


@dataclass
class _PendingLine:
    """A logged step whose metrics.jsonl line waits until its device values are ready."""

    step: int
    metrics: MetricsInFlight  # its device values already on their way to the host
    started: float  # perf_counter at the start of the step
    ckpt_blocking_s: float | None  # of the save before this step, if any
    data_wait_s: float  # the host's wait for this step's batches


class _LineWriter:
    """Writes pending lines: one device read per line, memory and timing keys added."""

    def __init__(self, logger: MetricsLogger, bar: tqdm, env: DistEnv):
        self.logger, self.bar, self.env = logger, bar, env
        self.pending: _PendingLine | None = None

    def write_pending(self, next_started: float | None = None) -> None:
        """Write the pending line; its step ended when the next one started (`next_started`), or
        now (the read waits for the device, so "now" is the step's true end)."""
        line, self.pending = self.pending, None
        if line is None:
            return
        values = line.metrics.values()
        ended = next_started if next_started is not None else time.perf_counter()
        record = {**values, **memory_metrics(self.env.device), STEP_TIME_S: ended - line.started,
                  DATA_WAIT_S: line.data_wait_s}
        if line.ckpt_blocking_s is not None:
            record[CKPT_BLOCKING_S] = line.ckpt_blocking_s
        self.logger.log(line.step, record)
        self.bar.set_postfix(loss=f"{values['train_loss']:.4f}", lr=f"{values['lr']:.2e}")


class _TimedBatches:
    """The loader's iterator, adding up how long the host waits in `next` (a data-bound run waits
    for a large part of `step_time_s`: more `num_workers` would help)."""

    def __init__(self, batches: Iterator[dict[str, torch.Tensor]]):
        self.batches, self.waited = batches, 0.0

    def __iter__(self) -> "_TimedBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - started

    def take(self) -> float:
        """The wait since the last call."""
        waited, self.waited = self.waited, 0.0
        return waited


def run_loop(
    cfg: RunConfig,
    state: TrainState,
    batches: Iterator[dict[str, torch.Tensor]],
    sampler: ResumableBatchSampler,
    action_tokenizer: ActionTokenizer,
    logger: MetricsLogger,
    checkpointer: TrainerCheckpointer,
    preemption: PreemptionFlag,
    env: DistEnv,
    train_model: torch.nn.Module | None = None,
    log: Callable[[str], None] = print,
    memory_estimate: MemoryEstimate | None = None,
) -> LoopResult:
    """Train from `state.global_step` to `cfg.max_steps` (or until preempted). `train_model` is
    what the forward runs through (the DDP wrapper under torchrun); defaults to `state.model`."""
    model = state.model
    train_model = train_model if train_model is not None else model
    train_model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    foreach_clip = fused_enabled(cfg, env.device)
    bar = tqdm(total=cfg.max_steps, initial=state.global_step, disable=not (cfg.progress_bar and env.is_main),
               desc="finetune", dynamic_ncols=True)
    lines = _LineWriter(logger, bar, env)
    timed = _TimedBatches(batches)
    batches = prefetched(timed, env.device, MODEL_INPUTS)  # the next batch copied during this step
    checkpointer.before_commit = logger.sync  # metrics lines durable before each checkpoint commits
    ckpt_blocking_s: float | None = None
    try:
        while state.global_step < cfg.max_steps:
            started = time.perf_counter()
            step_start = StepStart.capture(state, env)  # an OOM before the update goes back to it
            updating = False

            def mark_updating() -> None:
                nonlocal updating
                updating = True

            try:
                metrics = accumulate_gradients(cfg, state, batches, sampler, action_tokenizer, env, train_model)
                data_wait_s = timed.take()
                checkpointer.before_update()  # the last save's copies must finish before the update
                lr = apply_update(cfg, state, trainable, foreach_clip=foreach_clip, starting_update=mark_updating)
            except torch.OutOfMemoryError as err:
                metrics = None  # noqa: F841 - drop the failed step's tensors before saving
                lines.write_pending()  # the last completed step's line comes before its checkpoint
                raise stop_after_oom(err, cfg, state, step_start, not updating, checkpointer, logger, env,
                                     memory_estimate) from err
            finish_step(state)
            checkpointer.prepare(state)  # pinned host buffers for every save, once the optimizer has state
            for hook in state.hooks:
                metrics.update(hook.on_step_end(state.global_step))
            metrics = {**mean_across_ranks(metrics, env), "lr": lr, "epoch": state.data_position.epoch}
            boundary: dict[str, float] = {}  # equal on every rank already (e.g. evaluation results)
            for hook in state.hooks:
                boundary.update(hook.at_step_boundary(state.global_step))
            metrics.update(boundary)
            state.last_metrics = metrics  # full-training checkpoint names carry the step's loss
            last = state.global_step == cfg.max_steps
            lines.write_pending(next_started=started)  # the previous step's line, while this step runs
            if boundary or state.global_step % cfg.log_every_steps == 0 or last:
                lines.pending = _PendingLine(state.global_step, MetricsInFlight(metrics), started, ckpt_blocking_s,
                                             data_wait_s)
                ckpt_blocking_s = None
            bar.update(1)
            checkpointer.check()  # a failed background save surfaces (and is retried) here
            preempted = any_rank(preemption.requested is not None, env)
            stopping = [hook for hook in state.hooks if hook.should_stop()]  # same on every rank
            hook_save = any(hook.wants_checkpoint(state.global_step) for hook in state.hooks)
            if state.global_step % cfg.save_steps == 0 or last or preempted or stopping or hook_save:
                lines.write_pending()  # every checkpoint's step has its line on disk
                save_started = time.perf_counter()
                state.metrics_state = logger.state_dict()
                checkpointer.save(state, blocking=preempted or last or bool(stopping))
                ckpt_blocking_s = time.perf_counter() - save_started
            if preempted:
                log(f"steadyvla: preempted: checkpoint of step {state.global_step} is complete; exiting 0. "
                    "Run the same command again to continue.")
                return LoopResult(state.global_step, preempted=True)
            if stopping:
                lines.write_pending()
                checkpointer.wait()
                log(f"steadyvla: {'; '.join(hook.stop_message() for hook in stopping)}. Checkpoint of step "
                    f"{state.global_step} is complete; exiting 0.")
                return LoopResult(state.global_step, preempted=False, stopped_early=True)
    finally:
        bar.close()
    lines.write_pending()
    checkpointer.wait()
    return LoopResult(state.global_step, preempted=False)
