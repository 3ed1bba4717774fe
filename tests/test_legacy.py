"""The users' old artifacts: PEFT adapter dirs as resume_adapter_dir, trainer_state.pt files."""

from __future__ import annotations

import pickle

import pytest
import torch
from peft import get_peft_model_state_dict

from helpers import metrics_lines, tree_digest
from steadyvla.checkpoint.legacy import load_adapter_weights, safe_torch_load
from steadyvla.config import ConfigError
from steadyvla.model.build import build_vla, load_tokenizer, wrap_lora
from steadyvla.train.finetune import finetune
from steadyvla.train.run_dir import run_dir_for


def _old_adapter_dir(cfg, path, seed=7, binary=False):
    """What the old scripts left behind: PEFT's save_pretrained of a trained (non-zero) adapter."""
    model = wrap_lora(build_vla(cfg, load_tokenizer(cfg)), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(path), safe_serialization=not binary)
    return get_peft_model_state_dict(model)


@pytest.mark.parametrize("binary", [False, True])
def test_old_adapter_weights_load_into_every_lora_parameter(make_config, tmp_path, binary):
    cfg = make_config()
    expected = _old_adapter_dir(cfg, tmp_path / "adapter", binary=binary)
    assert (tmp_path / "adapter" / ("adapter_model.bin" if binary else "adapter_model.safetensors")).exists()
    model = wrap_lora(build_vla(cfg, load_tokenizer(cfg)), cfg)
    assert load_adapter_weights(model, tmp_path / "adapter", cfg) == len(expected)
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_old_adapter_of_another_rank_is_refused_before_anything_is_written(make_config, tmp_path):
    _old_adapter_dir(make_config(lora_rank=8), tmp_path / "adapter")
    cfg = make_config(resume_adapter_dir=str(tmp_path / "adapter"))
    with pytest.raises(ConfigError, match=r"config field `lora_rank`: 4, but .*adapter_config.json has r=8"):
        finetune(cfg, log=lambda _m: None)
    assert not run_dir_for(cfg).exists()


def test_finetune_starts_from_an_old_adapter_with_fresh_optimizer(make_config, tmp_path):
    _old_adapter_dir(make_config(), tmp_path / "adapter")
    (tmp_path / "adapter" / "trainer_state.pt").write_bytes(b"old")
    messages: list[str] = []
    cfg = make_config(resume_adapter_dir=str(tmp_path / "adapter"), max_steps=2, save_steps=2)
    assert finetune(cfg, log=messages.append).final_step == 2
    text = "\n".join(messages)
    assert "optimizer, the LR schedule, the step count and the data position start fresh" in text
    assert "steadyvla ckpt import-legacy" in text
    fresh = make_config(max_steps=2, save_steps=2, run_root_dir=str(tmp_path / "fresh"))
    finetune(fresh, log=lambda _m: None)
    seeded, plain = metrics_lines(run_dir_for(cfg)), metrics_lines(run_dir_for(fresh))
    assert [r["step"] for r in seeded] == [1, 2]
    assert seeded[0]["train_loss"] != plain[0]["train_loss"]  # the adapter changed the model
    # the same command after a preemption continues the run; the old adapter was only its starting point
    messages.clear()
    again = make_config(resume_adapter_dir=str(tmp_path / "adapter"), max_steps=4, save_steps=2)
    assert finetune(again, log=messages.append).final_step == 4
    assert "was only this run's starting point" in "\n".join(messages)
    resumed = metrics_lines(run_dir_for(again))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[:2] == seeded


class _Custom:
    pass


def test_torch_files_are_read_weights_only_and_refusals_reported(tmp_path):
    good = tmp_path / "ok.pt"
    torch.save({"global_step": 5, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}}, good)
    assert safe_torch_load(good)["global_step"] == 5
    bad = tmp_path / "trainer_state.pt"
    torch.save({"global_step": 5, "extra": _Custom()}, bad, pickle_module=pickle)
    before = tree_digest(tmp_path)
    with pytest.raises(ConfigError, match=r"trainer_state.pt: refused a test_legacy._Custom object"):
        safe_torch_load(bad)
    assert tree_digest(tmp_path) == before


def _old_trainer_state(cfg, adapter_dir, path, step=3):
    """An old script's trainer_state.pt: AdamW over trainable params in module order, after steps."""
    model = wrap_lora(build_vla(cfg, load_tokenizer(cfg)), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    torch.save({"global_step": step, "optimizer": opt.state_dict(), "epoch": 0}, path)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {names[i]: s["exp_avg"] for i, s in opt.state_dict()["state"].items()}


def test_import_legacy_writes_a_checkpoint_that_finetune_resumes(make_config, tmp_path):
    from safetensors.torch import load_file

    from steadyvla.train.import_legacy import import_legacy

    cfg = make_config(max_steps=4, save_steps=2)
    _old_adapter_dir(cfg, tmp_path / "adapter")
    moments = _old_trainer_state(cfg, tmp_path / "adapter", tmp_path / "trainer_state.pt")
    messages: list[str] = []
    run_dir = import_legacy(cfg, tmp_path / "adapter", tmp_path / "trainer_state.pt", log=messages.append)
    ckpt = run_dir / "checkpoints" / "step-000003"
    assert ckpt.is_dir() and any("data position and RNG start fresh; not carried over: epoch" in m for m in messages)
    state = load_file(str(ckpt / "trainer_state.safetensors"))
    order = sorted(moments)
    for name in (order[0], order[len(order) // 2], order[-1]):
        assert torch.equal(state[f"optim.{order.index(name)}.exp_avg"], moments[name]), name
    resumed: list[str] = []
    assert finetune(cfg, log=resumed.append).final_step == 4
    assert any("continuing from" in m and "step-000003" in m for m in resumed)


def test_cli_import_legacy_refuses_unsafe_pickles_and_writes_nothing(make_config, tmp_path):
    import yaml

    from helpers import run_cli

    cfg = make_config()
    _old_adapter_dir(cfg, tmp_path / "adapter")
    bad = tmp_path / "trainer_state.pt"
    torch.save({"global_step": 5, "extra": _Custom()}, bad)
    runs = tmp_path / "runs-cli"
    values = {k: v for k, v in cfg.to_dict().items() if k in ("data_root_dir", "dataset_name", "batch_size", "lora_rank")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    done = run_cli(["ckpt", "import-legacy", "--adapter", str(tmp_path / "adapter"), "--trainer-state", str(bad),
                    "--config", str(tmp_path / "run.yaml"), "--run_root_dir", str(runs)])
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "trainer_state.pt: refused a test_legacy._Custom object" in last
    assert not runs.exists()
