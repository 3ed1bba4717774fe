import time

import torch

from steadyvla.config import build_config
from steadyvla.model.build import build_vla, load_tokenizer, wrap_lora
from steadyvla.model.presets import get_preset
from steadyvla.model.prompt import IGNORE_INDEX


def _batch(tok, batch=8, length=20, image_size=56):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (batch, length), generator=g)
    ids[:, 0] = tok.bos_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -5:] = torch.randint(tok.vocab_size - 256, tok.vocab_size, (batch, 5), generator=g)
    ids[:, -5:] = labels[:, -5:]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                pixel_values=torch.randn(batch, 6, image_size, image_size, generator=g))


def test_tiny_vla_has_openvla_attribute_names_and_fused_projector():
    cfg = build_config({})
    vla = build_vla(cfg, load_tokenizer(cfg))
    names = {n for n, _ in vla.named_modules()}
    for name in ("vision_backbone.featurizer", "vision_backbone.fused_featurizer", "projector.fc1", "projector.fc2",
                 "projector.fc3", "language_model.model.layers.0.self_attn.q_proj", "language_model.lm_head"):
        assert name in names
    assert vla.language_model.config.vocab_size % 64 == 0
    assert get_preset("openvla-7b").llm["rms_norm_eps"] == 1e-6


def test_forward_backward_and_patch_positions_are_ignored():
    cfg = build_config({})
    tok = load_tokenizer(cfg)
    vla = build_vla(cfg, tok)
    batch = _batch(tok)
    out = vla(**batch)
    n_patches = vla.num_patches
    assert out.logits.shape[1] == batch["input_ids"].shape[1] + n_patches - 1
    assert (out.labels[:, :n_patches] == IGNORE_INDEX).all()
    assert (out.labels != IGNORE_INDEX).sum() == (batch["labels"] != IGNORE_INDEX).sum()
    out.loss.backward()
    assert vla.vision_backbone.featurizer.patch_embed.proj.weight.grad is not None
    start = time.perf_counter()
    vla(**batch).loss.backward()
    assert time.perf_counter() - start < 5.0  # generous bound; bench/ measures the real step time


def test_lora_trains_only_adapter_parameters():
    cfg = build_config({"lora_rank": 4})
    tok = load_tokenizer(cfg)
    model = wrap_lora(build_vla(cfg, tok), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    assert any("vision_backbone.featurizer" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**_batch(tok)).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_model_init_is_deterministic_per_seed():
    cfg = build_config({"seed": 11})
    tok = load_tokenizer(cfg)
    a, b = build_vla(cfg, tok).state_dict(), build_vla(cfg, tok).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_towers_stop_at_the_second_to_last_block_with_the_same_features():
    """The features are timm's second-to-last block output exactly (as get_intermediate_layers gives
    them), but the last block never runs."""
    cfg = build_config({})
    backbone = build_vla(cfg, load_tokenizer(cfg)).vision_backbone.eval()
    images = torch.randn(2, 6, backbone.featurizer.patch_embed.img_size[0], backbone.featurizer.patch_embed.img_size[1],
                         generator=torch.Generator().manual_seed(0))
    calls = []
    last = backbone.featurizer.blocks[-1].register_forward_hook(lambda *_: calls.append("last"))
    with torch.no_grad():
        got = backbone(images)
        first, second = images[:, :3], images[:, 3:]
        want = torch.cat([backbone.featurizer.get_intermediate_layers(first, n={len(backbone.featurizer.blocks) - 2})[0],
                          backbone.fused_featurizer.get_intermediate_layers(
                              second, n={len(backbone.fused_featurizer.blocks) - 2})[0]], dim=2)
    assert calls == ["last"]  # only the reference call above ran the last block
    assert torch.equal(got, want)
    last.remove()
