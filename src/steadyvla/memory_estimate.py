"""Preflight memory estimate: peak GPU and host bytes of a run, from the config alone.

The model is built on the `meta` device (no memory, a second for 7B) to count parameters exactly;
everything else is a short formula over the shapes, one named component each, so the table says
where the memory goes. Formulas (bytes; e = bytes per element of `dtype`, b = micro-batch,
s = sequence length = num_patches + PROMPT_TOKENS, h/i/L/V = LLM hidden/intermediate/layers/vocab):

- weights: every base parameter × e.  LoRA parameters, their gradients and AdamW's two moments:
  trainable × 4 × 4 (PEFT keeps adapters in float32).  Under FSDP all of it is divided by the
  world size (`fsdp=True`; the parameter exists for full training, LoRA DDP does not shard).
- activations kept for backward, per LLM layer and token: (10·h + 4·i) × e (norm in/out, q, k, v,
  rotary q/k, attention out, o_proj in, residual; gate, up, silu, product), plus, when the base is
  bf16/fp16, the float32 copy of each adapted linear layer's input that PEFT's float32 adapters keep
  for their backward: (6·h + i) × 4 (q, k, v, o, gate, up: h each; down: i) — without it the
  estimate was 21 % low at micro-batch 16 on an H100 (docs/PERFORMANCE.md); with activation
  checkpointing only the layer input (h × e) per layer plus one layer recomputed in full.
  Vision towers (their LoRA adapters train, so they keep activations too): (8·d + 2·m) × e per
  block and token (d = width, m = MLP width), for the blocks up to the second-to-last.
  Logits: b·s·V × (2e + 8) (the logits, the shifted slice, float32 copy and its softmax grad).
- full training (`use_lora: false`): float32 master weights (all parameters, frozen parts too),
  float32 gradients and AdamW's two moments of the trainable ones, divided by the ranks one copy is
  sharded over under FSDP; with DDP and a bf16 `dtype`, autocast's bf16 copy of every weight kept
  for backward. Activations as above without PEFT's float32 copies; with activation checkpointing
  the ViT blocks keep only their inputs too. Host: a save copies this rank's model + AdamW state
  (async: into buffers reserved once). Measured on an H100 (vla-1b, batch 8, FSDP on one rank,
  activation checkpointing): 27.7 GiB peak allocated, the estimate 28.3 (docs/PERFORMANCE.md).
- LoRA saves: adapter + AdamW moments are gathered in a flat device buffer (trainable × 4 × 3) before
  one copy per dtype to pinned host memory of the same size (checkpoint/flat_staging.py).
- the method's probe forward (no grad, eval): every layer's hidden state (output_hidden_states) +
  logits for probe_batch_size × s; it runs between steps, so the peak is max(train, probe).
- host: the Python/torch/transformers/timm baseline is measured, not modelled (see
  `memory_report.measure_baseline`); on CPU every device component above is host memory too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from steadyvla.config import ConfigError, RunConfig

GIB = 2**30
MIB = 2**20
PROMPT_TOKENS = 48  # BOS + "In: What action should the robot take to ...?\nOut:" + 7 actions + EOS
LLAMA2_VOCAB = 32001  # Llama-2 tokenizer + <PAD>, for presets whose tokenizer is not at hand
ADAM_MOMENTS = 2
LORA_BYTES = 4  # float32 adapters
MASTER_BYTES = 4  # full training's float32 master weights, gradients and AdamW moments
PREFETCH_FACTOR = 2  # DataLoader default: batches in flight per worker
# Measured on CPU with the tiny preset (812 -> 919 MiB RSS): lazily imported code paths, tokenizer,
# allocator arenas and thread pools that appear with the first model build and step.
RUNTIME_OVERHEAD_BYTES = 110 * MIB
# A DataLoader worker is a forked interpreter: its own touched pages, decode buffers (not calibrated).
WORKER_BYTES = 300 * MIB
# The CUDA context and its libraries (cuBLAS, cuDNN kernels) in host memory (not calibrated here).
CUDA_CONTEXT_HOST_BYTES = 1 * GIB
# Allocator fragmentation / cuBLAS workspaces on the device: reserved exceeds allocated by this share.
GPU_RESERVE_FACTOR = 1.1


@dataclass(frozen=True)
class TowerShape:
    """One vision tower: blocks that run (up to the second-to-last), width, MLP width, tokens."""

    blocks: int
    width: int
    mlp_width: int
    tokens: int


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need to know about the model."""

    base_params: int
    trainable_params: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    num_patches: int
    image_size: int
    towers: tuple[TowerShape, ...]


@dataclass
class MemoryEstimate:
    """Estimated peak bytes per component, on the device (empty on CPU) and on the host."""

    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    on_gpu: bool = False
    seq_len: int = 0

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def model_spec_for(cfg: RunConfig):
    """The VLASpec a start would build: `vla_path`'s config.json, else the preset sized to its tokenizer
    (Llama-2's vocabulary when the tokenizer is not at hand: the estimate needs only the size)."""
    from steadyvla.model.build import load_tokenizer, model_spec
    from steadyvla.model.presets import get_preset

    try:
        return model_spec(cfg, load_tokenizer(cfg))
    except (ConfigError, OSError):
        return get_preset(cfg.model_preset).spec(LLAMA2_VOCAB, LLAMA2_VOCAB - 1)


def model_shape(cfg: RunConfig) -> ModelShape:
    """Count parameters on the meta device and read the shapes the formulas need."""
    from peft import get_peft_model

    from steadyvla.model.build import lora_config
    from steadyvla.model.vla import VLA

    spec = model_spec_for(cfg)
    with torch.device("meta"):
        vla = VLA(spec)
        if cfg.use_lora:
            model = get_peft_model(vla, lora_config(cfg))
        else:
            from steadyvla.parallel import freeze_parts

            freeze_parts(vla, cfg)
            model = vla
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters()) - trainable
    towers = []
    for tower in vla.vision_backbone._towers():
        block = tower.blocks[0]
        towers.append(TowerShape(blocks=len(tower.blocks) - 1, width=tower.embed_dim,
                                 mlp_width=block.mlp.fc1.out_features,
                                 tokens=tower.patch_embed.num_patches + tower.num_prefix_tokens))
    llm = vla.language_model.config
    return ModelShape(base, trainable, llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers,
                      llm.vocab_size, vla.num_patches, spec.image_size, tuple(towers))


def _activations(shape: ModelShape, batch: int, seq: int, e: int, checkpointing: bool, lora: bool = True) -> int:
    per_layer = (10 * shape.hidden + 4 * shape.intermediate) * e
    if lora and e < LORA_BYTES:  # PEFT casts each adapted layer's input to its float32 adapters and keeps it
        per_layer += (6 * shape.hidden + shape.intermediate) * LORA_BYTES
    if checkpointing:
        llm = batch * seq * (shape.layers * shape.hidden * e + per_layer)
    else:
        llm = batch * seq * shape.layers * per_layer
    if checkpointing and not lora:  # full training checkpoints the ViT blocks too
        vision = sum(batch * t.tokens * (t.blocks * t.width + 8 * t.width + 2 * t.mlp_width) * e for t in shape.towers)
    else:
        vision = sum(batch * t.tokens * t.blocks * (8 * t.width + 2 * t.mlp_width) * e for t in shape.towers)
    logits = batch * seq * shape.vocab * (2 * e + 8)
    return llm + vision + logits


def _probe_forward(shape: ModelShape, batch: int, seq: int, e: int) -> int:
    hidden_states = (shape.layers + 1) * batch * seq * shape.hidden * e
    return hidden_states + batch * seq * shape.vocab * e


def estimate_memory(cfg: RunConfig, shape: ModelShape, *, on_gpu: bool, baseline_bytes: int,
                    world_size: int = 1, fsdp: bool = False, shards: int | None = None,
                    icsm_built: bool = True) -> MemoryEstimate:
    """Peak bytes per component for `cfg` on one rank (`world_size` ranks on this host). With
    `fsdp`, model state is divided by `shards` (default `world_size`: the ranks one copy is sharded
    over, which may span hosts)."""
    e = torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size()
    seq = shape.num_patches + PROMPT_TOKENS
    shard = (shards or world_size) if fsdp else 1
    if cfg.use_lora:
        dev: dict[str, int] = {
            "weights": shape.base_params * e // shard,
            "lora + grads + adamw": shape.trainable_params * LORA_BYTES * (2 + ADAM_MOMENTS) // shard,
        }
    else:  # full training: float32 master weights (frozen parts too), float32 gradients and moments
        dev = {"weights (float32 master)": (shape.base_params + shape.trainable_params) * MASTER_BYTES // shard,
               "grads + adamw (float32)": shape.trainable_params * MASTER_BYTES * (1 + ADAM_MOMENTS) // shard}
        if e < MASTER_BYTES and not fsdp:  # autocast keeps each weight's cast for backward
            dev["autocast weight copies"] = (shape.base_params + shape.trainable_params) * e
    train_act = _activations(shape, cfg.batch_size, seq, e, cfg.activation_checkpointing, lora=cfg.use_lora)
    if cfg.method_enabled:
        probe_act = _probe_forward(shape, cfg.probe_batch_size, seq, e)
        key = "activations (probe forward is larger)" if probe_act > train_act else "activations"
        dev[key] = max(train_act, probe_act)
        dev["method: teacher covariance + subspaces"] = 3 * len(cfg.hsw_layer_ids or range(4)) * shape.hidden ** 2 * 4
    else:
        dev["activations"] = train_act
    if on_gpu and cfg.use_lora:  # every save gathers adapter + AdamW here first (checkpoint/flat_staging.py)
        dev["checkpoint staging (adapter + adamw)"] = shape.trainable_params * LORA_BYTES * (1 + ADAM_MOMENTS)
    if on_gpu:
        dev["allocator reserve"] = int(sum(dev.values()) * (GPU_RESERVE_FACTOR - 1))
    per_rank_host: dict[str, int] = {}
    if not on_gpu:
        per_rank_host.update(dev)
        per_rank_host["runtime (first build and step)"] = RUNTIME_OVERHEAD_BYTES
    else:
        per_rank_host["CUDA context"] = CUDA_CONTEXT_HOST_BYTES
        if cfg.vla_path:
            per_rank_host["weights while loading"] = shape.base_params * e
    if cfg.method_enabled and not icsm_built and not on_gpu:
        per_rank_host["ICSM teacher (first use)"] = shape.base_params * e
    batch_bytes = cfg.batch_size * (6 * shape.image_size ** 2 * 4 + seq * 8 * 3)
    per_rank_host["batches in flight"] = batch_bytes * (1 + PREFETCH_FACTOR * cfg.num_workers)
    per_rank_host["dataloader workers"] = WORKER_BYTES * cfg.num_workers
    if cfg.use_lora:
        per_rank_host["checkpoint staging (adapter + adamw)"] = shape.trainable_params * LORA_BYTES * (1 + ADAM_MOMENTS)
    else:  # a save copies this rank's model + AdamW shards to host memory (async: reserved once)
        per_rank_host["checkpoint host copy (model + adamw)"] = (
            (shape.base_params + shape.trainable_params + ADAM_MOMENTS * shape.trainable_params) * MASTER_BYTES // shard)
    if cfg.method_enabled:
        per_rank_host["method: probe images"] = cfg.probe_size * shape.image_size ** 2 * 3
    host = {"python/torch baseline (measured)": baseline_bytes * world_size}
    host.update({k: v * world_size for k, v in per_rank_host.items()})
    return MemoryEstimate(device=dev if on_gpu else {}, host=host, on_gpu=on_gpu, seq_len=seq)


def with_changes(cfg: RunConfig, **changes) -> RunConfig:
    """A copy of `cfg` with some fields changed (for trying the knobs)."""
    return dataclasses.replace(cfg, **changes)
