"""A random-init preset's base is rebuilt (merge, eval) on the device type training drew it on.

CPU and CUDA generators draw different numbers from one seed. Before this was recorded, `merge`
rebuilt a GPU-trained tiny run's base on the CPU: another network under the adapter, so the merged
model had lost what training learned (the forgetting bench's base: 0 % closed-loop on the H100,
while the same recipe trained on the CPU succeeds).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import tiny_lora_run
from steadyvla.config import ConfigError, build_config
from steadyvla.model.base_init import BASE_INIT_KEY, base_init_device
from steadyvla.model.build import build_vla, load_tokenizer
from steadyvla.model.merge import checkpoint_config
from steadyvla.train.run_inputs import INPUTS_KEY, check_run_inputs

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory, synthetic_root):
    """A 2-step LoRA run of the tiny preset (on the CPU here) and its checkpoint."""
    run_dir = tiny_lora_run(tmp_path_factory.mktemp("baseinit"), synthetic_root)
    return run_dir, run_dir / "checkpoints" / "step-000002"


def _record(ckpt, device: str) -> None:
    """Make `ckpt` say its base was drawn on `device` (manifest rewritten, so it stays complete)."""
    from steadyvla.checkpoint.manifest import write_manifest

    path = ckpt / "trainer_state.json"
    state = json.loads(path.read_text())
    state[INPUTS_KEY][BASE_INIT_KEY] = device
    path.write_text(json.dumps(state))
    write_manifest(ckpt)


def test_checkpoint_records_where_the_preset_base_was_drawn(preset_run):
    _, ckpt = preset_run
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state[INPUTS_KEY][BASE_INIT_KEY] == "cpu"
    assert base_init_device(state, ckpt) == "cpu"
    assert base_init_device({}, ckpt) == "cpu"  # checkpoints from before the record


def test_merge_rebuilds_the_base_on_the_recorded_device(preset_run, tmp_path, monkeypatch):
    import steadyvla.model.merge as merge

    run_dir, ckpt = preset_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    _record(copy / "checkpoints" / ckpt.name, "cuda")
    seen = {}

    def fake_build(cfg, tokenizer, device="cpu", init_device=None):
        seen.update(device=device, init_device=init_device)
        raise RuntimeError("stop after the build call")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(merge, "build_vla", fake_build)
    with pytest.raises(RuntimeError, match="stop after"):
        merge.merge_checkpoint(copy, tmp_path / "merged", log=lambda _m: None)
    assert seen == {"device": "cpu", "init_device": "cuda"}


@no_cuda
def test_merge_and_eval_refuse_a_cuda_drawn_base_without_cuda(preset_run, tmp_path):
    from steadyvla.eval.policy import load_checkpoint_target
    from steadyvla.model.merge import merge_checkpoint

    run_dir, ckpt = preset_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    _record(copy / "checkpoints" / ckpt.name, "cuda")
    with pytest.raises(ConfigError, match=r"--checkpoint: .*drawn on 'cuda'.*machine with cuda"):
        merge_checkpoint(copy, tmp_path / "merged", log=lambda _m: None)
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ConfigError, match=r"--checkpoint: .*drawn on 'cuda'"):
        load_checkpoint_target(copy, None, None)


def test_resume_on_another_device_type_is_refused(preset_run):
    _, ckpt = preset_run
    state = json.loads((ckpt / "trainer_state.json").read_text())
    cfg = checkpoint_config(ckpt)
    now = {**state[INPUTS_KEY], BASE_INIT_KEY: "cuda"}
    with pytest.raises(ConfigError, match=r"drawn on 'cpu'.*resuming on 'cuda'"):
        check_run_inputs(cfg, ckpt, state, now)
    check_run_inputs(cfg, ckpt, state, dict(state[INPUTS_KEY]))  # same device: accepted


def test_init_device_draws_there_and_moves_to_device():
    cfg = build_config(dict(seed=5))
    tok = load_tokenizer(cfg)
    plain, drawn = build_vla(cfg, tok).state_dict(), build_vla(cfg, tok, "cpu", init_device="cpu").state_dict()
    assert all(torch.equal(plain[k], drawn[k]) for k in plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_drawn_base_differs_from_cpu_and_is_rebuilt_exactly():
    cfg = build_config(dict(seed=5))
    tok = load_tokenizer(cfg)
    on_gpu = {k: v.cpu() for k, v in build_vla(cfg, tok, "cuda").state_dict().items()}
    cpu = build_vla(cfg, tok, "cpu").state_dict()
    rebuilt = build_vla(cfg, tok, "cpu", init_device="cuda").state_dict()
    assert any(not torch.equal(on_gpu[k], cpu[k]) for k in cpu)
    assert all(torch.equal(on_gpu[k], rebuilt[k]) for k in cpu)
