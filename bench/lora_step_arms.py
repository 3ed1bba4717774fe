"""Parts of bench/lora_throughput.py: the fixed batch, the FLOP count, and the timed step arms
(the OpenVLA-style reference loop and steadyvla's own step) on one shared base model.

FLOPs of one training step (`step_flops`), counted once from the model's modules, the same
number for every arm (it is the work the step needs, not what an arm happens to execute):

    F = sum over frozen Linear layers  4 * n_in * n_out * tokens      (forward 2x + input-grad 2x)
      + sum over LoRA A/B Linear layers 6 * n_in * n_out * tokens     (forward + input-grad + weight-grad)
      + sum over attention layers      12 * B * S^2 * d               (QK^T, PV: 4BS^2d forward, 2x in backward)

with `tokens` the rows a layer sees: B*L for the LLM (L = 256 patches + padded text length T),
B*S_tower for each ViT block whose output is used (S = patches + prefix tokens; features come from
the second-to-last block, where both arms' towers stop; OpenVLA's timm also ran the last block, under
1 % of the step, not modelled; SigLIP's pooling head never runs), B*256 for the projector,
and B*(T-1) for the LM head: the positions a label can be at (the head at the 256 patch positions,
which the reference computes, is wasted work and not counted). Frozen weights get no weight
gradient, so 6*N*tokens (dense training) over-counts LoRA fine-tuning by ~1/3. Attention is
counted full (causal masking not subtracted), the patch-embedding convolutions, norms,
activations and the optimizer are not counted (< 1%). MFU = F / (s/step) / peak bf16 FLOP/s.
"""

from __future__ import annotations

import gc
import itertools
import re
import statistics
import time
from typing import Callable

import torch
from torch import nn

from steadyvla.config import RunConfig
from steadyvla.data.sampler import DataPosition, ResumableBatchSampler
from steadyvla.model.action_tokenizer import ActionTokenizer
from steadyvla.model.prompt import IGNORE_INDEX, PromptBuilder
from steadyvla.train.checkpointing import TrainState
from steadyvla.train.fast_paths import apply_fast_paths, compile_blocks, fused_enabled
from steadyvla.train.metrics import MetricsInFlight
from steadyvla.train.optim import build_optimizer, build_scheduler
from steadyvla.train.prefetch import prefetched
from steadyvla.train.step import MODEL_INPUTS, accumulate_gradients, apply_update, finish_step

INSTRUCTIONS = ["pick up the red block and put it in the bowl", "open the top drawer", "push the puck to the goal",
                "press the button on the left of the table"]
GIB = 2**30


def fixed_batch(tokenizer, action_tokenizer: ActionTokenizer, image_size: int, batch_size: int) -> dict[str, torch.Tensor]:
    """A collated batch as the DataLoader gives it (CPU, right-padded prompts, 7 action tokens + EOS)."""
    builder = PromptBuilder(tokenizer)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(batch_size):
        actions = torch.randint(action_tokenizer.first_action_id, action_tokenizer.vocab_end, (7,), generator=g)
        rows.append(builder.build(INSTRUCTIONS[i % len(INSTRUCTIONS)], actions.numpy()))
    length = max(len(r.input_ids) for r in rows)
    ids = torch.full((batch_size, length), int(tokenizer.pad_token_id))
    labels = torch.full((batch_size, length), IGNORE_INDEX)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.as_tensor(r.input_ids)
        labels[i, : len(r.labels)] = torch.as_tensor(r.labels)
    return {"input_ids": ids, "labels": labels, "attention_mask": (ids != tokenizer.pad_token_id).long(),
            "pixel_values": torch.randn(batch_size, 6, image_size, image_size, generator=g)}


def step_flops(model: nn.Module, batch_size: int, text_len: int) -> float:
    """FLOPs of one training step of the PEFT-wrapped VLA (formula in the module docstring)."""
    vla = model.get_base_model() if hasattr(model, "get_base_model") else model
    patches, llm_len = vla.num_patches, vla.num_patches + text_len
    towers = {"featurizer": vla.vision_backbone.featurizer, "fused_featurizer": vla.vision_backbone.fused_featurizer}

    def rows(name: str) -> int:
        if name.startswith("language_model.model.layers."):
            return batch_size * llm_len
        if name.startswith("language_model.lm_head"):
            return batch_size * (text_len - 1)
        if name.startswith("projector."):
            return batch_size * patches
        match = re.match(r"vision_backbone\.(featurizer|fused_featurizer)\.blocks\.(\d+)\.", name)
        if match:
            tower = towers[match.group(1)]
            runs = int(match.group(2)) < len(tower.blocks) - 1
            return batch_size * (patches + tower.num_prefix_tokens) if runs else 0
        return 0

    total = 0.0
    for name, module in vla.named_modules():
        if isinstance(module, nn.Linear):
            lora = ".lora_A." in name or ".lora_B." in name
            total += (6 if lora else 4) * module.in_features * module.out_features * rows(name)
    cfg = vla.language_model.config
    total += cfg.num_hidden_layers * 12 * batch_size * llm_len**2 * cfg.hidden_size
    for tower in towers.values():
        if tower is not None:
            seq = patches + tower.num_prefix_tokens
            total += (len(tower.blocks) - 1) * 12 * batch_size * seq**2 * tower.embed_dim
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_alloc_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 2)}


def uncompile(model: nn.Module) -> None:
    """Undo `nn.Module.compile()` on every block and drop dynamo's caches (between arms)."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    torch._dynamo.reset()


def summarise(times: list[float], first_s: float, batch_size: int, flops: float, peak_tflops: float | None) -> dict:
    """Median s/step over the measured steps, samples/s, achieved TFLOP/s and MFU."""
    median = statistics.median(times)
    out = {"steps": len(times), "s_per_step_median": round(median, 4), "s_per_step_mean": round(sum(times) / len(times), 4),
           "samples_per_s": round(batch_size / median, 2), "first_step_s": round(first_s, 2),
           "tflops_per_s": round(flops / median / 1e12, 1)}
    if peak_tflops:
        out["mfu"] = round(flops / median / (peak_tflops * 1e12), 4)
    return out


def run_reference(model: nn.Module, cfg: RunConfig, batch: dict[str, torch.Tensor], device: torch.device, *,
                  compiled: bool, warmup: int, steps: int, profile: Callable | None = None) -> tuple[list[float], float]:
    """The OpenVLA-style loop (HF + PEFT): full-sequence logits and CE inside the model's forward,
    backward, AdamW (torch default: foreach) step, zero_grad, `loss.item()` every step (OpenVLA
    keeps a deque of recent losses). Compiled = the same loop with every block compiled (regional;
    a whole-model compile of the 7B takes minutes). Returns (per-step seconds, first-step seconds)."""
    vla = model.get_base_model()
    vla.text_logits_only = False
    if compiled:
        compile_blocks(vla)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    dtype = vla.projector.fc1.weight.dtype

    def one_step() -> None:
        inputs = {k: v.to(device) for k, v in batch.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    try:
        return _timed(one_step, device, warmup, steps, profile)
    finally:
        del optimizer
        uncompile(vla)


def run_steadyvla_step(model: nn.Module, cfg: RunConfig, batch: dict[str, torch.Tensor], device: torch.device,
                       action_tokenizer: ActionTokenizer, *, warmup: int, steps: int,
                       profile: Callable | None = None) -> tuple[list[float], float]:
    """steadyvla's loop body (train/step.py) on the fixed batch with `cfg`'s fast-path keys: pinned
    batch copied ahead on a side stream, metrics as device tensors read one step later (as the loop writes
    its metrics lines), clipping, AdamW, scheduler. Returns (per-step seconds, first-step seconds)."""
    from steadyvla.distributed import DistEnv

    apply_fast_paths(model, cfg, device)
    optimizer = build_optimizer(model, cfg, fused=fused_enabled(cfg, device))
    state = TrainState(model, optimizer, build_scheduler(optimizer, cfg), DataPosition())
    sampler = ResumableBatchSampler(10_000, batch["input_ids"].shape[0], seed=0)
    pinned = {k: (v.pin_memory() if device.type == "cuda" else v) for k, v in batch.items()}
    batches = prefetched(itertools.repeat(pinned), device, MODEL_INPUTS)  # as the loop does
    env = DistEnv(device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    pending: list[MetricsInFlight] = []

    def one_step() -> None:
        metrics = accumulate_gradients(cfg, state, batches, sampler, action_tokenizer, env, model)
        lr = apply_update(cfg, state, trainable, foreach_clip=fused_enabled(cfg, device))
        finish_step(state)
        if pending:
            pending.pop().values()
        pending.append(MetricsInFlight({**metrics, "lr": lr}))

    try:
        times, first = _timed(one_step, device, warmup, steps, profile)
        if pending:
            pending.pop().values()
        return times, first
    finally:
        del optimizer, state
        uncompile(model.get_base_model())


def _timed(one_step: Callable[[], None], device: torch.device, warmup: int, steps: int,
           profile: Callable | None) -> tuple[list[float], float]:
    """Host wall time from one step's start to the next (a pipelined step's true pace), after
    `warmup` steps; the first step (compilation) is timed on its own, synchronised. `profile`
    (if given) is then called with the step function (see `profile_table`)."""
    sync(device)
    t0 = time.perf_counter()
    one_step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        one_step()
    sync(device)
    times = []
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
        now = time.perf_counter()
        times.append(now - start)
        start = now
    sync(device)
    times[-1] += time.perf_counter() - start  # the last step's tail on the device
    if profile is not None:
        profile(one_step)
    return times, first



def profile_table(one_step: Callable[[], None], device: torch.device, steps: int = 3,
                  rows: int = 25) -> tuple[str, dict]:
    """torch.profiler over `steps` steps: the top ops by self device time (CPU time on CPU), followed
    on CUDA by the device timeline (bench/timeline.py: busy share, time per kernel kind, idle gaps).
    Returns the printable text and the timeline summary."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from timeline import analyse_trace, format_timeline

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            one_step()
        sync(device)
        wall_s = time.perf_counter() - started
    averages = prof.key_averages()
    # the wall time the table's totals are spent in (with compiled graphs the footer's device total also
    # counts the kernels inside each graph's range, so it overstates how busy the device was)
    header = f"profiled wall time: {wall_s:.4f} s for {steps} steps ({wall_s / steps:.4f} s/step)\n"
    table = averages.table(row_limit=rows)
    keys = ["self_cuda_time_total", "self_device_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]
    for key in keys:
        try:
            table = averages.table(sort_by=key, row_limit=rows, max_name_column_width=60)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    timeline: dict = {}
    if device.type == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            trace = f"{tmp}/trace.json"
            prof.export_chrome_trace(trace)
            timeline = analyse_trace(trace, wall_s, steps)
        table += "\n" + format_timeline(timeline)
    return header + table, timeline
