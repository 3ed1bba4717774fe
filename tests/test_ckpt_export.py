"""`steadyvla ckpt export`: a full-training (DCP) checkpoint -> a consolidated OpenVLA directory.

The checkpoint is written here in the layout `steadyvla train` writes (checkpoints/step-...-epoch-
..-loss=.../ with model_optim/ = DCP of {"model", "optim"}, trainer_state.json/.safetensors, manifest,
latest) through the checkpoint package itself, by one process without a process group.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict

from helpers import tree_digest
from steadyvla.checkpoint.dcp_io import save_model_optim
from steadyvla.checkpoint.layout import DCP_DIR, TRAINER_STATE_JSON, TRAINER_STATE_TENSORS, step_dir_name
from steadyvla.checkpoint.manager import CheckpointManager
from steadyvla.checkpoint.state import snapshot_rng
from steadyvla.cli import main as cli_main
from steadyvla.config import ConfigError, build_config
from steadyvla.data.stats import write_dataset_statistics
from steadyvla.model.build import build_vla, load_tokenizer
from steadyvla.model.bundle import load_vla
from steadyvla.model.export import export_checkpoint

STATS = {"synth": {"action": {"mask": [True] * 6 + [False], "q01": [-1.0] * 7, "q99": [1.0] * 7, "mean": [0.0] * 7,
                              "std": [1.0] * 7, "min": [-2.0] * 7, "max": [2.0] * 7},
                   "num_transitions": 10, "num_trajectories": 2}}
SHARD_BYTES = 300_000  # several output shards for the tiny model
# the trainer's checkpoint is written here by one process without a process group, which DCP remarks on
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def write_full_checkpoint(run_dir, model, cfg, step: int, epoch: int, loss: float):
    """One checkpoint as the full-training trainer writes it (single process, no process group)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**_batch()).logits.float().square().mean().backward()
    optimizer.step()
    model_sd, optim_sd = get_state_dict(model, optimizer)

    def write(tmp):
        save_model_optim({"model": model_sd, "optim": optim_sd}, tmp)  # as the trainer writes it
        rng_tensors, rng_meta = snapshot_rng(0)
        save_file(rng_tensors, str(tmp / TRAINER_STATE_TENSORS), metadata={"format": "pt"})
        meta = {"global_step": step, "epoch": epoch, "rng": {"rank0": rng_meta}, "world_size": 1,
                "config": cfg.to_dict()}
        (tmp / TRAINER_STATE_JSON).write_text(json.dumps(meta))

    return CheckpointManager(run_dir, log=lambda _m: None).save(step, write, dir_name=step_dir_name(step, epoch, loss))


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 10), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 6, 56, 56, generator=g))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir with two full-training checkpoints of a tiny VLA (the model at the newest one returned)."""
    root = tmp_path_factory.mktemp("export")
    cfg = build_config(dict(use_lora=False, run_root_dir=str(root / "runs"), run_id="full", seed=11))
    tokenizer = load_tokenizer(cfg)
    model = build_vla(cfg, tokenizer)
    run_dir = root / "runs" / "full"
    write_full_checkpoint(run_dir, model, cfg, 2, 0, 3.25)
    ckpt = write_full_checkpoint(run_dir, model, cfg, 4, 1, 2.5)
    write_dataset_statistics(run_dir / "dataset_statistics.json", STATS)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return root, run_dir, ckpt, expected


def test_export_equals_the_trained_model_bitwise(run):
    root, run_dir, ckpt, expected = run
    assert ckpt.name == "step-000004-epoch-01-loss=2.5000"
    out = export_checkpoint(run_dir, root / "exported", log=lambda _m: None, max_shard_bytes=SHARD_BYTES)
    assert (out / "model.safetensors.index.json").is_file()  # sharded, with its index
    assert {"config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    bundle = load_vla(out)
    loaded = bundle.model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, want in expected.items():
        got = loaded[key]
        assert got.dtype == want.dtype == torch.float32, key
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{key} differs"
    assert bundle.norm_stats["synth"]["action"]["q99"] == STATS["synth"]["action"]["q99"]
    # the trained weights, not the seeded init of the preset
    fresh = build_vla(build_config(dict(seed=11)), load_tokenizer(build_config({})))
    assert not torch.equal(fresh.projector.fc1.weight, loaded["projector.fc1.weight"])


def test_export_bfloat16_and_named_checkpoint(run):
    root, run_dir, _, _ = run
    older = run_dir / "checkpoints" / "step-000002-epoch-00-loss=3.2500"
    out = export_checkpoint(older, root / "bf16", dtype="bfloat16", log=lambda _m: None)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    loaded = load_vla(out).model.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in loaded.values() if t.is_floating_point())


def test_corrupt_shard_is_refused_by_the_manifest(run, tmp_path, capsys):
    _, run_dir, ckpt, _ = run
    broken_run = tmp_path / "broken"
    import shutil

    shutil.copytree(run_dir, broken_run)
    shard = next((broken_run / "checkpoints" / ckpt.name / DCP_DIR).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = tree_digest(tmp_path)
    code = cli_main(["ckpt", "export", "--checkpoint", str(broken_run / "checkpoints" / ckpt.name),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[0].startswith("error: --checkpoint: checkpoint")
    assert f"{DCP_DIR}/{shard.name}: sha256" in "\n".join(err) and "(corrupt)" in "\n".join(err)
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_refusals_name_the_flag(run, tmp_path):
    root, run_dir, _, _ = run
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="--out: .* already exists"):
        export_checkpoint(run_dir, tmp_path / "exists", log=lambda _m: None)
    with pytest.raises(ConfigError, match="--dtype: 'float16' is not one of float32, bfloat16"):
        export_checkpoint(run_dir, tmp_path / "x", dtype="float16", log=lambda _m: None)
    lora_like = tmp_path / "lora" / "checkpoints"
    CheckpointManager(lora_like.parent, log=lambda _m: None).save(
        1, lambda d: (d / TRAINER_STATE_JSON).write_text(json.dumps({"global_step": 1})))
    with pytest.raises(ConfigError, match=f"no {DCP_DIR}/ directory.*steadyvla merge"):
        export_checkpoint(lora_like.parent, tmp_path / "y", log=lambda _m: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_export_of_a_checkpoint_sharded_by_two_fsdp_ranks(tmp_path):
    """Each gloo rank writes its FSDP2 shards; the export (one process, no group) reassembles them."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from helpers import cli_env

    stage = tmp_path / "stage"
    worker = Path(__file__).resolve().parent / "fsdp_dcp_worker.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(stage), "11"], env=cli_env({"OMP_NUM_THREADS": "1"}),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((stage / DCP_DIR).glob("*.distcp"))) == 2  # one file of shards per rank
    cfg = build_config(dict(use_lora=False, run_root_dir=str(tmp_path / "runs"), run_id="fsdp2", seed=11))

    def write(tmp):
        shutil.copytree(stage / DCP_DIR, tmp / DCP_DIR)
        (tmp / TRAINER_STATE_JSON).write_text(json.dumps({"global_step": 1, "world_size": 2,
                                                          "config": cfg.to_dict()}))

    CheckpointManager(tmp_path / "runs" / "fsdp2", log=lambda _m: None).save(1, write,
                                                                            dir_name=step_dir_name(1, 0, 1.0))
    out = export_checkpoint(tmp_path / "runs" / "fsdp2", tmp_path / "out", log=lambda _m: None)
    expected = load_file(str(stage / "expected.safetensors"))
    loaded = load_vla(out).model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, want in expected.items():
        assert torch.equal(loaded[key].view(torch.uint8), want.view(torch.uint8)), f"{key} differs"
