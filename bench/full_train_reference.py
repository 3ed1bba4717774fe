"""The OpenVLA-style reference arm of bench/full_train.py: a plain FSDP2 training loop and its checkpoint.

What OpenVLA's (prismatic's) FSDP trainer does, in FSDP2 terms: every LLM decoder layer and every
ViT block `fully_shard`ed, then the root (full shard); bf16 compute with float32 master weights and
float32 gradient reduction; activation checkpointing of the LLM layers; AdamW; a fixed batch.
Its checkpoint: the full model state dict gathered to rank 0 on the CPU
(`get_model_state_dict(full_state_dict=True, cpu_offload=True)`), written with safetensors on the
training thread (model only, no optimizer, no fsync); loading reads the whole file on every rank
and `set_model_state_dict`s it. Run by bench/full_train.py in its own process (so its GPU memory
is gone before the steadyvla arm starts); one process, a 1-rank NCCL (GPU) or gloo (CPU) group.
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from steadyvla.config import build_config
from steadyvla.memory_runtime import peak_rss
from steadyvla.model.build import build_vla, load_tokenizer
from steadyvla.model.prompt import IGNORE_INDEX, PromptBuilder
from steadyvla.train.finetune import enable_activation_checkpointing

GIB = 2**30
INSTRUCTIONS = ("pick up the red block", "open the top drawer", "push the puck to the goal", "press the button")
ACTION_DIMS = 7


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_batch(tokenizer, image_size: int, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A training batch as the data pipeline makes it: OpenVLA prompts with 7 action tokens + </s>,
    6-channel images of the model's input size (random values; the speed does not depend on them)."""
    builder = PromptBuilder(tokenizer)
    g = torch.Generator().manual_seed(0)
    end = int(tokenizer.vocab_size)
    actions = [torch.randint(end - 256, end, (ACTION_DIMS,), generator=g).numpy() for _ in range(batch_size)]
    rows = [builder.build(INSTRUCTIONS[i % len(INSTRUCTIONS)], a) for i, a in enumerate(actions)]
    length = max(len(r.input_ids) for r in rows)
    ids = torch.full((batch_size, length), int(tokenizer.pad_token_id))
    labels = torch.full((batch_size, length), IGNORE_INDEX)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)], labels[i, : len(r.labels)] = r.input_ids, r.labels
    pixels = torch.randn(batch_size, 6, image_size, image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": (ids != tokenizer.pad_token_id).long().to(device),
            "labels": labels.to(device), "pixel_values": pixels.to(device)}


def shard_model(model: torch.nn.Module, compute_dtype: torch.dtype, reshard_after_forward: bool = True) -> int:
    """FSDP2 per LLM decoder layer and ViT block, then the root; returns the number of sharded blocks."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    blocks = [m for m in model.modules() if isinstance(m, (LlamaDecoderLayer, Block))]
    for block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root (embedding, LM head, projector) stays unsharded after forward, as FSDP1's root did:
    # the model returns a dataclass, which FSDP2 does not search for tensors, so no pre-backward
    # hook would gather a resharded root again (on CUDA: "setStorage ... storage of size 0").
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    return len(blocks)


def _save_openvla_way(model: torch.nn.Module, path: Path, device: torch.device) -> dict[str, float]:
    _sync(device)
    t0 = time.perf_counter()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    t1 = time.perf_counter()
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    dist.barrier()
    t2 = time.perf_counter()
    return {"gather_s": t1 - t0, "write_s": t2 - t1, "blocking_s": t2 - t0}


def _load_openvla_way(model: torch.nn.Module, path: Path, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    state = load_file(str(path))  # every rank reads the whole file, as the upstream resume does
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    _sync(device)
    return time.perf_counter() - t0


def run_reference(preset: str, tokenizer_path: str | None, batch_size: int, warmup: int, steps: int,
                  device: str, compute_dtype: str, activation_checkpointing: bool, learning_rate: float,
                  save_repeats: int, work_dir: Path, seed: int = 7) -> dict:
    """Train `warmup + steps` steps on a fixed batch, then save and load the OpenVLA way; the numbers."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        cfg = build_config(dict(model_preset=preset, tokenizer_path=tokenizer_path, dtype="float32", seed=seed))
        tokenizer = load_tokenizer(cfg)
        model = build_vla(cfg, tokenizer, dev).train()  # float32 master weights
        n_params = sum(p.numel() for p in model.parameters())
        if activation_checkpointing:
            enable_activation_checkpointing(model.language_model)
        blocks = shard_model(model, getattr(torch, compute_dtype))
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
        batch = fixed_batch(tokenizer, model.spec.image_size, batch_size, dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times, losses = [], []
        for _ in range(warmup + steps):
            _sync(dev)
            t0 = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(dev)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        timed = times[warmup:]
        peaks = ({"gpu_peak_alloc_gib": torch.cuda.max_memory_allocated(dev) / GIB,
                  "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / GIB} if dev.type == "cuda" else {})
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            path = Path(tmp) / "model.safetensors"
            saves = [_save_openvla_way(model, path, dev) for _ in range(save_repeats)]
            ckpt_bytes = path.stat().st_size
            load_s = _load_openvla_way(model, path, dev)
        median = statistics.median
        return {
            "preset": preset, "parameters": n_params, "sharded_blocks": blocks, "batch_size": batch_size,
            "compute_dtype": compute_dtype, "activation_checkpointing": activation_checkpointing,
            "steps_timed": len(timed), "s_per_step": median(timed), "samples_per_s": batch_size / median(timed),
            "step_times_s": timed, "losses": losses, **peaks, "host_peak_rss_gib": peak_rss() / GIB,
            "save_blocking_s": median(s["blocking_s"] for s in saves),
            "save_gather_s": median(s["gather_s"] for s in saves),
            "save_write_s": median(s["write_s"] for s in saves), "checkpoint_gib": ckpt_bytes / GIB,
            "load_s": load_s,
        }
    finally:
        dist.destroy_process_group()
