"""The per-step code of THE loop (train/loop.py), in two halves the loop wraps with its OOM, save
and logging logic, and the throughput bench (bench/lora_throughput.py) calls as they are.

Nothing here waits for the device: inputs are copied with `non_blocking` (the DataLoader pins
them on CUDA), metrics stay device tensors, gradient clipping keeps its norm on the device.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from steadyvla.config import RunConfig
from steadyvla.data.sampler import ResumableBatchSampler
from steadyvla.distributed import DistEnv
from steadyvla.faults import fault_point
from steadyvla.model.action_tokenizer import ActionTokenizer
from steadyvla.parallel import gradient_sync
from steadyvla.train.checkpointing import TrainState
from steadyvla.train.fast_paths import uses_cuda_graphs
from steadyvla.train.metrics import action_metrics, mean_metrics

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "labels")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's inputs of a collated batch on `device` (asynchronous from pinned memory)."""
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS}


def accumulate_gradients(cfg: RunConfig, state: TrainState, batches: Iterator[dict[str, torch.Tensor]],
                         sampler: ResumableBatchSampler, action_tokenizer: ActionTokenizer, env: DistEnv,
                         train_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """First half of optimizer step `state.global_step`: the hooks' step start, then forward and
    backward of `grad_accumulation_steps` micro-batches. Returns the step's mean metrics (device
    tensors)."""
    step = state.global_step
    for hook in state.hooks:
        hook.on_step_start(step)
    micro = []
    cuda_graphs = uses_cuda_graphs(cfg, env.device)
    for i in range(cfg.grad_accumulation_steps):
        batch = next(batches)
        state.data_position = sampler.advance(state.data_position)
        inputs = to_device(batch, env.device)
        last = i == cfg.grad_accumulation_steps - 1
        # DDP / FSDP reduce gradients only on the last micro-batch of the step
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last micro-batch's graph outputs are dead
        with gradient_sync(train_model, last or not env.distributed):
            output = train_model(**inputs)
            (output.loss / cfg.grad_accumulation_steps).backward()
        fault_point("backward", step + 1)  # tests: a gradient is partly accumulated here
        micro.append(action_metrics(output, action_tokenizer))
    return mean_metrics(micro)


def apply_update(cfg: RunConfig, state: TrainState, trainable: list[torch.nn.Parameter], *,
                 foreach_clip: bool = False, starting_update: Callable[[], None] = lambda: None) -> float:
    """Second half: the hooks' pre-update work, gradient clipping, the AdamW update. Returns the
    learning rate the update used. `starting_update` runs right before `optimizer.step()` (from
    there on the step cannot be undone)."""
    step = state.global_step
    for hook in state.hooks:
        hook.before_optimizer_step(step)
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm, foreach=foreach_clip)
    lr = state.scheduler.get_last_lr()[0]
    starting_update()
    state.optimizer.step()
    return lr


def finish_step(state: TrainState) -> None:
    """After the update: advance the schedule and the step counter, drop the gradients."""
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
