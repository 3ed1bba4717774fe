"""The `vla-1b` preset: the parameter count its comment and README state, its config.json round trip,
and the Llama-2 tokenizer it is built with (meta device: no memory, no init)."""

from __future__ import annotations

import json

import pytest

from conftest import LLAMA_TOKENIZER_DIR
from steadyvla.config import build_config
from steadyvla.model.build import load_tokenizer, model_spec
from steadyvla.model.openvla_config import (
    openvla_config_from_spec, preprocessor_config_from_spec, spec_from_openvla_config,
)
from steadyvla.model.openvla_load import build_empty
from steadyvla.model.presets import get_preset

LLAMA2_TOKENS = 32001  # Llama-2's 32000 + <PAD>


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_vla_1b_parameter_count_is_what_the_docs_state():
    spec = get_preset("vla-1b").spec(LLAMA2_TOKENS, LLAMA2_TOKENS - 1)
    model = build_empty(spec)
    assert model.language_model.config.vocab_size == 32064
    assert _count(model.vision_backbone) == 730_911_680  # OpenVLA's DINOv2 ViT-L/14 + SigLIP SO400M/14
    assert _count(model.projector) == 40_972_800
    assert _count(model.language_model) == 1_056_253_952
    assert _count(model) == 1_828_138_432
    assert model.num_patches == 256  # both towers at 224 px, as openvla-7b


def test_vla_1b_config_json_rebuilds_the_same_model(tmp_path):
    spec = get_preset("vla-1b").spec(LLAMA2_TOKENS, LLAMA2_TOKENS - 1)
    config = openvla_config_from_spec(spec, {})
    assert {k: config["text_config"][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads")} == \
        {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18, "num_attention_heads": 16,
         "num_key_value_heads": 16}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config_from_spec(spec)))
    reread = spec_from_openvla_config(json.loads((tmp_path / "config.json").read_text()), tmp_path)
    shapes = {k: tuple(t.shape) for k, t in build_empty(reread).state_dict().items()}
    assert shapes == {k: tuple(t.shape) for k, t in build_empty(spec).state_dict().items()}


@pytest.mark.skipif(not LLAMA_TOKENIZER_DIR.is_dir(), reason=f"no Llama-2 tokenizer at {LLAMA_TOKENIZER_DIR}")
def test_vla_1b_builds_with_the_llama2_tokenizer():
    cfg = build_config(dict(model_preset="vla-1b", tokenizer_path=str(LLAMA_TOKENIZER_DIR)))
    tokenizer = load_tokenizer(cfg)
    spec = model_spec(cfg, tokenizer)
    assert len(tokenizer) == LLAMA2_TOKENS and spec.llm["vocab_size"] == 32064
    assert spec.action_vocab_end == 32000  # action bins on ids 31744..31999, as openvla-7b
    assert _count(build_empty(spec)) == 1_828_138_432
