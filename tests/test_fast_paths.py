"""The LoRA step's fast paths compute what the plain paths compute (tolerances stated per test),
leave checkpoints as they were, and a kill -9 + resume with them on is still bit-exact."""

from __future__ import annotations

import copy
import signal

import pytest
import torch

from helpers import (
    MAX_STEPS, assert_bitwise_equal, checkpoint_tensors, finetune_args, metrics_lines, resume_values, run_cli,
    run_dir_of,
)
from steadyvla.config import build_config
from steadyvla.faults import FAULT_ENV
from steadyvla.model.build import action_tokenizer_for, build_vla, load_tokenizer, model_spec, wrap_lora
from steadyvla.model.prompt import IGNORE_INDEX, PromptBuilder
from steadyvla.train.fast_paths import apply_fast_paths, compile_blocks, compile_enabled, fused_enabled, lora_in_model_dtype
from steadyvla.train.finetune import finetune
from steadyvla.train.metrics import action_metrics, read_metrics_values
from steadyvla.train.optim import build_optimizer
from steadyvla.train.run_dir import run_dir_for

FP32_ROUND_OFF = dict(rtol=1e-5, atol=1e-6)  # fp32 sums taken in a different order / over fewer rows


def _tiny(**overrides):
    cfg = build_config({"model_preset": "tiny", "lora_rank": 4, "seed": 3, **overrides})
    tok = load_tokenizer(cfg)
    model = wrap_lora(build_vla(cfg, tok), cfg)
    return cfg, tok, model, action_tokenizer_for(tok, model_spec(cfg, tok))


def _batch(tok, action_tok, size: int, n: int = 3) -> dict[str, torch.Tensor]:
    builder = PromptBuilder(tok)
    g = torch.Generator().manual_seed(1)
    rows = [builder.build(text, torch.randint(action_tok.first_action_id, action_tok.vocab_end, (7,), generator=g).numpy())
            for text in ["open the drawer", "push the red block to the left side", "press it"][:n]]
    length = max(len(r.input_ids) for r in rows)
    ids = torch.full((n, length), int(tok.pad_token_id))
    labels = torch.full((n, length), IGNORE_INDEX)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)], labels[i, : len(r.labels)] = torch.as_tensor(r.input_ids), torch.as_tensor(r.labels)
    return {"input_ids": ids, "labels": labels, "attention_mask": (ids != tok.pad_token_id).long(),
            "pixel_values": torch.randn(n, 6, size, size, generator=g)}


def _reference_metrics(output, action_tok) -> dict[str, float]:
    """The metrics as the plain path computed them before (boolean indexing, Python floats)."""
    preds = output.logits.argmax(dim=-1)
    mask = action_tok.is_action_token(output.labels)
    l1 = (action_tok.decode_torch(preds[mask]) - action_tok.decode_torch(output.labels[mask])).abs()
    return {"train_loss": float(output.loss.detach()), "action_accuracy": float(((preds == output.labels) & mask).sum() / mask.sum()),
            "l1_loss": float(l1.mean())}


def test_logits_at_labels_only_gives_the_plain_loss_metrics_and_gradients():
    cfg, tok, model, action_tok = _tiny()
    batch = _batch(tok, action_tok, model.get_base_model().spec.image_size)
    results = []
    for text_only in (False, True):
        model.get_base_model().text_logits_only = text_only
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        # LoRA on the last ViT block and SigLIP's head gets no gradient: the VLA never runs them
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, read_metrics_values(action_metrics(out, action_tok)), grads))
    (plain, plain_m, plain_g), (fast, fast_m, fast_g) = results
    assert fast.logits.shape[1] == batch["input_ids"].shape[1] - 1  # text positions only, no patch
    assert plain.logits.shape[1] == fast.logits.shape[1] + model.get_base_model().num_patches
    assert fast.labels.equal(plain.labels[:, model.get_base_model().num_patches:])
    assert fast_m == pytest.approx(plain_m, rel=1e-6)
    assert plain_m == pytest.approx(_reference_metrics(plain, action_tok), rel=1e-6)
    assert fast_g.keys() == plain_g.keys() and len(plain_g) > 50
    for name in plain_g:
        torch.testing.assert_close(fast_g[name], plain_g[name], **FP32_ROUND_OFF)


def test_device_metrics_without_action_positions_are_zero_not_nan():
    cfg, tok, model, action_tok = _tiny()
    batch = _batch(tok, action_tok, model.get_base_model().spec.image_size)
    batch["labels"][:] = IGNORE_INDEX
    batch["labels"][:, -1] = 2  # only </s> left
    model.get_base_model().text_logits_only = True
    values = read_metrics_values(action_metrics(model(**batch), action_tok))
    assert values["action_accuracy"] == 0.0 and values["l1_loss"] == 0.0


def test_compile_blocks_compiles_every_block_in_place_and_keeps_state_dict_keys():
    cfg, tok, model, _ = _tiny()
    keys = list(model.state_dict())
    adapter_keys = sorted(k for k in keys if "lora_" in k)
    assert compile_blocks(model) == 4 + 3 + 3  # 4 Llama decoder layers, 3 blocks in each ViT tower
    assert list(model.state_dict()) == keys
    assert not any("_orig_mod" in k for k in model.state_dict())
    assert sorted(k for k in model.state_dict() if "lora_" in k) == adapter_keys
    torch._dynamo.reset()


def test_compile_mode_reaches_every_block_and_bad_modes_are_refused(monkeypatch):
    """`compile_mode` is torch.compile's mode of each block (compiling itself is exercised on the GPU:
    tests/test_gpu.py and bench/lora_throughput.py; on this CPU it takes minutes)."""
    from steadyvla.config import ConfigError

    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    _cfg, _tok, model, _ = _tiny()
    cfg = build_config({"compile_blocks": True, "compile_mode": "reduce-overhead"})
    assert "compile_blocks (10 blocks, mode reduce-overhead)" in apply_fast_paths(model, cfg, "cpu")
    assert modes == ["reduce-overhead"] * 10
    modes.clear()
    compile_blocks(model)
    assert modes == [None] * 10  # torch.compile's default mode
    with pytest.raises(ConfigError, match="compile_mode"):
        build_config({"compile_mode": "fastest"})


def test_null_compile_mode_uses_cuda_graphs_only_where_they_are_safe():
    """null: CUDA graphs for plain LoRA fine-tuning on CUDA with one micro-batch per step; the default
    mode under gradient accumulation, the method, periodic evaluation, full training and on CPU."""
    from steadyvla.config import ConfigError
    from steadyvla.train.fast_paths import resolved_compile_mode, uses_cuda_graphs

    plain = build_config({})
    assert plain.compile_mode is None
    assert resolved_compile_mode(plain, "cuda") == "reduce-overhead" and uses_cuda_graphs(plain, "cuda:0")
    assert resolved_compile_mode(plain, "cpu") == "default" and not uses_cuda_graphs(plain, "cpu")
    for unsafe in ({"grad_accumulation_steps": 2}, {"method_enabled": True}, {"enable_periodic_eval": True},
                   {"use_lora": False}):
        cfg = build_config(unsafe)
        assert resolved_compile_mode(cfg, "cuda") == "default", unsafe
        assert not uses_cuda_graphs(cfg, "cuda")
    assert not uses_cuda_graphs(build_config({"compile_blocks": False}), "cuda")
    assert resolved_compile_mode(build_config({"compile_mode": "default"}), "cuda") == "default"
    for graphs in ("reduce-overhead", "max-autotune"):
        assert uses_cuda_graphs(build_config({"compile_mode": graphs}), "cuda")
        with pytest.raises(ConfigError, match=r"compile_mode.*grad_accumulation_steps: 1.*got 4"):
            build_config({"compile_mode": graphs, "grad_accumulation_steps": 4})
    build_config({"compile_mode": "max-autotune-no-cudagraphs", "grad_accumulation_steps": 4})  # no graphs: fine


def test_fast_path_defaults_follow_the_device():
    cfg = build_config({})
    assert cfg.logits_at_labels_only is True and cfg.compile_blocks is None and cfg.fused_optimizer is None
    assert not compile_enabled(cfg, "cpu") and compile_enabled(cfg, "cuda")
    assert not fused_enabled(cfg, "cpu") and fused_enabled(cfg, "cuda")
    off = build_config({"compile_blocks": False, "fused_optimizer": False, "logits_at_labels_only": False})
    assert not compile_enabled(off, "cuda") and not fused_enabled(off, "cuda")
    _cfg, _tok, model, _ = _tiny()
    assert apply_fast_paths(model, off, "cpu") == [] and model.get_base_model().text_logits_only is False


def test_fused_adamw_and_foreach_clipping_match_the_plain_update():
    cfg, tok, model, action_tok = _tiny(learning_rate=1e-2, weight_decay=0.01)
    batch = _batch(tok, action_tok, model.get_base_model().spec.image_size)
    models = [model, copy.deepcopy(model)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optims = [build_optimizer(models[0], cfg, fused=False), build_optimizer(models[1], cfg, fused=True)]
    # one update: later steps' forwards see the round-off of this one and differences compound, so the
    # per-update equivalence (fp32 round-off) is what is asserted
    for _ in range(1):
        for m, opt, foreach in zip(models, optims, (False, True)):
            m(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 0.5, foreach=foreach)
            opt.step()
            opt.zero_grad(set_to_none=True)
    plain = dict(models[0].named_parameters())
    changed = 0
    for name, p in models[1].named_parameters():
        torch.testing.assert_close(p, plain[name], **FP32_ROUND_OFF)
        changed += p.requires_grad and not p.equal(before[name])
    assert changed > 50  # the update did move the LoRA weights


def _fast_values(synthetic_root, run_root) -> dict:
    # every fast path that runs on a CPU: label-position logits (default), fused AdamW + foreach clipping,
    # LoRA in the model's dtype (a bf16 model)
    return resume_values(synthetic_root, run_root, fused_optimizer=True, logits_at_labels_only=True, dtype="bfloat16")


def test_kill_9_and_resume_with_fast_paths_on_is_bit_exact(synthetic_root, tmp_path):
    reference = _fast_values(synthetic_root, tmp_path / "ref")
    done = run_cli(finetune_args(reference))
    assert done.returncode == 0, done.stdout + done.stderr
    ref_dir = run_dir_of(reference)
    values = _fast_values(synthetic_root, tmp_path / "killed")
    killed = run_cli(finetune_args(values), extra_env={FAULT_ENV: "mid_save@4"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(finetune_args(values))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "fast paths: logits_at_labels_only, lora_in_model_dtype (" in resumed.stdout
    assert "fused_optimizer" in resumed.stdout
    assert metrics_lines(run_dir_of(values)) == metrics_lines(ref_dir)
    final = f"checkpoints/step-{MAX_STEPS:06d}"
    assert_bitwise_equal(checkpoint_tensors(run_dir_of(values) / final), checkpoint_tensors(ref_dir / final))


def test_saves_into_reused_snapshot_buffers_write_the_same_files(make_config):
    every_step = make_config(max_steps=4, save_steps=1, run_id="every")  # 4 saves through the same buffers
    once = make_config(max_steps=4, save_steps=4, run_id="once")
    two = make_config(max_steps=2, save_steps=2, run_id="two")
    for cfg in (every_step, once, two):
        finetune(cfg, log=lambda _m: None)

    def ckpt(cfg, step: int) -> dict:
        return checkpoint_tensors(run_dir_for(cfg) / "checkpoints" / f"step-{step:06d}")

    assert_bitwise_equal(ckpt(every_step, 4), ckpt(once, 4))
    assert_bitwise_equal(ckpt(every_step, 2), ckpt(two, 2))


def test_lora_in_model_dtype_runs_lora_in_bf16_with_fp32_master_weights():
    cfg, tok, plain, action_tok = _tiny(dtype="bfloat16")
    with torch.no_grad():  # B starts at zero: make the adapter's forward contribution visible
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    fast = copy.deepcopy(plain)
    assert lora_in_model_dtype(fast) > 0
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert all(p.dtype == torch.float32 for n, p in fast.named_parameters() if p.requires_grad)
    seen = []
    proj = next(m for n, m in fast.named_modules() if n.endswith("lora_A.default"))
    proj.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    batch = _batch(tok, action_tok, plain.get_base_model().spec.image_size)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    losses = []
    for model in (plain, fast):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach().float())
    assert seen == [torch.bfloat16]  # the adapter's matmul ran in the model's dtype
    # bf16 round-off: the adapter's matmuls lose fp32's mantissa bits (8 bits vs 24)
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in fast.named_parameters():
        if p.requires_grad and grads[name] is None:  # layers the forward never runs (the towers' last block)
            assert p.grad is None
        elif p.requires_grad:
            assert p.grad.dtype == torch.float32
            rel = (p.grad - grads[name]).norm() / grads[name].norm().clamp_min(1e-12)
            assert rel < 5e-2, (name, float(rel))
    # on an fp32 model the adapter already has the model's dtype: nothing changes
    _cfg, _tok, fp32_model, _ = _tiny()
    assert lora_in_model_dtype(fp32_model) == 0
