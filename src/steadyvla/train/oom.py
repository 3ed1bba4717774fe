"""A CUDA out-of-memory error inside a step: put the state back to the last completed step, save it,
explain, stop.

Between optimizer steps the state is consistent; inside one it is not: micro-batches were drawn (the
data position moved), the RNG drew dropout masks, the method's hooks measured drift, gradients were
partly accumulated. `StepStart` records the few things that move before the update (cheap: RNG
states and small hook state), so an OOM before `optimizer.step()` can be undone exactly and the
checkpoint is the one an uninterrupted run would have written after that step. An OOM inside
`optimizer.step()` (AdamW allocates its moments at the first step) may have updated some parameters
already: nothing is saved then, and the previous checkpoint stands.
"""

from __future__ import annotations

import copy
import gc
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, step_dir_name
from steadyvla.checkpoint.state import restore_rng, snapshot_rng
from steadyvla.data.sampler import DataPosition
from steadyvla.distributed import DistEnv
from steadyvla.memory_estimate import GIB, MemoryEstimate
from steadyvla.memory_runtime import gpu_peaks, peak_rss

EXIT_HINT = "Run the same command (with one of these changes where they apply) to continue from there."


class StepOutOfMemory(RuntimeError):
    """Training stopped on an out-of-memory error; the message says where, the peaks and the knobs."""


@dataclass
class StepStart:
    """What a step changes before its update: restored on an OOM so the state is the previous step's."""

    data_position: DataPosition
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]]
    hooks: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]

    @classmethod
    def capture(cls, state, env: DistEnv) -> "StepStart":
        hooks = []
        for hook in state.hooks:
            tensors, meta = hook.state_dict()
            hooks.append(({k: v.detach().clone() for k, v in tensors.items()}, copy.deepcopy(meta)))
        return cls(state.data_position, snapshot_rng(env.rank), hooks)

    def restore(self, state, env: DistEnv) -> None:
        state.data_position = self.data_position
        restore_rng(env.rank, *self.rng)
        for hook, (tensors, meta) in zip(state.hooks, self.hooks):
            hook.load_state_dict(tensors, meta)


def _knobs(cfg) -> list[str]:
    knobs = []
    if cfg.batch_size > 1:
        smaller = cfg.batch_size // 2
        knobs.append(f"--batch_size {smaller} --grad_accumulation_steps "
                     f"{cfg.grad_accumulation_steps * cfg.batch_size // smaller} (keeps the global batch when "
                     "batch_size is even; a new run_id: both are resume-critical)")
    if not cfg.activation_checkpointing:
        knobs.append("--activation_checkpointing true (resumes fine: not resume-critical)")
    if cfg.method_enabled and cfg.probe_batch_size > 1:
        knobs.append(f"--probe_batch_size {max(1, cfg.probe_batch_size // 2)} (a new run_id: resume-critical)")
    return knobs


def stop_after_oom(err: BaseException, cfg, state, start: StepStart, consistent: bool, checkpointer, logger,
                   env: DistEnv, estimate: MemoryEstimate | None) -> StepOutOfMemory:
    """Free what can be freed, save the last completed step if the state can be put back, and return
    the error to raise (its message: step, peaks, estimate, knobs)."""
    step = state.global_step  # completed steps; the failed one is step + 1
    state.optimizer.zero_grad(set_to_none=True)  # the partly accumulated gradient of the failed step
    traceback.clear_frames(err.__traceback__)  # the failed forward's frames hold its activations
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    peaks = gpu_peaks(env.device)
    if peaks:
        capacity = torch.cuda.get_device_properties(env.device).total_memory
        where = (f"GPU peak {peaks[0] / GIB:.2f} GiB allocated, {peaks[1] / GIB:.2f} GiB reserved of "
                 f"{capacity / GIB:.1f} GiB")
    else:
        where = f"host peak RSS {peak_rss() / GIB:.2f} GiB"
    if estimate is not None:
        total = estimate.device_total if estimate.on_gpu else estimate.host_total
        where += f"; the preflight estimated {total / GIB:.2f} GiB"
    name = f"{CHECKPOINTS_DIR}/{step_dir_name(step)}"
    if not consistent:
        saved = (f"the optimizer update had started, so step {step} cannot be saved exactly; the newest complete "
                 "checkpoint stands")
    elif env.distributed:
        saved = ("under data parallelism the other ranks may be waiting in a collective, so nothing is saved; the "
                 "newest complete checkpoint stands")
    elif step == 0:
        saved = "no step had completed: nothing to save"
    else:
        start.restore(state, env)
        checkpointer.wait()
        if checkpointer.manager.read_latest() == step_dir_name(step):
            saved = f"checkpoint {name} (the last completed step) was already complete"
        else:
            state.metrics_state = logger.state_dict()
            checkpointer.save(state, blocking=True)
            saved = f"saved checkpoint {name} (the last completed step)"
    knobs = "\n".join(f"  {k}" for k in _knobs(cfg))
    message = (f"out of memory in step {step + 1} ({type(err).__name__}); {where}. {saved}. Options:\n{knobs}\n"
               f"{EXIT_HINT}")
    return StepOutOfMemory(message)
