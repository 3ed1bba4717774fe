"""The method's numbers against hand-built cases: ICSM ranking on a toy model whose action logits read
known directions of the instruction hidden state, the drift formula, and the Thermostat's response."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from steadyvla.method.icsm import IcsmOptions, covariance_drift, layer_subspaces, pooled_instruction_states
from steadyvla.method.probe import ProbeBatch
from steadyvla.method.thermostat import Thermostat, ThermostatSettings

D, VOCAB, PATCHES, N = 8, 16, 2, 48
INERT_BIG, DRIVER, WEAK_DRIVER, INERT_SMALL = 0, 1, 2, 3  # axes e0..e3 carry the instruction variance
INSTRUCTION_STD = {INERT_BIG: 10.0, DRIVER: 3.0, WEAK_DRIVER: 2.0, INERT_SMALL: 1.0}
PATCH_AXES, PATCH_STD = (4, 5, 6, 7), 40.0  # the image varies a lot, along axes the logits ignore


class Identity(nn.Module):
    def forward(self, h):
        return (h,)


class ToyVLA(nn.Module):
    """OpenVLA-shaped: <BOS>, patch embeddings, then the prompt tokens; 2 identity decoder layers; the
    logits at every position are a readout of the attention-masked sum of the last hidden states."""

    num_patches = PATCHES

    def __init__(self, embed: torch.Tensor, readout: torch.Tensor):
        super().__init__()
        self.embed, self.readout = embed, readout
        self.language_model = nn.Module()
        self.language_model.model = nn.Module()
        self.language_model.model.layers = nn.ModuleList([Identity(), Identity()])

    def forward(self, input_ids, attention_mask, pixel_values):
        tokens = self.embed[input_ids]
        patches = pixel_values.view(len(input_ids), PATCHES, D)
        h = torch.cat([tokens[:, :1], patches, tokens[:, 1:]], dim=1)
        for layer in self.language_model.model.layers:
            h = layer(h)[0]
        mask = torch.cat([attention_mask[:, :1], torch.ones(len(input_ids), PATCHES), attention_mask[:, 1:]], dim=1)
        context = (h * mask[..., None]).sum(dim=1)
        return SimpleNamespace(logits=(context @ self.readout.T)[:, None, :].expand(-1, h.shape[1], -1))


def toy_problem():
    """The toy teacher and a probe batch: sample i's 3 instruction tokens all embed to s_i."""
    g = torch.Generator().manual_seed(0)
    # ids: 0 <BOS>, 1 and 2 template tokens, 3 + i the instruction token of sample i
    embed = torch.zeros(3 + N, D)
    embed[1, :] = 1.0
    embed[2, :] = -0.5
    # centred, mutually orthogonal columns: the principal directions are exactly the axes e0..e3
    columns = torch.randn(N, len(INSTRUCTION_STD), generator=g)
    columns = torch.linalg.qr(columns - columns.mean(dim=0))[0]
    for k, (axis, std) in enumerate(INSTRUCTION_STD.items()):
        embed[3:, axis] = std * math.sqrt(N - 1) * columns[:, k]
    readout = torch.zeros(VOCAB, D)
    readout[:, DRIVER] = 0.1 * torch.randn(VOCAB, generator=g)
    readout[:, WEAK_DRIVER] = 0.03 * torch.randn(VOCAB, generator=g)
    input_ids = torch.tensor([[0, 1, 3 + i, 3 + i, 3 + i, 2] for i in range(N)])
    pixels = torch.zeros(N, PATCHES, D)
    for axis in PATCH_AXES:
        pixels[:, :, axis] = PATCH_STD * torch.randn(N, PATCHES, generator=g)
    instruction_mask = torch.zeros(N, input_ids.shape[1] + PATCHES, dtype=torch.bool)
    instruction_mask[:, 2 + PATCHES:5 + PATCHES] = True
    batch = ProbeBatch(input_ids, torch.ones_like(input_ids), pixels.view(N, -1), instruction_mask)
    return ToyVLA(embed, readout), batch


def weight_in(basis: torch.Tensor, axis: int) -> float:
    """||basisᵀ e_axis||: 1 when the axis lies in the span of the columns, 0 when orthogonal."""
    return float(basis[axis].norm())


@pytest.fixture(scope="module")
def toy():
    model, batch = toy_problem()
    pooled, valid = pooled_instruction_states(model, batch, [1], torch.device("cpu"))
    assert valid.all()
    return model, batch, pooled[1]


def test_pooled_states_are_the_instruction_token_mean(toy):
    model, batch, x = toy
    assert torch.allclose(x, model.embed[batch.input_ids[:, 2]])


def test_driving_direction_is_fragile_and_inert_ones_are_not(toy):
    model, batch, x = toy
    t = layer_subspaces(model, x, batch, 1, IcsmOptions(rank=4), torch.device("cpu"), PATCHES)
    assert t["U_f"].shape == (D, 1) and t["U_p"].shape == (D, 1)
    assert weight_in(t["U_f"], DRIVER) > 0.99
    assert weight_in(t["U_p"], WEAK_DRIVER) > 0.99  # "ranked": U_p = the next most sensitive
    for inert in (INERT_BIG, INERT_SMALL):
        assert weight_in(t["U_f"], inert) < 0.05 and weight_in(t["U_p"], inert) < 0.05
    assert t["sensitivity"].max() > 10 * t["sensitivity"].median()


def test_users_split_takes_plastic_from_the_least_sensitive_end(toy):
    model, batch, x = toy
    t = layer_subspaces(model, x, batch, 1, IcsmOptions(rank=4, split="extremes"), torch.device("cpu"), PATCHES)
    assert t["U_f"].shape == (D, 2) and t["U_p"].shape == (D, 1)  # r/2 and r/4
    assert weight_in(t["U_f"], DRIVER) > 0.99 and weight_in(t["U_f"], WEAK_DRIVER) > 0.99
    assert weight_in(t["U_p"], DRIVER) < 0.05 and weight_in(t["U_p"], WEAK_DRIVER) < 0.05


def test_absolute_epsilon_and_explicit_dims(toy):
    model, batch, x = toy
    assert IcsmOptions(epsilon_absolute=1e-3).injection_size(x) == 1e-3
    # big enough to matter in float32 (1e-3 changes these logits by ~1e-4: KLs at rounding-noise level)
    options = IcsmOptions(rank=4, epsilon_absolute=2.0, fragile_dim=1, plastic_dim=2)
    t = layer_subspaces(model, x, batch, 1, options, torch.device("cpu"), PATCHES)
    assert t["U_f"].shape == (D, 1) and t["U_p"].shape == (D, 2)
    assert weight_in(t["U_f"], DRIVER) > 0.99
    with pytest.raises(ValueError, match="icsm_fragile_dim` \\+ `icsm_plastic_dim`: 3 \\+ 2 exceed the 4"):
        IcsmOptions(rank=4, fragile_dim=3, plastic_dim=2).split_sizes(4)


def hand_covariance(rows: list[list[float]]) -> list[list[float]]:
    n, d = len(rows), len(rows[0])
    mean = [sum(r[j] for r in rows) / n for j in range(d)]
    return [[sum((r[a] - mean[a]) * (r[b] - mean[b]) for r in rows) / (n - 1) for b in range(d)] for a in range(d)]


def test_drift_is_the_frobenius_norm_of_the_covariance_difference_averaged_over_layers():
    states = {1: [[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]], 3: [[2.0, 2.0], [0.0, 0.0], [1.0, -1.0]]}
    teacher = {1: [[1.0, 0.5], [0.5, 2.0]], 3: [[0.5, 0.0], [0.0, 0.5]]}
    expected = []
    for layer, rows in states.items():
        c_s = hand_covariance(rows)
        expected.append(math.sqrt(sum((c_s[a][b] - teacher[layer][a][b]) ** 2 for a in range(2) for b in range(2))))
    drift = covariance_drift({k: torch.tensor(v) for k, v in states.items()},
                             {k: torch.tensor(v) for k, v in teacher.items()})
    assert drift == pytest.approx(sum(expected) / 2, rel=1e-6)
    # layer 1: C_S = [[7/3, -1/2], [-1/2, 1]] has the teacher's trace, so a trace formula would say 0
    assert expected[0] == pytest.approx(math.sqrt((4 / 3) ** 2 + 2 * 1.0 + 1.0), rel=1e-6)


def test_drift_of_pooled_toy_states_matches_the_hand_covariance(toy):
    _, _, x = toy
    rows = x[:5].tolist()
    c_t = torch.eye(D)
    c_s = torch.tensor(hand_covariance(rows))
    assert covariance_drift({1: x[:5]}, {1: c_t}) == pytest.approx(float((c_s - c_t).pow(2).sum().sqrt()), rel=1e-5)


def test_thermostat_response_to_a_known_drift_sequence():
    settings = ThermostatSettings(update_interval=2, warmup_steps=3, min_beta=0.2, max_beta=1.0, min_gamma=0.1,
                                  max_gamma=0.9, k_beta=0.5, k_gamma=1.0, base_scale=1.0)
    thermostat = Thermostat(settings)
    drifts = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 5: 2.0, 7: 100.0}  # measured steps only
    seen = []
    for step in range(9):
        if thermostat.should_measure(step):
            thermostat.observe(step, drifts[step])
        seen.append((thermostat.beta, thermostat.gamma))
    assert sorted(drifts) == [h["step"] for h in thermostat.history]
    assert thermostat.baseline == 2.0  # mean of the warmup drifts 1, 2, 3
    assert seen[:3] == [(1.0, 1.0)] * 3  # warmup keeps the starting values
    assert seen[3] == seen[4] == pytest.approx((1 / (1 + 0.5 * 2), 0.9 / (1 + 2)))  # delta 4 - 2 = 2
    assert seen[5] == seen[6] == (1.0, 0.9)  # drift back at the baseline: no damping
    assert seen[7] == seen[8] == (0.2, 0.1)  # delta 98: clipped to the minimums
