"""Thermostat: steer the HSW coefficients β, γ from the representation drift on the probe set.

Control law (DESIGN.md §6): during warmup every step's drift d is recorded and their mean becomes
the baseline; afterwards, every `update_interval` steps,

    δ = max(0, d − base_scale·baseline)
    β = clip(max_beta / (1 + k_beta·δ), min_beta, max_beta)
    γ = clip(max_gamma / (1 + k_gamma·δ), min_gamma, max_gamma)

so more drift than at the start means more damping. During warmup β, γ keep their initial values.

Warmup progress is the number of warmup drifts recorded: the baseline is set when the
`warmup_steps`-th one arrives (with `warmup_steps == 0` the first observation sets the baseline
and is then used for an update too). A caller that measures exactly when `should_measure` says so
gets warmup on steps 0 … warmup_steps−1 and updates on warmup_steps, warmup_steps+interval, …

Everything that determines future coefficients is in `state_dict` (JSON-able; floats survive
JSON exactly), so a resumed run continues the same trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ThermostatSettings", "Thermostat", "broadcast_coefficients", "broadcast_from_rank0"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class ThermostatSettings:
    """The control law's constants (config keys `thermostat_*`)."""

    update_interval: int = 50
    warmup_steps: int = 20
    min_beta: float = 0.1
    max_beta: float = 1.0
    min_gamma: float = 0.0
    max_gamma: float = 1.0
    k_beta: float = 1.0
    k_gamma: float = 2.0
    base_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.update_interval < 1:
            raise ValueError(f"thermostat update_interval must be >= 1, got {self.update_interval}")
        if self.warmup_steps < 0:
            raise ValueError(f"thermostat warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("beta", "gamma"):
            lo, hi = getattr(self, f"min_{name}"), getattr(self, f"max_{name}")
            if not 0.0 <= lo <= hi:
                raise ValueError(f"thermostat needs 0 <= min_{name} <= max_{name}; got {lo}, {hi}")
            if getattr(self, f"k_{name}") < 0:
                raise ValueError(f"thermostat k_{name} must be >= 0, got {getattr(self, f'k_{name}')}")

    @classmethod
    def from_config(cls, cfg: Any) -> ThermostatSettings:
        """From a RunConfig (fields `thermostat_update_interval`, …, `thermostat_base_scale`)."""
        return cls(
            update_interval=int(cfg.thermostat_update_interval),
            warmup_steps=int(cfg.thermostat_warmup_steps),
            min_beta=float(cfg.thermostat_min_beta),
            max_beta=float(cfg.thermostat_max_beta),
            min_gamma=float(cfg.thermostat_min_gamma),
            max_gamma=float(cfg.thermostat_max_gamma),
            k_beta=float(cfg.thermostat_k_beta),
            k_gamma=float(cfg.thermostat_k_gamma),
            base_scale=float(cfg.thermostat_base_scale),
        )


def _clip(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)


class Thermostat:
    """Warmup calibration, then the periodic control law. Pure Python floats; no devices.

    `history` holds one entry per observation: {"step", "drift", "beta", "gamma", "delta"} with the
    coefficients in force after it; `delta` is None for warmup observations.
    """

    def __init__(self, settings: ThermostatSettings, beta0: float = 1.0, gamma0: float = 1.0):
        self.settings = settings
        self.beta = float(beta0)
        self.gamma = float(gamma0)
        self.baseline: float | None = None
        self.warmup_drifts: list[float] = []
        self.history: list[dict[str, Any]] = []

    @property
    def warming_up(self) -> bool:
        return self.baseline is None

    def should_measure(self, step: int) -> bool:
        """Whether to measure drift before optimizer step `step` (0-based, about to run)."""
        warmup = self.settings.warmup_steps
        if step < warmup:
            return True
        return (step - warmup) % self.settings.update_interval == 0

    def observe(self, step: int, drift: float) -> None:
        """Record the drift measured for `step`; update β, γ when past warmup."""
        drift = float(drift)
        if not math.isfinite(drift):
            raise ValueError(f"thermostat: drift at step {step} is {drift}; the probe forward diverged")
        if self.history and step <= self.history[-1]["step"]:
            raise ValueError(f"thermostat: observation for step {step} after one for step {self.history[-1]['step']}")
        delta: float | None = None
        if self.warming_up:
            self.warmup_drifts.append(drift)
            if len(self.warmup_drifts) >= self.settings.warmup_steps:
                self.baseline = math.fsum(self.warmup_drifts) / len(self.warmup_drifts)
                if self.settings.warmup_steps == 0:
                    delta = self._update(drift)
        else:
            delta = self._update(drift)
        self.history.append({"step": int(step), "drift": drift, "beta": self.beta, "gamma": self.gamma,
                             "delta": delta})

    def _update(self, drift: float) -> float:
        s = self.settings
        assert self.baseline is not None
        delta = max(0.0, drift - s.base_scale * self.baseline)
        self.beta = _clip(s.max_beta / (1.0 + s.k_beta * delta), s.min_beta, s.max_beta)
        self.gamma = _clip(s.max_gamma / (1.0 + s.k_gamma * delta), s.min_gamma, s.max_gamma)
        return delta

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: coefficients, baseline, warmup drifts (= warmup progress), history."""
        return {
            "version": _STATE_VERSION,
            "beta": self.beta,
            "gamma": self.gamma,
            "baseline": self.baseline,
            "warmup_drifts": list(self.warmup_drifts),
            "history": [dict(entry) for entry in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; the settings stay those this object was built with."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"thermostat state version {state.get('version')!r}; expected {_STATE_VERSION}")
        self.beta = float(state["beta"])
        self.gamma = float(state["gamma"])
        self.baseline = None if state["baseline"] is None else float(state["baseline"])
        self.warmup_drifts = [float(d) for d in state["warmup_drifts"]]
        self.history = [dict(entry) for entry in state["history"]]


def broadcast_from_rank0(values: list[float]) -> list[float]:
    """Rank 0's `values` on every rank when torch.distributed is initialized, else `values`."""
    values = [float(v) for v in values]
    if not (dist.is_available() and dist.is_initialized()):
        return values
    # NCCL only moves CUDA tensors; any other backend (gloo, or a cpu:gloo,cuda:nccl mix) takes CPU.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = torch.tensor(values, dtype=torch.float64, device=device)  # float64: Python floats exactly
    dist.broadcast(buffer, src=0)
    return [float(v) for v in buffer.tolist()]


def broadcast_coefficients(beta: float, gamma: float) -> tuple[float, float]:
    """(β, γ) of rank 0 on every rank when torch.distributed is initialized, else unchanged."""
    beta, gamma = broadcast_from_rank0([beta, gamma])
    return beta, gamma
