"""HSW gradient surgery: identity, norm bound, known values, and the backward hooks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from steadyvla.method.hsw import HSWHooks, hsw_transform


def orthonormal_pair(dim: int, r_f: int, r_p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint orthonormal bases: the first r_f and the next r_p columns of one QR factor."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    q = q.float()
    return q[:, :r_f].contiguous(), q[:, r_f:r_f + r_p].contiguous()


# --- the pure transform ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_identity_returns_the_same_tensor(dtype):
    U_f, U_p = orthonormal_pair(16, 4, 4)
    g = torch.randn(2, 5, 16).to(dtype)
    before = g.clone()
    out = hsw_transform(g, U_f, U_p, beta=1.0, gamma=1.0, eps=1e-6)
    assert out is g
    assert torch.equal(out, before)


def test_known_values_damping():
    # D=3, U_f = e1, U_p = e2, β=0.5, γ=0: g' = (0, 0.5·g2, g3); ‖g'‖ < ‖g‖ so no rescale.
    e = torch.eye(3)
    g = torch.tensor([[3.0, 4.0, 12.0], [-1.0, 2.0, -2.0]])
    out = hsw_transform(g, e[:, :1], e[:, 1:2], beta=0.5, gamma=0.0, eps=1e-6)
    assert torch.equal(out, torch.tensor([[0.0, 2.0, 12.0], [0.0, 1.0, -2.0]]))


def test_known_values_rescale_when_amplifying():
    # β=2 on U_p = e2: (3, 4, 12) -> (3, 8, 12), ‖·‖ = sqrt(217) > 13, rescaled by 13/(sqrt(217)+1e-6).
    e = torch.eye(3)
    g = torch.tensor([3.0, 4.0, 12.0])
    out = hsw_transform(g, e[:, :1], e[:, 1:2], beta=2.0, gamma=1.0, eps=1e-6)
    expected = torch.tensor([2.6474923301548197, 7.05997954707952, 10.589969320619279])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    assert torch.linalg.vector_norm(out).item() == pytest.approx(13.0, rel=1e-6)


def test_empty_subspaces_only_apply_the_norm_clamp():
    g = torch.randn(4, 8)
    empty = torch.zeros(8, 0)
    out = hsw_transform(g, empty, empty, beta=0.3, gamma=0.0, eps=1e-6)
    norms = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    torch.testing.assert_close(out, g * norms / (norms + 1e-6))


def test_output_dtype_matches_and_values_follow_float32():
    U_f, U_p = orthonormal_pair(16, 3, 5)
    g = torch.randn(2, 3, 16).bfloat16()
    out = hsw_transform(g, U_f, U_p, beta=0.5, gamma=0.2, eps=1e-6)
    assert out.dtype == torch.bfloat16
    reference = hsw_transform(g.float(), U_f, U_p, beta=0.5, gamma=0.2, eps=1e-6)
    assert torch.equal(out, reference.bfloat16())


def test_dimension_mismatch_raises():
    U_f, U_p = orthonormal_pair(8, 2, 2)
    with pytest.raises(ValueError, match="last dim"):
        hsw_transform(torch.randn(3, 7), U_f, U_p, beta=0.5, gamma=0.5, eps=1e-6)


@settings(max_examples=100, deadline=None)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 4),
    dim=st.integers(4, 64),
    rank_fractions=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    beta=st.floats(0.0, 2.0),
    gamma=st.floats(0.0, 2.0),
    eps=st.floats(1e-12, 1e-2),
    log_scale=st.floats(-6, 6),
    kind=st.sampled_from(["random", "fragile", "plastic", "mixed"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_norm_never_grows(batch, tokens, dim, rank_fractions, beta, gamma, eps, log_scale, kind, seed):
    r_f = int(rank_fractions[0] * (dim // 2))
    r_p = int(rank_fractions[1] * (dim // 2))
    U_f, U_p = orthonormal_pair(dim, r_f, r_p, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    # Gradients lying inside the subspaces are the worst case for β, γ > 1.
    if kind == "random" or (kind == "fragile" and r_f == 0) or (kind == "plastic" and r_p == 0):
        g = torch.randn(batch, tokens, dim, generator=gen)
    elif kind == "fragile":
        g = torch.randn(batch, tokens, r_f, generator=gen) @ U_f.T
    elif kind == "plastic":
        g = torch.randn(batch, tokens, r_p, generator=gen) @ U_p.T
    else:
        g = torch.randn(batch, tokens, dim, generator=gen) * 0.1
        g = g + torch.randn(batch, tokens, r_f, generator=gen) @ U_f.T
        g = g + torch.randn(batch, tokens, r_p, generator=gen) @ U_p.T
    g = g * 10.0**log_scale
    out = hsw_transform(g, U_f, U_p, beta, gamma, eps)
    assert out.shape == g.shape and out.dtype == g.dtype
    before = torch.linalg.vector_norm(g.double(), dim=-1)
    after = torch.linalg.vector_norm(out.double(), dim=-1)
    # Float32 rounding of the norms and of the rescale only; a missing clamp would show as up to 2x.
    assert bool((after <= before * (1 + 1e-5)).all()), (after / before).max().item()


def test_components_are_scaled_by_their_coefficients():
    U_f, U_p = orthonormal_pair(32, 6, 6, seed=4)
    g = torch.randn(5, 32)
    beta, gamma = 0.7, 0.25  # both < 1: the clamp never binds, g' is exactly the decomposition
    out = hsw_transform(g, U_f, U_p, beta, gamma, eps=1e-6)
    unclamped_norm = torch.linalg.vector_norm(out, dim=-1)
    assert bool((unclamped_norm <= torch.linalg.vector_norm(g, dim=-1)).all())
    proj = lambda x, U: (x @ U) @ U.T  # noqa: E731
    torch.testing.assert_close(proj(out, U_f), gamma * proj(g, U_f), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proj(out, U_p), beta * proj(g, U_p), atol=1e-5, rtol=1e-5)
    rest = lambda x: x - proj(x, U_f) - proj(x, U_p)  # noqa: E731
    torch.testing.assert_close(rest(out), rest(g), atol=1e-5, rtol=1e-5)


# --- the hooks ------------------------------------------------------------------------------------------

D = 8


class TupleLayer(nn.Module):
    """A decoder-layer stand-in that returns (hidden_state, extra), like older HF decoder layers."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.tanh(self.linear(x)), None


class TinyStack(nn.Module):
    def __init__(self, checkpoint_mode: str | None = None) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.low = TupleLayer()  # hooked, tuple output
        self.mid = nn.Linear(D, D)  # hooked, tensor output
        self.head = nn.Linear(D, 1)
        self.checkpoint_mode = checkpoint_mode  # None, "reentrant" or "non_reentrant"

    def lower(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.checkpoint_mode is not None:
            return checkpoint(lambda t: self.low(t)[0], h, use_reentrant=self.checkpoint_mode == "reentrant")
        return self.low(h)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.lower(x)))).square().sum()


def make_stack(**kwargs) -> TinyStack:
    torch.manual_seed(0)
    return TinyStack(**kwargs)


SUBSPACES = {"low": orthonormal_pair(D, 2, 3, seed=1), "mid": orthonormal_pair(D, 3, 1, seed=2)}
EPS = 1e-6


def param_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def manual_grads(model: TinyStack, xs: list[torch.Tensor], beta: float, gamma: float):
    """Parameter gradients with the transform applied by hand at `low` and `mid`; plus the norms.

    Runs on a hook-free copy of `model`, so attached hooks cannot interfere.
    """
    model = clone_stack(model)
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    g_sq = gp_sq = 0.0
    for x in xs:
        h_low = model.low(model.inp(x))[0]
        h_mid = model.mid(h_low)
        loss = model.head(torch.tanh(h_mid)).square().sum()
        above = [n for n in params if n.startswith("head")]
        for n, g in zip(above, torch.autograd.grad(loss, [params[n] for n in above], retain_graph=True)):
            total[n] += g
        g_mid = torch.autograd.grad(loss, h_mid, retain_graph=True)[0]
        g_mid2 = hsw_transform(g_mid, *SUBSPACES["mid"], beta, gamma, EPS)
        names = [n for n in params if n.startswith("mid")]
        grads = torch.autograd.grad(h_mid, [params[n] for n in names] + [h_low], grad_outputs=g_mid2, retain_graph=True)
        for n, g in zip(names, grads):
            total[n] += g
        g_low = grads[-1]
        g_low2 = hsw_transform(g_low, *SUBSPACES["low"], beta, gamma, EPS)
        names = [n for n in params if n.startswith(("low", "inp"))]
        for n, g in zip(names, torch.autograd.grad(h_low, [params[n] for n in names], grad_outputs=g_low2)):
            total[n] += g
        g_sq += g_mid.square().sum().item() + g_low.square().sum().item()
        gp_sq += g_mid2.square().sum().item() + g_low2.square().sum().item()
    return total, (g_sq**0.5, gp_sq**0.5)


def hooks_for(model: TinyStack) -> HSWHooks:
    return HSWHooks({"low": model.low, "mid": model.mid}, SUBSPACES, eps=EPS)


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_hooks_match_manual_transform():
    model = make_stack()
    x = torch.randn(3, 4, D)
    hooks = hooks_for(model)
    hooks.attach()
    hooks.beta, hooks.gamma = 0.4, 0.1
    got = param_grads(model, x)
    want, (g_norm, gp_norm) = manual_grads(model, [x], 0.4, 0.1)
    assert_grads_close(got, want)
    baseline = param_grads(clone_stack(model), x)
    assert torch.equal(got["head.weight"], baseline["head.weight"])  # layers above are untouched
    assert not torch.allclose(got["inp.weight"], baseline["inp.weight"])
    hooks.pop_norms()
    param_grads(model, x)
    norms = hooks.pop_norms()
    assert norms == pytest.approx((g_norm, gp_norm), rel=1e-5)
    assert norms[1] < norms[0]
    assert hooks.pop_norms() == (0.0, 0.0)


def clone_stack(model: TinyStack) -> TinyStack:
    fresh = make_stack()
    fresh.load_state_dict(model.state_dict())
    return fresh


def test_identity_coefficients_are_bitwise_baseline():
    model = make_stack()
    x = torch.randn(3, 4, D)
    baseline = param_grads(model, x)
    hooks = hooks_for(model)
    hooks.attach()
    with_hooks = param_grads(model, x)
    for name in baseline:
        assert torch.equal(with_hooks[name], baseline[name]), name
    g_norm, gp_norm = hooks.pop_norms()
    assert g_norm > 0 and g_norm == gp_norm


def damping_setup():
    """A stack, an input, its hook-free parameter gradients, and attached damping hooks."""
    model = make_stack()
    x = torch.randn(3, 4, D)
    baseline = param_grads(model, x)
    hooks = hooks_for(model)
    hooks.beta, hooks.gamma = 0.2, 0.0
    hooks.attach()
    return model, x, baseline, hooks


def test_detach_restores_baseline_gradients():
    model, x, baseline, hooks = damping_setup()
    hooks.attach()  # idempotent: still one hook per module
    changed = param_grads(model, x)
    assert not torch.equal(changed["inp.weight"], baseline["inp.weight"])
    hooks.detach()
    after = param_grads(model, x)
    for name in baseline:
        assert torch.equal(after[name], baseline[name]), name
    assert hooks.pop_norms()[0] > 0  # from the attached backward only
    param_grads(model, x)
    assert hooks.pop_norms() == (0.0, 0.0)


def test_detach_between_forward_and_backward_disarms_pending_hooks():
    model, x, baseline, hooks = damping_setup()
    model.zero_grad(set_to_none=True)
    loss = model(x)
    hooks.detach()
    loss.backward()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, baseline[name]), name


def test_gradient_accumulation_over_two_micro_batches():
    model = make_stack()
    xs = [torch.randn(2, 3, D), torch.randn(2, 5, D)]
    hooks = hooks_for(model)
    hooks.beta, hooks.gamma = 1.5, 0.3  # β > 1: the norm clamp is exercised too
    hooks.attach()
    model.zero_grad(set_to_none=True)
    for x in xs:
        model(x).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    want, norms = manual_grads(model, xs, 1.5, 0.3)
    assert_grads_close(got, want)
    assert hooks.pop_norms() == pytest.approx(norms, rel=1e-5)


def test_coefficient_change_applies_to_next_backward():
    model = make_stack()
    x = torch.randn(2, 3, D)
    hooks = hooks_for(model)
    hooks.attach()
    param_grads(model, x)
    hooks.beta, hooks.gamma = 0.5, 0.5
    got = param_grads(model, x)
    assert_grads_close(got, manual_grads(model, [x], 0.5, 0.5)[0])


def test_no_grad_forward_is_skipped():
    model = make_stack()
    hooks = hooks_for(model)
    hooks.beta, hooks.gamma = 0.5, 0.5
    hooks.attach()
    with torch.no_grad():
        model(torch.randn(2, 3, D))
    assert hooks.pop_norms() == (0.0, 0.0)


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_activation_checkpointing_applies_surgery_once(mode):
    x = torch.randn(3, 4, D)
    plain, ckpt = make_stack(), make_stack(checkpoint_mode=mode)
    results = []
    for model in (plain, ckpt):
        hooks = hooks_for(model)
        hooks.beta, hooks.gamma = 0.3, 0.6
        hooks.attach()
        results.append((param_grads(model, x), hooks.pop_norms()))
    assert_grads_close(results[0][0], results[1][0])
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)


def test_bf16_gradients_keep_dtype():
    model = make_stack().bfloat16()
    hooks = hooks_for(model)
    hooks.beta, hooks.gamma = 0.5, 0.0
    hooks.attach()
    grads = param_grads(model, torch.randn(2, 3, D, dtype=torch.bfloat16))
    assert all(g.dtype == torch.bfloat16 for g in grads.values())
    g_norm, gp_norm = hooks.pop_norms()
    assert 0 < gp_norm < g_norm


def test_mismatched_names_and_dims_raise():
    model = make_stack()
    with pytest.raises(ValueError, match="differ"):
        HSWHooks({"low": model.low}, SUBSPACES, eps=EPS)
    hooks = HSWHooks({"low": model.low, "mid": model.mid},
                     {"low": orthonormal_pair(D + 1, 1, 1), "mid": SUBSPACES["mid"]}, eps=EPS)
    hooks.beta = 0.5
    hooks.attach()
    with pytest.raises(ValueError, match="hidden size"):
        model(torch.randn(2, 3, D)).backward()


def test_unsupported_output_type_raises():
    class DictOut(nn.Module):
        def forward(self, x):
            return {"h": x}

    module = DictOut()
    hooks = HSWHooks({"m": module}, {"m": orthonormal_pair(D, 1, 1)}, eps=EPS)
    hooks.attach()
    with pytest.raises(TypeError, match="expected a Tensor"):
        module(torch.randn(2, D, requires_grad=True))
