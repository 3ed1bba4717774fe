"""THE training loop, shared by LoRA baseline, the method (through hooks) and full training.

Per optimizer step: `grad_accumulation_steps` micro-batches (forward, backward), hooks, clip,
AdamW step, scheduler step, one metrics record; a checkpoint every `save_steps` optimizer steps,
at the last step, and when a preemption signal arrived.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from steadyvla.config import RunConfig
from steadyvla.data.sampler import ResumableBatchSampler
from steadyvla.distributed import DistEnv, any_rank, mean_across_ranks
from steadyvla.faults import fault_point
from steadyvla.memory_estimate import MemoryEstimate
from steadyvla.memory_runtime import memory_metrics
from steadyvla.model.action_tokenizer import ActionTokenizer
from steadyvla.parallel import gradient_sync
from steadyvla.train.checkpointing import TrainerCheckpointer, TrainState
from steadyvla.train.metrics import MetricsLogger, action_metrics, mean_metrics
from steadyvla.train.oom import StepStart, stop_after_oom
from steadyvla.train.signals import PreemptionFlag

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "labels")


@dataclass
class LoopResult:
    """How the loop ended."""

    final_step: int
    preempted: bool
    model: torch.nn.Module | None = None  # the trained model (set by the entry point)
    memory_estimate: MemoryEstimate | None = None  # the preflight's (set by the entry point)


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
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    train_model = train_model if train_model is not None else model
    train_model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.max_steps, initial=state.global_step, disable=not (cfg.progress_bar and env.is_main),
               desc="finetune", dynamic_ncols=True)
    try:
        while state.global_step < cfg.max_steps:
            step = state.global_step
            step_start = StepStart.capture(state, env)  # an OOM before the update goes back to it
            updating = False
            try:
                for hook in state.hooks:
                    hook.on_step_start(step)
                micro = []
                for i in range(cfg.grad_accumulation_steps):
                    batch = next(batches)
                    state.data_position = sampler.advance(state.data_position)
                    inputs = {k: batch[k].to(env.device, non_blocking=True) for k in MODEL_INPUTS}
                    last = i == cfg.grad_accumulation_steps - 1
                    # DDP / FSDP reduce gradients only on the last micro-batch of the step
                    with gradient_sync(train_model, last or not env.distributed):
                        output = train_model(**inputs)
                        (output.loss / cfg.grad_accumulation_steps).backward()
                    fault_point("backward", step + 1)  # tests: a gradient is partly accumulated here
                    micro.append(action_metrics(output, action_tokenizer))
                for hook in state.hooks:
                    hook.before_optimizer_step(step)
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm, foreach=False)
                lr = scheduler.get_last_lr()[0]
                updating = True
                optimizer.step()
            except torch.OutOfMemoryError as err:
                batch = inputs = output = None  # noqa: F841 - drop the failed step's tensors before saving
                raise stop_after_oom(err, cfg, state, step_start, not updating, checkpointer, logger, env,
                                     memory_estimate) from err
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step = step + 1
            metrics = mean_metrics(micro)
            for hook in state.hooks:
                metrics.update(hook.on_step_end(state.global_step))
            metrics = {**mean_across_ranks(metrics, env), "lr": lr, "epoch": state.data_position.epoch}
            state.last_metrics = metrics  # full-training checkpoint names carry the step's loss
            if state.global_step % cfg.log_every_steps == 0 or state.global_step == cfg.max_steps:
                logger.log(state.global_step, {**metrics, **memory_metrics(env.device)})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", lr=f"{lr:.2e}")
            checkpointer.check()  # a failed background save surfaces (and is retried) here
            preempted = any_rank(preemption.requested is not None, env)
            if state.global_step % cfg.save_steps == 0 or state.global_step == cfg.max_steps or preempted:
                state.metrics_state = logger.state_dict()
                logger.sync()
                checkpointer.save(state, blocking=preempted or state.global_step == cfg.max_steps)
            if preempted:
                log(f"steadyvla: preempted: checkpoint of step {state.global_step} is complete; exiting 0. "
                    "Run the same command again to continue.")
                return LoopResult(state.global_step, preempted=True)
    finally:
        bar.close()
    checkpointer.wait()
    return LoopResult(state.global_step, preempted=False)
