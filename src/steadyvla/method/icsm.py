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
from dataclasses import dataclass
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

    Default: the last 4 layers in two groups of two. Given ids (negative = from the end, as in the
    users' `hsw_layer_ids: [-2, -1]`) are split the same way: sorted, first half and second half,
    so two ids give two groups of one layer, each its own representative."""
    ids = layer_ids if layer_ids is not None else list(range(max(0, num_layers - 4), num_layers))
    bad = [i for i in ids if not -num_layers <= i < num_layers]
    if bad or not ids:
        raise ValueError(f"config field `hsw_layer_ids`: {ids} must be non-empty layer indices in "
                         f"[-{num_layers}, {num_layers}) (negative = from the end)")
    ids = sorted({i % num_layers for i in ids})
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


def split_by_fragility(directions: torch.Tensor, sensitivity: torch.Tensor, n_fragile: int, n_plastic: int,
                       plastic_from: str = "ranked") -> tuple[torch.Tensor, torch.Tensor]:
    """U_f = the `n_fragile` most sensitive directions; U_p = the next `n_plastic` ("ranked") or the
    `n_plastic` least sensitive ones ("extremes", the users' rule). Stable sort: deterministic."""
    order = torch.sort(-sensitivity, stable=True).indices
    fragile = order[:n_fragile]
    plastic = order[n_fragile:n_fragile + n_plastic] if plastic_from == "ranked" else order[len(order) - n_plastic:]
    return directions[:, fragile].contiguous(), directions[:, plastic].contiguous()


@dataclass(frozen=True)
class IcsmOptions:
    """How candidate directions are found, measured and split (config keys `icsm_*`)."""

    rank: int = 128
    epsilon: float = 0.5  # relative to the RMS spread of the pooled states
    epsilon_absolute: float | None = None  # when set, the injection size itself
    split: str = "ranked"  # ranked | extremes
    fragile_fraction: float = 0.25
    plastic_fraction: float = 0.25
    fragile_dim: int | None = None
    plastic_dim: int | None = None

    @classmethod
    def from_config(cls, cfg) -> IcsmOptions:
        """From a RunConfig."""
        return cls(cfg.icsm_rank, cfg.icsm_epsilon, cfg.icsm_epsilon_absolute, cfg.icsm_split,
                   cfg.icsm_fragile_fraction, cfg.icsm_plastic_fraction, cfg.icsm_fragile_dim, cfg.icsm_plastic_dim)

    def split_sizes(self, r: int) -> tuple[int, int]:
        """(|U_f|, |U_p|) for r candidate directions; explicit dims win over the split's defaults."""
        if self.split == "ranked":
            n_f, n_p = round(self.fragile_fraction * r), round(self.plastic_fraction * r)
        else:  # the users' offline_icms.py: r/2 fragile, r/4 plastic
            n_f, n_p = r // 2, r // 4
        n_f = self.fragile_dim if self.fragile_dim is not None else n_f
        n_p = self.plastic_dim if self.plastic_dim is not None else n_p
        if n_f + n_p > r:
            raise ValueError(f"config fields `icsm_fragile_dim` + `icsm_plastic_dim`: {n_f} + {n_p} exceed the "
                             f"{r} candidate directions (icsm_rank capped by probe size and hidden size)")
        return n_f, n_p

    def injection_size(self, x: torch.Tensor) -> float:
        """Absolute size of the injected direction for pooled states x [N, D]."""
        if self.epsilon_absolute is not None:
            return float(self.epsilon_absolute)
        return self.epsilon * (x - x.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt().item()


def layer_subspaces(teacher: nn.Module, x: torch.Tensor, sens_batch: ProbeBatch, layer_id: int,
                    options: IcsmOptions, device: torch.device, num_patches: int) -> dict[str, torch.Tensor]:
    """U_f, U_p, mu, C_T, singular values and sensitivities of one representative layer, from the
    pooled instruction states x [N, D] of the probe set and one batch to measure sensitivity on."""
    directions, singular = principal_directions(x, options.rank)
    sensitivity = direction_sensitivity(teacher, sens_batch, layer_id, directions, options.injection_size(x), device,
                                        num_patches)
    n_f, n_p = options.split_sizes(directions.shape[1])
    u_f, u_p = split_by_fragility(directions, sensitivity, n_f, n_p, options.split)
    return {"U_f": u_f, "U_p": u_p, "mu": x.mean(dim=0), "C_T": covariance(x), "singular_values": singular,
            "sensitivity": sensitivity}


def covariance_drift(pooled: dict[int, torch.Tensor], teacher_cov: dict[int, torch.Tensor]) -> float:
    """d = mean over layers of ||C_S - C_T||_F, C_S the covariance of the student's pooled states."""
    drifts = [torch.linalg.matrix_norm(covariance(pooled[layer]) - cov.to(pooled[layer].device)).item()
              for layer, cov in teacher_cov.items()]
    return sum(drifts) / len(drifts)
