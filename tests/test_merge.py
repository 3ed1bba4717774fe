"""load (OpenVLA dir) -> LoRA fine-tune -> merge -> load gives the unmerged model's actions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from helpers import run_cli, tree_digest
from openvla_fixtures import NORM_STATS, write_tiny_openvla
from steadyvla import load_vla, predict_action
from steadyvla.config import ConfigError
from steadyvla.data.stats import load_dataset_statistics
from steadyvla.model.bundle import VLABundle
from steadyvla.model.merge import merge_checkpoint
from steadyvla.model.openvla_load import load_weights, read_openvla_dir
from steadyvla.train.finetune import finetune


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """A float32 tiny OpenVLA dir, a 2-step LoRA run on it, and the merged output."""
    root = tmp_path_factory.mktemp("merge")
    base, _ = write_tiny_openvla(root / "base", seed=4, dtype=None)
    (base / "README.md").write_text("base model card\n")
    from steadyvla.config import build_config

    cfg = build_config(dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(root / "runs"),
                            vla_path=str(base), batch_size=4, max_steps=2, save_steps=2, lora_rank=4,
                            learning_rate=3e-2, progress_bar=False, seed=3))
    result = finetune(cfg, log=lambda _m: None)
    run_dir = next((root / "runs").iterdir())
    merged = merge_checkpoint(run_dir, root / "merged", log=lambda _m: None)
    return base, run_dir, merged, result


def _unmerged_bundle(base, run_dir) -> VLABundle:
    src = read_openvla_dir(base)
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    model = PeftModel.from_pretrained(load_weights(src), str(ckpt)).base_model.model.eval()
    stats = {**src.norm_stats, **load_dataset_statistics(run_dir / "dataset_statistics.json")}
    return VLABundle(model, load_vla(base).tokenizer, src.spec, stats)


def test_merged_model_predicts_the_unmerged_actions(trained):
    base, run_dir, merged, result = trained
    assert result.final_step == 2
    merged_bundle, unmerged = load_vla(merged), _unmerged_bundle(base, run_dir)
    assert set(merged_bundle.norm_stats) == {"bridge_orig", "synth"}
    rng = np.random.default_rng(0)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(3)]
    for key in ("synth", "bridge_orig"):
        a = predict_action(merged_bundle, images, "push the red block", unnorm_key=key)
        b = predict_action(unmerged, images, "push the red block", unnorm_key=key)
        np.testing.assert_array_equal(a, b)
    # the merge changed weights (LoRA B is zero-initialised, so a no-op merge would equal the base)
    base_w = load_vla(base).model.language_model.model.layers[0].self_attn.q_proj.weight
    merged_w = merged_bundle.model.language_model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(base_w, merged_w)


def test_merged_dir_keeps_layout_keys_dtypes_and_carries_files(trained):
    base, run_dir, merged, _ = trained
    names = {p.name for p in merged.iterdir()}
    assert {"README.md", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "processor_config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json"} <= names
    for name in ("README.md", "tokenizer.json", "preprocessor_config.json"):
        assert (merged / name).read_bytes() == (base / name).read_bytes()
    base_cfg, merged_cfg = (json.loads((d / "config.json").read_text()) for d in (base, merged))
    assert {k: v for k, v in merged_cfg.items() if k != "norm_stats"} == \
        {k: v for k, v in base_cfg.items() if k != "norm_stats"}
    assert merged_cfg["norm_stats"]["bridge_orig"] == NORM_STATS["bridge_orig"]
    assert merged_cfg["norm_stats"]["synth"] == json.loads((run_dir / "dataset_statistics.json").read_text())["synth"]

    def keys_and_dtypes(d):
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        out = {}
        for shard in set(index.values()):
            with safe_open(str(d / shard), framework="pt") as f:
                out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
        return out

    assert keys_and_dtypes(merged) == keys_and_dtypes(base)
    assert not any(n.startswith(".") for n in {p.name for p in merged.parent.iterdir()})  # no temp sibling left


def test_merge_bad_input_writes_nothing(trained, tmp_path):
    base, run_dir, merged, _ = trained
    with pytest.raises(ConfigError, match="--out: .* already exists"):
        merge_checkpoint(run_dir, merged, log=lambda _m: None)
    with pytest.raises(ConfigError, match="--checkpoint: checkpoint path .* does not exist"):
        merge_checkpoint(tmp_path / "nope", tmp_path / "out", log=lambda _m: None)
    before = tree_digest(tmp_path)
    done = run_cli(["merge", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: --checkpoint:")
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_merge_of_a_random_init_preset_run(make_config, tmp_path):
    """A run without vla_path merges into its seeded preset and predicts like the unmerged model."""
    from steadyvla.model.build import build_vla, load_tokenizer

    cfg = make_config(max_steps=2, save_steps=2, learning_rate=3e-2)
    finetune(cfg, log=lambda _m: None)
    run_dir = next((tmp_path / "runs").iterdir())
    merged = load_vla(merge_checkpoint(run_dir, tmp_path / "merged", log=lambda _m: None))
    assert set(merged.norm_stats) == {"synth"} and merged.spec.llm["vocab_size"] == 768
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    tok = load_tokenizer(cfg)
    # the exported dir decodes where training encoded: the tiny tokenizer's bins end at its own vocab_size
    assert merged.action_tokenizer.vocab_end == int(tok.vocab_size) == 705
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["action_vocab_end"] == 705
    unmerged = PeftModel.from_pretrained(build_vla(cfg, tok), str(ckpt)).base_model.model.eval()
    bundle = VLABundle(unmerged, tok, merged.spec, merged.norm_stats)
    image = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(predict_action(merged, image, "open the green drawer"),
                                  predict_action(bundle, image, "open the green drawer"))
