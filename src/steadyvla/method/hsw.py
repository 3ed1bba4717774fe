"""HSW: gradient surgery on the hidden states of chosen layers (DESIGN.md §6).

For a gradient vector g (one token position's gradient w.r.t. a layer's output hidden state) and
orthonormal bases U_f (fragile) and U_p (plastic) of disjoint subspaces:

    g_f = (g U_f) U_fᵀ,   g_p = (g U_p) U_pᵀ,   g_n = g − g_f − g_p
    g'  = g_n + β·g_p + γ·g_f
    g'  ← g' · min(1, ‖g‖ / (‖g'‖ + eps))          (the norm never grows)

With β = γ = 1 the gradient is returned untouched (the very same tensor), so a run with the
method's coefficients at 1 is bitwise the baseline.

Where it applies: every token position of the hidden-state gradient, not only the instruction
span the subspaces were estimated on. The LoRA weights are shared by all positions, so damping the
gradient along the fragile directions at every position damps exactly the weight updates that
would move representations along those directions, wherever the movement is caused. It also needs
no per-batch mask, so the hook is a pure function of the gradient and behaves the same in every
parallel setting below.

The hook changes the gradient that flows *into* the hooked module's output, so it affects the
parameter gradients of that module and of everything below it (earlier layers, vision projector),
never those of later layers. Hooking several stacked layers compounds: each hooked layer's
surgery acts on a gradient that the later hooked layers already reshaped.

Parallel and accumulation behaviour:

- Gradient accumulation: the hooks fire once per micro-batch backward, each on that
  micro-batch's gradient; parameter gradients then accumulate the transformed micro-batch
  gradients. The norms reported by `HSWHooks.pop_norms` sum over all micro-batches of a step.
- DDP: the hooks run on the rank's local activation gradients during backward, before the
  parameter gradients they feed are all-reduced. Every rank therefore does exactly what a single
  process would do on its share of the batch, and the all-reduce averages transformed gradients.
  β and γ must be equal on all ranks (the Thermostat broadcasts them from rank 0).
- FSDP: FSDP shards parameters, gradients and optimizer state, not activations; each rank's
  forward produces full [B_local, T, D] hidden states, so the hooks see full hidden vectors and the
  surgery is the same as under DDP. Register the hooks on the decoder-layer modules themselves
  (for FSDP1 the inner module a FullyShardedDataParallel unit wraps), which FSDP leaves in place.
- Activation checkpointing of the hooked layers: the surgery is applied once per backward, as
  without checkpointing. Non-reentrant: the recomputed forward registers a hook on a tensor that
  is never back-propagated through. Reentrant: the original forward runs without grad (skipped)
  and the recomputation's hook fires in the inner backward.

The projection is computed in float32 (or float64 for float64 gradients) and the result is cast
back to the gradient's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["hsw_transform", "HSWHooks"]


def _check_basis(U_f: Tensor, U_p: Tensor) -> None:
    if U_f.dim() != 2 or U_p.dim() != 2 or U_f.shape[0] != U_p.shape[0]:
        raise ValueError(f"HSW subspaces must be [D, r] with the same D; got U_f {tuple(U_f.shape)}, "
                         f"U_p {tuple(U_p.shape)}")


def _basis(U_f: Tensor, U_p: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[D, r_f + r_p]: fragile columns first, then plastic ones."""
    return torch.cat([U_f, U_p], dim=1).to(device=device, dtype=dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _surgery(g: Tensor, basis: Tensor, r_f: int, beta: float, gamma: float,
             eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(g', ‖g‖², ‖g'‖²) in the basis' dtype; the squared norms are summed over all vectors.

    Uses g' = g + (γ−1)·g_f + (β−1)·g_p, which equals g_n + β·g_p + γ·g_f and needs a single
    pair of matmuls for both subspaces.
    """
    g = g.to(basis.dtype)
    coeff = g @ basis  # [..., r_f + r_p]
    coeff[..., :r_f] *= gamma - 1.0
    coeff[..., r_f:] *= beta - 1.0
    out = g + coeff @ basis.T
    g_norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    out_norm = torch.linalg.vector_norm(out, dim=-1, keepdim=True)
    scale = (g_norm / (out_norm + eps)).clamp(max=1.0)
    out = out * scale
    return out, g_norm.square().sum(), (out_norm * scale).square().sum()


def hsw_transform(g: Tensor, U_f: Tensor, U_p: Tensor, beta: float, gamma: float, eps: float) -> Tensor:
    """Apply HSW surgery to every vector along the last dim of `g` ([..., D]).

    `U_f` [D, r_f] and `U_p` [D, r_p] have orthonormal columns spanning disjoint subspaces; either
    rank may be 0. Returns `g` itself when β = γ = 1, otherwise a new tensor in `g.dtype`.
    """
    if beta == 1.0 and gamma == 1.0:
        return g
    _check_basis(U_f, U_p)
    if g.shape[-1] != U_f.shape[0]:
        raise ValueError(f"HSW: gradient last dim {g.shape[-1]} does not match subspace dim {U_f.shape[0]}")
    basis = _basis(U_f, U_p, g.device, _compute_dtype(g.dtype))
    out, _, _ = _surgery(g, basis, U_f.shape[1], beta, gamma, eps)
    return out.to(g.dtype)


class HSWHooks:
    """Backward gradient surgery on the hidden states output by chosen modules (decoder layers).

    A forward hook on each module registers a tensor hook on the module's output hidden state (the
    output itself, or the first element of a tuple/list output); in backward that tensor hook
    replaces the incoming gradient by `hsw_transform` of it with the current `beta`, `gamma`.
    Outputs that do not require grad (probe forwards under `no_grad`, frozen stacks) are skipped.
    `beta` and `gamma` are read when the gradient arrives, so changes apply to the next backward.
    """

    def __init__(self, modules: dict[str, nn.Module], subspaces: dict[str, tuple[Tensor, Tensor]], eps: float):
        if set(modules) != set(subspaces):
            raise ValueError(f"HSW: module names {sorted(modules)} and subspace names {sorted(subspaces)} differ")
        if eps <= 0:
            raise ValueError(f"HSW: eps must be > 0, got {eps}")
        for U_f, U_p in subspaces.values():
            _check_basis(U_f, U_p)
        self.modules = dict(modules)
        self.subspaces = {name: (U_f.detach(), U_p.detach()) for name, (U_f, U_p) in subspaces.items()}
        self.eps = float(eps)
        self.beta = 1.0
        self.gamma = 1.0
        self._cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
        self._handles: list[RemovableHandle] = []
        # Identity of the current attachment: tensor hooks registered by an earlier attachment
        # (forward done, backward not yet) see a different token and leave the gradient alone.
        self._token: object | None = None
        self._g_sq: Tensor | None = None
        self._gp_sq: Tensor | None = None

    @property
    def attached(self) -> bool:
        return self._token is not None

    def attach(self) -> None:
        """Register the forward hooks (no-op when already attached)."""
        if self.attached:
            return
        self._token = token = object()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name, token)))

    def detach(self) -> None:
        """Remove the forward hooks; tensor hooks still pending from earlier forwards become no-ops."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._token = None

    def pop_norms(self) -> tuple[float, float]:
        """(sqrt Σ‖g‖², sqrt Σ‖g'‖²) over every vector of every hook call since the last pop.

        Local to this process (not reduced across ranks). One device sync per call.
        """
        g_sq, gp_sq = self._g_sq, self._gp_sq
        self._g_sq = self._gp_sq = None
        if g_sq is None or gp_sq is None:
            return 0.0, 0.0
        return float(g_sq.sqrt().item()), float(gp_sq.sqrt().item())

    def _forward_hook(self, name: str, token: object) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            hidden = _hidden_state(output, name)
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: self._on_grad(name, token, grad))

        return hook

    def _on_grad(self, name: str, token: object, grad: Tensor) -> Tensor | None:
        if token is not self._token:
            return None
        U_f, U_p = self.subspaces[name]
        if grad.shape[-1] != U_f.shape[0]:
            raise ValueError(f"HSW[{name}]: hidden size {grad.shape[-1]} does not match subspace dim {U_f.shape[0]}")
        dtype = _compute_dtype(grad.dtype)
        if self.beta == 1.0 and self.gamma == 1.0:
            g_sq = torch.linalg.vector_norm(grad, dtype=dtype).square()
            self._accumulate(g_sq, g_sq)
            return None  # None keeps the incoming gradient as it is
        out, g_sq, gp_sq = _surgery(grad, self._basis(name, grad.device, dtype), U_f.shape[1],
                                    self.beta, self.gamma, self.eps)
        self._accumulate(g_sq, gp_sq)
        return out.to(grad.dtype)

    def _basis(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (name, device, dtype)
        basis = self._cache.get(key)
        if basis is None:
            basis = self._cache[key] = _basis(*self.subspaces[name], device, dtype)
        return basis

    def _accumulate(self, g_sq: Tensor, gp_sq: Tensor) -> None:
        # Kept on the device as tensors: calling .item() here would sync the GPU on every hook call.
        g_sq, gp_sq = g_sq.detach().double(), gp_sq.detach().double()
        if self._g_sq is None or self._gp_sq is None:
            self._g_sq, self._gp_sq = g_sq, gp_sq
        else:
            self._g_sq = self._g_sq + g_sq.to(self._g_sq.device)
            self._gp_sq = self._gp_sq + gp_sq.to(self._gp_sq.device)


def _hidden_state(output: object, name: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"HSW[{name}]: module output is {type(output).__name__}; expected a Tensor or a tuple "
                    "whose first element is the hidden-state tensor")
