"""`lora_fused_matmul` (train/lora_fused.py) computes PEFT's LoRA layer: its backward is the exact
derivative of its forward (float64 gradcheck), and on the tiny VLA loss and every adapter gradient
match PEFT's forward within fp32 round-off (bf16: within bf16 round-off)."""

from __future__ import annotations

import torch

from steadyvla.config import build_config
from steadyvla.model.build import build_vla, load_tokenizer, wrap_lora
from steadyvla.train.fast_paths import apply_fast_paths, lora_in_model_dtype
from steadyvla.train.lora_fused import FusedLoraLinearMixin, _LoraLinear, fuse_lora_matmuls
from test_fast_paths import FP32_ROUND_OFF, _batch, _tiny


def test_backward_is_the_derivative_of_the_forward():
    g = torch.Generator().manual_seed(0)
    for bias in (True, False):
        x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
        b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
        a = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
        lb = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *t: _LoraLinear.apply(*t, 0.5), (x, w, b, a, lb))
        expected = x @ w.T + (b if bias else 0) + 0.5 * (x @ a.T) @ lb.T
        assert torch.allclose(_LoraLinear.apply(x, w, b, a, lb, 0.5), expected)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), grads


def _trained_adapter(model) -> None:
    """LoRA B starts at zero; make it nonzero so the adapter path carries signal both ways."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_fused_tiny_vla_matches_peft_in_fp32():
    cfg, tok, model, action_tok = _tiny()
    _trained_adapter(model)
    batch = _batch(tok, action_tok, cfg_image_size(cfg))
    keys = list(model.state_dict())
    loss, grads = _loss_and_grads(model, batch)
    lora_layers = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    assert fuse_lora_matmuls(model) == lora_layers > 0
    assert fuse_lora_matmuls(model) == 0  # already fused
    assert list(model.state_dict()) == keys
    fused_loss, fused_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(fused_loss, loss, **FP32_ROUND_OFF)
    assert fused_grads.keys() == grads.keys() and len(grads) > lora_layers  # the towers' unused last blocks get none
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_bf16_model_matches_peft_within_bf16_round_off():
    cfg = build_config({"model_preset": "tiny", "lora_rank": 4, "seed": 3, "dtype": "bfloat16"})
    tok = load_tokenizer(cfg)
    model = wrap_lora(build_vla(cfg, tok), cfg)
    _trained_adapter(model)
    lora_in_model_dtype(model)
    batch = _batch(tok, *_tiny()[3:], cfg_image_size(cfg))
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    loss, grads = _loss_and_grads(model, batch)
    assert fuse_lora_matmuls(model) > 0
    fused_loss, fused_grads = _loss_and_grads(model, batch)
    assert abs(float(fused_loss) - float(loss)) <= 0.02 * abs(float(loss))
    for name in grads:
        assert fused_grads[name].dtype == torch.float32  # fp32 master weights get fp32 gradients
        cos = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), grads[name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


def test_layers_with_dropout_keep_peft_forward_and_the_key_switches_it_on():
    cfg, _tok, model, _ = _tiny(lora_dropout=0.1)
    assert fuse_lora_matmuls(model) == 0
    cfg, _tok, model, _ = _tiny()
    assert not any("lora_fused_matmul" in f for f in apply_fast_paths(model, build_config({}), "cpu"))  # opt-in
    assert not any(isinstance(m, FusedLoraLinearMixin) for m in model.modules())
    cfg, _tok, model, _ = _tiny()
    on = build_config({"lora_fused_matmul": True})
    assert any(f.startswith("lora_fused_matmul (") for f in apply_fast_paths(model, on, "cpu"))


def cfg_image_size(cfg) -> int:
    from steadyvla.model.presets import get_preset

    return get_preset(cfg.model_preset).image_size
