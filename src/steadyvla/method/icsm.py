"""ICSM: instruction-conditioned subspaces of the frozen pretrained model (the teacher).

For each representative layer: mean-pool the hidden states of the instruction tokens per probe
sample (s_i), center X = [s_i], SVD -> the first r right-singular vectors are candidates. Each
candidate is injected into the instruction hidden states and the change of the next-token
distribution at the action position (KL) measures its fragility; the most fragile become U_f,
the next U_p, the rest null. The teacher mean `mu` and covariance `C_T` are kept for the
Thermostat's drift measure. Computed once, offline, deterministically.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from steadyvla.method.probe import ProbeBatch


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The LLM's decoder layers of a VLA, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.language_model.model.layers


def layer_groups(layer_ids: list[int] | None, num_layers: int) -> list[list[int]]:
    """Hooked layers in groups; each group shares the subspace of its last (representative) layer.
    Default: the last 4 layers in two groups of two."""
    ids = layer_ids if layer_ids is not None else list(range(max(0, num_layers - 4), num_layers))
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad or not ids:
        raise ValueError(f"config field `hsw_layer_ids`: {ids} must be non-empty layer indices in [0, {num_layers})")
    ids = sorted(set(ids))
    half = (len(ids) + 1) // 2
    return [ids[:half], ids[half:]] if len(ids) > 1 else [ids]


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture_outputs(model: nn.Module, layer_ids: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the hidden-state outputs of the given decoder layers during a forward."""
    captured: dict[int, torch.Tensor] = {}
    layers = decoder_layers(model)
    handles = [layers[i].register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(i, _hidden(out)))
               for i in layer_ids]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def _forward(model: nn.Module, batch: ProbeBatch, device: torch.device):
    return model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                 pixel_values=batch.pixel_values.to(device))


@torch.no_grad()
def pooled_instruction_states(model: nn.Module, batch: ProbeBatch, layer_ids: list[int],
                              device: torch.device) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per layer [B, D] float32 mean of the instruction-token hidden states, and a [B] bool mask of
    samples whose instruction span is non-empty (others are zero rows and must be skipped)."""
    with capture_outputs(model, layer_ids) as captured:
        _forward(model, batch, device)
    mask = batch.instruction_mask.to(device)
    counts = mask.sum(dim=1)
    pooled = {}
    for i in layer_ids:
        h = captured[i].float()
        pooled[i] = (h * mask[..., None]).sum(dim=1) / counts.clamp(min=1)[:, None]
    return pooled, counts > 0


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Sample covariance [D, D] of rows of x [N, D] (float64 accumulate for determinism)."""
    xc = x.double() - x.double().mean(dim=0)
    return (xc.T @ xc / max(1, x.shape[0] - 1)).float()


def principal_directions(x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First r right-singular vectors [D, r] of centered x and their singular values."""
    xc = x.double() - x.double().mean(dim=0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    r = min(r, vh.shape[0])
    return vh[:r].T.float().contiguous(), s[:r].float()


def _action_position_logprobs(model: nn.Module, batch: ProbeBatch, device: torch.device, num_patches: int):
    logits = _forward(model, batch, device).logits.float()
    last = batch.attention_mask.sum(dim=1).to(device) - 1 + num_patches
    return F.log_softmax(logits[torch.arange(logits.shape[0], device=device), last], dim=-1)


@torch.no_grad()
def direction_sensitivity(model: nn.Module, batch: ProbeBatch, layer_id: int, directions: torch.Tensor,
                          scale: float, device: torch.device, num_patches: int) -> torch.Tensor:
    """Mean KL(p || p_k) of the action-position distribution when `scale * v_k` is added to the
    instruction hidden states output by `layer_id`, for every column v_k of `directions`."""
    base = _action_position_logprobs(model, batch, device, num_patches)
    mask = batch.instruction_mask.to(device)[..., None]
    layer = decoder_layers(model)[layer_id]
    kls = []
    for k in range(directions.shape[1]):
        v = directions[:, k].to(device)

        def inject(_m, _i, out, v=v):
            h = _hidden(out)
            h = h + (scale * mask * v).to(h.dtype)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = layer.register_forward_hook(inject)
        try:
            pert = _action_position_logprobs(model, batch, device, num_patches)
        finally:
            handle.remove()
        kls.append(F.kl_div(pert, base, log_target=True, reduction="batchmean"))
    return torch.stack(kls).float().cpu()


def split_by_fragility(directions: torch.Tensor, sensitivity: torch.Tensor, fragile_fraction: float,
                       plastic_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """U_f = the most sensitive directions, U_p = the next ones (stable sort: deterministic)."""
    r = directions.shape[1]
    order = torch.sort(-sensitivity, stable=True).indices
    n_f, n_p = round(fragile_fraction * r), round(plastic_fraction * r)
    return directions[:, order[:n_f]].contiguous(), directions[:, order[n_f:n_f + n_p]].contiguous()
