"""OpenVLA Hugging Face layout: write a tiny random model, load it back, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from openvla_fixtures import NORM_STATS, random_inputs, tiny_model, write_tiny_openvla
from steadyvla import load_vla
from steadyvla.model.openvla_config import OpenVLAFormatError
from steadyvla.model.openvla_keys import WEIGHTS_INDEX
from steadyvla.model.openvla_save import write_openvla_dir

UPSTREAM_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "preprocessor_config.json",
                  "processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_openvla(tmp_path_factory.mktemp("ov") / "tiny-openvla")


def test_layout_files_config_fields_keys_and_dtypes(tiny_dir):
    path, model = tiny_dir
    names = {p.name for p in path.iterdir()}
    assert UPSTREAM_FILES <= names
    shards = sorted(n for n in names if n.startswith("model-"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / WEIGHTS_INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "openvla" and config["architectures"] == ["OpenVLAForActionPrediction"]
    assert config["arch_specifier"] == "no-align+fused-gelu-mlp" and config["use_fused_vision_backbone"] is True
    assert config["norm_stats"] == NORM_STATS and config["torch_dtype"] == "bfloat16"
    assert config["text_config"]["vocab_size"] == 768 and config["pad_to_multiple_of"] == 64
    total, keys = 0, set()
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16, key
                total += t.numel() * t.element_size()
                keys.add(key)
    assert index["metadata"]["total_size"] == total
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in keys
    assert not any(k.endswith(".gamma") for k in keys)
    assert keys == set(index["weight_map"]) and len(keys) == len(model.state_dict())
    assert json.loads((path / "added_tokens.json").read_text()) == {"<PAD>": 705}


def test_loads_back_with_bit_identical_logits(tiny_dir):
    path, model = tiny_dir
    bundle = load_vla(path)
    assert all(p.dtype == torch.bfloat16 for p in bundle.model.parameters())
    assert not any(p.is_meta for p in bundle.model.parameters())
    inputs = random_inputs(bundle.tokenizer)
    with torch.no_grad():
        assert torch.equal(bundle.model(**inputs).logits, model(**inputs).logits)
    assert bundle.norm_stats == NORM_STATS and len(bundle.tokenizer) == 706
    assert load_vla(path, dtype="float32").model.projector.fc1.weight.dtype == torch.float32


def test_explicit_text_config_fields_are_honoured(tmp_path):
    model, tok = tiny_model()
    path = write_openvla_dir(tmp_path / "m", model.spec, model.state_dict(), tok, NORM_STATS, dtype=None)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-3  # honoured even though it is not the Llama default
    (path / "config.json").write_text(json.dumps(config))
    loaded = load_vla(path).model
    assert loaded.language_model.config.rms_norm_eps == 1e-3
    assert loaded.language_model.config.num_hidden_layers == 4 and loaded.language_model.config.hidden_size == 96
    assert (path / "model.safetensors").exists() and not (path / WEIGHTS_INDEX).exists()


def test_single_file_checkpoint_loads(tmp_path):
    model, tok = tiny_model(seed=1)
    path = write_openvla_dir(tmp_path / "m", model.spec, model.state_dict(), tok, NORM_STATS, dtype=None)
    inputs = random_inputs(tok)
    with torch.no_grad():
        assert torch.equal(load_vla(path).model(**inputs).logits, model(**inputs).logits)


def test_not_an_openvla_dir(tmp_path):
    with pytest.raises(OpenVLAFormatError, match="config.json: missing"):
        load_vla(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(OpenVLAFormatError, match="`model_type` = 'llama', expected 'openvla'"):
        load_vla(tmp_path)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(tiny_dir, tmp_path):
    path = _copy(tiny_dir[0], tmp_path / "m")
    (path / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(OpenVLAFormatError, match="model-00002-of-00005.safetensors: shard listed in .* is missing"):
        load_vla(path)


def test_truncated_shard_is_named(tiny_dir, tmp_path):
    path = _copy(tiny_dir[0], tmp_path / "m")
    shard = path / "model-00003-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(OpenVLAFormatError, match="model-00003-of-00005.safetensors: unreadable safetensors"):
        load_vla(path)


def test_shape_mismatch_names_key_shard_and_shapes(tiny_dir, tmp_path):
    path = _copy(tiny_dir[0], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 200
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OpenVLAFormatError) as err:
        load_vla(path)
    message = str(err.value)
    assert "shape mismatches" in message and "mlp.gate_proj.weight in model-0000" in message
    assert "expected [200, 96], found [192, 96]" in message


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    model, tok = tiny_model()
    state = model.state_dict()
    state["projector.extra.weight"] = torch.zeros(2)
    del state["projector.fc3.bias"]
    path = write_openvla_dir(tmp_path / "m", model.spec, state, tok, NORM_STATS)
    with pytest.raises(OpenVLAFormatError, match=r"missing keys \(1\): projector.fc3.bias .*unexpected keys \(1\): "
                                                 r"projector.extra.weight \(in model.safetensors\)"):
        load_vla(path)


def test_upstream_openvla_7b_config_builds_the_exact_key_set(tmp_path):
    """openvla-7b's config.json (DESIGN.md §8) -> 982 tensors, 7,541,237,184 parameters (meta device)."""
    from steadyvla.model.openvla_config import openvla_config_from_spec, preprocessor_config_from_spec
    from steadyvla.model.openvla_keys import to_openvla_key
    from steadyvla.model.openvla_load import build_empty, read_openvla_dir
    from steadyvla.model.presets import get_preset

    spec7 = get_preset("openvla-7b").spec(32001, 32000)
    config = openvla_config_from_spec(spec7, NORM_STATS)
    assert config["text_config"] == {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16",
                                     "vocab_size": 32064}
    assert config["timm_model_ids"] == ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
    assert "timm_model_kwargs" not in config and config["image_sizes"] == [224, 224]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config_from_spec(spec7)))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(OpenVLAFormatError, match="`weight_map` missing or empty"):
        read_openvla_dir(tmp_path)
    from steadyvla.model.openvla_config import spec_from_openvla_config

    state = build_empty(spec_from_openvla_config(config, tmp_path)).state_dict()
    assert len(state) == 982 and sum(t.numel() for t in state.values()) == 7_541_237_184
    keys = {to_openvla_key(k) for k in state}
    assert {"vision_backbone.featurizer.blocks.23.ls2.scale_factor", "vision_backbone.fused_featurizer.attn_pool.latent",
            "projector.fc3.weight", "language_model.lm_head.weight"} <= keys
    assert list(state["projector.fc1.weight"].shape) == [8704, 2176]
    assert list(state["language_model.lm_head.weight"].shape) == [32064, 4096]


def test_finetune_with_a_bad_vla_path_fails_before_writing(tiny_dir, tmp_path):
    from helpers import REPO, run_cli

    path = _copy(tiny_dir[0], tmp_path / "m")
    shard = path / "model-00001-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    runs = tmp_path / "runs"
    done = run_cli(["finetune", "--config", str(REPO / "configs" / "demo.yaml"), "--vla_path", str(path),
                    "--run_root_dir", str(runs), "--data_root_dir", str(tmp_path / "data")])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: config field `vla_path`: {shard}: unreadable")
    assert not runs.exists() and not (tmp_path / "data").exists()


def test_single_tower_checkpoint_round_trips_and_predicts(tmp_path):
    """use_fused_vision_backbone false: one SigLIP tower, the 2-layer projector, 3 image channels."""
    import dataclasses

    import numpy as np

    from steadyvla import predict_action
    from steadyvla.model.vla import VLA

    fused, tok = tiny_model()
    spec = dataclasses.replace(fused.spec, towers=fused.spec.towers[1:])
    torch.manual_seed(0)
    model = VLA(spec).eval()
    path = write_openvla_dir(tmp_path / "m", spec, model.state_dict(), tok, NORM_STATS, dtype=None)
    config = json.loads((path / "config.json").read_text())
    assert config["use_fused_vision_backbone"] is False and config["arch_specifier"] == "no-align+gelu-mlp"
    bundle = load_vla(path)
    assert not hasattr(bundle.model.projector, "fc3") and bundle.model.vision_backbone.fused_featurizer is None
    inputs = random_inputs(tok)
    inputs["pixel_values"] = inputs["pixel_values"][:, :3]
    with torch.no_grad():
        assert torch.equal(bundle.model(**inputs).logits, model(**inputs).logits)
    image = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    assert bundle.image_transform(image, 0, 0).shape == (3, 56, 56)
    assert predict_action(bundle, image, "pick").shape == (7,)
    config["arch_specifier"] = "no-align+fused-gelu-mlp"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OpenVLAFormatError, match="`arch_specifier` = 'no-align\\+fused-gelu-mlp', expected "
                                                 "'no-align\\+gelu-mlp' with use_fused_vision_backbone=False"):
        load_vla(path)
