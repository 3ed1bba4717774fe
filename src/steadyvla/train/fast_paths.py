"""Speed options of the training step (config keys `logits_at_labels_only`, `compile_blocks`,
`compile_mode`, `fused_optimizer`, `lora_in_model_dtype`): each computes what the plain path computes, up to
floating-point round-off (bf16 round-off for `lora_in_model_dtype` on a bf16 model).

Regional compilation: every transformer block (Llama decoder layer, timm ViT block) is compiled
in place with `nn.Module.compile()`, so identical blocks share one compiled graph (short compile
time) and the module tree, parameter names and `state_dict()` keys are untouched: checkpoints
never see a compiled artefact, and a resumed run simply compiles again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from steadyvla.config import CUDA_GRAPH_COMPILE_MODES, RunConfig

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


def resolved_compile_mode(cfg: RunConfig, device: torch.device | str) -> str:
    """`compile_mode`, with null meaning: `reduce-overhead` (a CUDA graph per block) for plain LoRA
    fine-tuning on CUDA with one micro-batch per step, the setting it was measured and checked in;
    `default` otherwise (gradient accumulation breaks CUDA graphs, pytorch/pytorch#169545; the
    method's probes and periodic evaluation run the blocks in other modes and shapes)."""
    if cfg.compile_mode is not None:
        return cfg.compile_mode
    graphs_safe = (on_cuda(device) and cfg.use_lora and cfg.grad_accumulation_steps == 1
                   and not cfg.method_enabled and not cfg.enable_periodic_eval)
    return "reduce-overhead" if graphs_safe else "default"


def uses_cuda_graphs(cfg: RunConfig, device: torch.device | str) -> bool:
    """Whether the compiled blocks replay CUDA graphs (then every micro-batch starts a new graph step)."""
    return (compile_enabled(cfg, device) and on_cuda(device)
            and resolved_compile_mode(cfg, device) in CUDA_GRAPH_COMPILE_MODES)


def compile_blocks(model: nn.Module, mode: str = "default") -> int:
    """Compile every transformer block of `model` in place with torch.compile's `mode`; returns how
    many. Gradient checkpointing, PEFT's LoRA layers and the method's hooks stay as they are around
    each block. `reduce-overhead` replays each block's kernels as a CUDA graph (no effect on CPU)."""
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
            module.compile(mode=None if mode == "default" else mode)
            count += 1
    return count


class ModelDtypeLinear(nn.Linear):
    """A LoRA A or B projection computed in the dtype of its input (bf16 on a bf16 model). Its fp32
    weight stays the master copy the optimizer updates; the cast is differentiable, so the weight's
    gradient arrives in fp32. PEFT's default instead casts the bf16 activations up to fp32 and runs
    the thin LoRA matmuls in fp32 (non-tensor-core kernels: ~25 % of the 7B step in the profile)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def lora_in_model_dtype(model: nn.Module) -> int:
    """Make every LoRA layer of `model` compute in the dtype of the activations reaching it; returns
    how many LoRA projections changed (0 when the adapter already has the model's dtype). Module
    names and state_dict keys are untouched (only the class of the A/B projections changes)."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base_dtype = module.get_base_layer().weight.dtype
        projections = [*module.lora_A.values(), *module.lora_B.values()]
        if all(p.weight.dtype == base_dtype for p in projections):
            continue
        module.cast_input_dtype_enabled = False  # PEFT would cast the input to the adapter's fp32
        for proj in projections:
            if type(proj) is nn.Linear:
                proj.__class__ = ModelDtypeLinear
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
    if cfg.lora_in_model_dtype and (changed := lora_in_model_dtype(model)):
        applied.append(f"lora_in_model_dtype ({changed} projections)")
    if compile_enabled(cfg, device):
        compile_mode = resolved_compile_mode(cfg, device)
        mode = "" if compile_mode == "default" else f", mode {compile_mode}"
        applied.append(f"compile_blocks ({compile_blocks(vla, compile_mode)} blocks{mode})")
    if fused_enabled(cfg, device):
        applied.append("fused_optimizer")
    return applied
