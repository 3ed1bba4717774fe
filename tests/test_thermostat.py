"""Thermostat: schedule, warmup baseline, control law against hand-computed values, state, broadcast."""

from __future__ import annotations

import json
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from steadyvla.config import build_config
from steadyvla.method.thermostat import (Thermostat, ThermostatSettings, broadcast_coefficients,
                                         broadcast_from_rank0)

# warmup 3 steps, then an update every 2 steps; baseline threshold = 1.5 × baseline.
SETTINGS = ThermostatSettings(update_interval=2, warmup_steps=3, min_beta=0.1, max_beta=1.0, min_gamma=0.05,
                              max_gamma=0.8, k_beta=1.0, k_gamma=2.0, base_scale=1.5)


def test_should_measure_schedule():
    thermostat = Thermostat(SETTINGS)
    assert [s for s in range(12) if thermostat.should_measure(s)] == [0, 1, 2, 3, 5, 7, 9, 11]
    no_warmup = Thermostat(ThermostatSettings(update_interval=50, warmup_steps=0))
    assert [s for s in range(120) if no_warmup.should_measure(s)] == [0, 50, 100]


def test_warmup_baseline_is_the_mean_and_coefficients_hold():
    thermostat = Thermostat(SETTINGS, beta0=0.9, gamma0=0.7)
    for step, drift in enumerate([2.0, 3.0, 4.5]):
        assert thermostat.baseline is None
        thermostat.observe(step, drift)
        assert (thermostat.beta, thermostat.gamma) == (0.9, 0.7)
    assert thermostat.baseline == pytest.approx(3.1666666666666665, abs=1e-15)
    assert thermostat.warmup_drifts == [2.0, 3.0, 4.5]
    assert [h["delta"] for h in thermostat.history] == [None, None, None]


def test_control_law_hand_computed():
    thermostat = Thermostat(SETTINGS)
    for step, drift in enumerate([2.0, 3.0, 4.0]):
        thermostat.observe(step, drift)
    assert thermostat.baseline == 3.0  # threshold 1.5 × 3.0 = 4.5

    # d = 6.5: δ = 2; β = 1/(1+2) = 0.3333…; γ = 0.8/(1+4) = 0.16
    thermostat.observe(3, 6.5)
    assert thermostat.beta == pytest.approx(0.3333333333333333, abs=1e-15)
    assert thermostat.gamma == pytest.approx(0.16, abs=1e-15)

    # d = 4.0 < threshold: δ = 0, back to the maxima
    thermostat.observe(5, 4.0)
    assert (thermostat.beta, thermostat.gamma) == (1.0, 0.8)

    # d = 104.5: δ = 100; β = 1/101 = 0.0099 -> clipped to 0.1; γ = 0.8/201 = 0.00398 -> clipped to 0.05
    thermostat.observe(7, 104.5)
    assert (thermostat.beta, thermostat.gamma) == (0.1, 0.05)

    # d = 5.0: δ = 0.5; β = 1/1.5 = 0.6667; γ = 0.8/2 = 0.4
    thermostat.observe(9, 5.0)
    assert thermostat.beta == pytest.approx(0.6666666666666666, abs=1e-15)
    assert thermostat.gamma == pytest.approx(0.4, abs=1e-15)

    assert [h["step"] for h in thermostat.history] == [0, 1, 2, 3, 5, 7, 9]
    assert [h["delta"] for h in thermostat.history[3:]] == [2.0, 0.0, 100.0, 0.5]
    assert thermostat.history[-1] == {"step": 9, "drift": 5.0, "beta": thermostat.beta, "gamma": thermostat.gamma,
                                      "delta": 0.5}


def test_clipping_keeps_coefficients_in_range():
    thermostat = Thermostat(ThermostatSettings(update_interval=1, warmup_steps=1, min_beta=0.25, max_beta=0.75,
                                               min_gamma=0.2, max_gamma=0.5, k_beta=10.0, k_gamma=10.0))
    thermostat.observe(0, 1.0)
    for step, drift in enumerate([0.0, 1.0, 1.01, 1.5, 3.0, 1e6], start=1):
        thermostat.observe(step, drift)
        assert 0.25 <= thermostat.beta <= 0.75 and 0.2 <= thermostat.gamma <= 0.5
    assert (thermostat.beta, thermostat.gamma) == (0.25, 0.2)
    thermostat.observe(10, 0.5)
    assert (thermostat.beta, thermostat.gamma) == (0.75, 0.5)


def test_zero_warmup_first_observation_sets_baseline_then_updates():
    settings = ThermostatSettings(update_interval=2, warmup_steps=0, max_gamma=0.8, k_beta=1.0, k_gamma=2.0,
                                  base_scale=0.5)
    thermostat = Thermostat(settings, beta0=0.3, gamma0=0.3)
    # baseline 2.0, threshold 1.0: δ = 1; β = 1/2 = 0.5, γ = 0.8/3 = 0.26666…
    thermostat.observe(0, 2.0)
    assert thermostat.baseline == 2.0
    assert thermostat.beta == 0.5
    assert thermostat.gamma == pytest.approx(0.26666666666666666, abs=1e-15)
    # d = 1.0 = threshold: δ = 0
    thermostat.observe(2, 1.0)
    assert (thermostat.beta, thermostat.gamma) == (1.0, 0.8)


def drive(thermostat: Thermostat, steps: range, drift_of) -> None:
    for step in steps:
        if thermostat.should_measure(step):
            thermostat.observe(step, drift_of(step))


@pytest.mark.parametrize("split", [2, 3, 8])  # mid-warmup, at the warmup boundary, after updates
def test_state_dict_round_trip_continues_identically(split):
    drift_of = lambda step: 1.0 + 0.37 * step + 0.1 * (step % 3)  # noqa: E731
    uninterrupted = Thermostat(SETTINGS)
    drive(uninterrupted, range(20), drift_of)

    first = Thermostat(SETTINGS)
    drive(first, range(split), drift_of)
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = Thermostat(SETTINGS, beta0=0.123, gamma0=0.456)  # initial values are overwritten by the state
    resumed.load_state_dict(saved)
    drive(resumed, range(split, 20), drift_of)

    assert resumed.history == uninterrupted.history
    assert (resumed.beta, resumed.gamma, resumed.baseline) == (uninterrupted.beta, uninterrupted.gamma,
                                                                uninterrupted.baseline)
    assert resumed.warmup_drifts == uninterrupted.warmup_drifts
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_invalid_inputs_raise():
    thermostat = Thermostat(SETTINGS)
    thermostat.observe(0, 1.0)
    with pytest.raises(ValueError, match="after one for step"):
        thermostat.observe(0, 1.0)
    with pytest.raises(ValueError, match="diverged"):
        thermostat.observe(1, float("nan"))
    with pytest.raises(ValueError, match="min_beta <= max_beta"):
        ThermostatSettings(min_beta=0.9, max_beta=0.5)
    with pytest.raises(ValueError, match="update_interval"):
        ThermostatSettings(update_interval=0)
    with pytest.raises(ValueError, match="version"):
        thermostat.load_state_dict({"version": 99})


def test_settings_from_config():
    cfg = build_config({"thermostat_update_interval": 7, "thermostat_warmup_steps": 3, "thermostat_min_beta": 0.2,
                        "thermostat_max_beta": 0.9, "thermostat_min_gamma": 0.1, "thermostat_max_gamma": 0.6,
                        "thermostat_k_beta": 1.5, "thermostat_k_gamma": 2.5, "thermostat_base_scale": 1.25})
    assert ThermostatSettings.from_config(cfg) == ThermostatSettings(
        update_interval=7, warmup_steps=3, min_beta=0.2, max_beta=0.9, min_gamma=0.1, max_gamma=0.6, k_beta=1.5,
        k_gamma=2.5, base_scale=1.25)


def test_broadcast_without_process_group_is_identity():
    assert not dist.is_initialized()
    assert broadcast_coefficients(0.3, 0.7) == (0.3, 0.7)
    assert broadcast_from_rank0([1.0 / 3.0]) == [1.0 / 3.0]


def _broadcast_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # Values that differ per rank; 1/3 and 0.1 also check that floats travel exactly.
        beta, gamma = broadcast_coefficients(1.0 / 3.0 if rank == 0 else 0.9, 0.1 if rank == 0 else 0.5)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump([beta, gamma], f)
    finally:
        dist.destroy_process_group()


def test_broadcast_replaces_other_ranks_values_with_rank0s(tmp_path):
    mp.spawn(_broadcast_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [1.0 / 3.0, 0.1]
