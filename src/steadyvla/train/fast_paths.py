"""Speed options of the training step (config keys `logits_at_labels_only`, `compile_blocks`,
`fused_optimizer`): each computes what the plain path computes, up to floating-point round-off.

Regional compilation: every transformer block (Llama decoder layer, timm ViT block) is compiled
in place with `nn.Module.compile()`, so identical blocks share one compiled graph (short compile
time) and the module tree, parameter names and `state_dict()` keys are untouched: checkpoints
never see a compiled artefact, and a resumed run simply compiles again.
"""

from __future__ import annotations

import torch
from torch import nn

from steadyvla.config import RunConfig

# Class names of the blocks compiled one by one (HF Llama decoder layer, timm ViT block).
COMPILED_BLOCK_TYPES = ("LlamaDecoderLayer", "Block")
# Every block instance is guarded separately by dynamo: allow one cache entry per block and shape.
_DYNAMO_CACHE_LIMIT = 256


def on_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def compile_enabled(cfg: RunConfig, device: torch.device | str) -> bool:
    """`compile_blocks`, with null meaning: on CUDA only (CPU compile costs more than it saves)."""
    return cfg.compile_blocks if cfg.compile_blocks is not None else on_cuda(device)


def fused_enabled(cfg: RunConfig, device: torch.device | str) -> bool:
    """`fused_optimizer`, with null meaning: on CUDA only."""
    return cfg.fused_optimizer if cfg.fused_optimizer is not None else on_cuda(device)


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer block of `model` in place; returns how many. Gradient
    checkpointing, PEFT's LoRA layers and the method's hooks stay as they are around each block."""
    import torch._dynamo

    config = torch._dynamo.config
    for name, limit in (("recompile_limit", _DYNAMO_CACHE_LIMIT), ("cache_size_limit", _DYNAMO_CACHE_LIMIT),
                        ("accumulated_recompile_limit", 4 * _DYNAMO_CACHE_LIMIT),
                        ("accumulated_cache_size_limit", 4 * _DYNAMO_CACHE_LIMIT)):
        if hasattr(config, name):  # renamed across torch versions
            setattr(config, name, max(getattr(config, name), limit))
    count = 0
    for module in model.modules():
        if type(module).__name__ in COMPILED_BLOCK_TYPES:
            module.compile()
            count += 1
    return count


def apply_fast_paths(model: nn.Module, cfg: RunConfig, device: torch.device | str) -> list[str]:
    """Switch on the model-side fast paths `cfg` asks for on `model` (the PEFT-wrapped VLA);
    returns their names for the log."""
    vla = model.get_base_model() if hasattr(model, "get_base_model") else model
    applied = []
    vla.text_logits_only = cfg.logits_at_labels_only
    if cfg.logits_at_labels_only:
        applied.append("logits_at_labels_only")
    if compile_enabled(cfg, device):
        applied.append(f"compile_blocks ({compile_blocks(vla)} blocks)")
    if fused_enabled(cfg, device):
        applied.append("fused_optimizer")
    return applied
