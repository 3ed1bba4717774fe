"""LoRA linear layers whose adapter update rides in the base matmul's epilogue (`lora_fused_matmul`).

PEFT computes `base(x) + lora_B(lora_A(x)) * scaling` as three matmuls and two full-size
elementwise passes (the scaling and the sum), and its backward adds two more (the scaled gradient
and the sum of the two input gradients). Each pass reads or writes a tokens × width tensor: on the
7B, ~38-100 MB per layer and pass, 224 adapted layers in the LLM alone. Here the same mathematics
is one autograd function that folds those sums into cuBLAS's `addmm` (C + alpha · A @ B, the
scaling as alpha) and scales only the thin rank-r products:

    forward:   xa = x Aᵀ;  y = x Wᵀ (+ bias);  y += s · xa Bᵀ
    backward:  gxa = s · g B;  dB = s · gᵀ xa;  dA = gxaᵀ x;  dx = g W + gxa A

Equal to PEFT's result up to bf16 round-off (one rounding of the fused sum instead of three);
tests/test_fast_paths.py states the tolerance. Only plain LoRA layers are fused (one active
adapter, no dropout, no bias on A/B, no DoRA or other variant, an `nn.Linear` base computing in
the adapter's compute dtype); every other layer keeps PEFT's forward. Parameter names, state_dict
keys and checkpoints are untouched: only the class of the LoRA layer changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a.t()
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        out = out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scaling = scaling
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, xa, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gxa = (g @ b).mul_(ctx.scaling)
        grad_b = torch.mm(g.t(), xa).mul_(ctx.scaling).to(ctx.dtypes[1])
        grad_a = torch.mm(gxa.t(), x2).to(ctx.dtypes[0])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight).addmm_(gxa, a).view(*grad.shape[:-1], x2.shape[-1])
        grad_w = torch.mm(g.t(), x2) if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def _plain_lora(layer: nn.Module, name: str) -> bool:
    """Whether adapter `name` of `layer` is plain LoRA on an `nn.Linear` (what `_LoraLinear` computes)."""
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return False
    if getattr(layer, "use_dora", {}).get(name, False):
        return False
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    return (type(layer.get_base_layer()) is nn.Linear and isinstance(layer.lora_dropout[name], nn.Identity)
            and lora_a.bias is None and lora_b.bias is None)


def _fusable_adapter(layer: nn.Module, x: torch.Tensor) -> str | None:
    """The one active adapter of `layer` if this forward of input `x` can be fused, else None."""
    active = layer.active_adapters
    if len(active) != 1 or layer.disable_adapters or layer.merged or not _plain_lora(layer, active[0]):
        return None
    lora_a = layer.lora_A[active[0]]
    if layer.get_base_layer().weight.dtype != x.dtype:
        return None
    computes_in_input_dtype = getattr(lora_a, "computes_in_input_dtype", False) or lora_a.weight.dtype == x.dtype
    return active[0] if computes_in_input_dtype else None


class FusedLoraLinearMixin:
    """Forward of a PEFT LoRA `Linear` through `_LoraLinear` where the layer allows it."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = None if args or kwargs else _fusable_adapter(self, x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                 self.scaling[name])


_FUSED_CLASSES: dict[type, type] = {}


def fuse_lora_matmuls(model: nn.Module) -> int:
    """Switch every plain PEFT LoRA `Linear` of `model` (no dropout, no DoRA, no adapter bias) to
    the fused forward; a call it cannot fuse (another active adapter, an fp32 adapter on a bf16
    input) still runs PEFT's forward. Returns how many layers changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        cls = type(module)
        if not issubclass(cls, LoraLinear) or issubclass(cls, FusedLoraLinearMixin):
            continue
        if not all(_plain_lora(module, name) for name in module.lora_A):
            continue
        if cls not in _FUSED_CLASSES:
            _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedLoraLinearMixin, cls), {})
        module.__class__ = _FUSED_CLASSES[cls]
        count += 1
    return count
