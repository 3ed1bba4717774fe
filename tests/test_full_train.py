"""`steadyvla train`: full training with FSDP2 / DDP on 2 gloo processes, DCP checkpoints, exact
resume after kill -9 (also inside the save), resume on another number of ranks, the users' keys."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from helpers import assert_bitwise_equal, cli_env, config_args, metrics_lines
from steadyvla.checkpoint.dcp_storage import JsonMetadataReader
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, DCP_DIR, STARTS_JSONL, TRAINER_STATE_JSON
from steadyvla.checkpoint.manager import CheckpointManager
from steadyvla.config import ConfigError, build_config, load_config
from steadyvla.faults import FAULT_ENV
from steadyvla.train.run_dir import run_dir_for

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
COMPARED = ("step", "train_loss", "action_accuracy", "l1_loss", "lr", "epoch")


def values_for(synthetic_root: Path, run_root: Path, **extra) -> dict:
    values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(run_root), run_id="full",
                  use_lora=False, batch_size=2, grad_accumulation_steps=1, max_steps=6, save_steps=2,
                  # warmup then constant: the lr of a step does not depend on max_steps, which these runs vary
                  learning_rate=0.001, lr_scheduler="none", lr_warmup_steps=3, weight_decay=0.01,
                  progress_bar=False, seed=5)
    values.update(extra)
    return values


def train_run(nproc: int, values: dict, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "steadyvla.cli", "train", "--config", CONFIG, *config_args(values)]
    return subprocess.run(cmd, env=cli_env({"OMP_NUM_THREADS": "1", **(extra_env or {})}), capture_output=True,
                          text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def checkpoint_at(run_dir: Path, step: int) -> Path:
    (found,) = [p for p in (run_dir / CHECKPOINTS_DIR).glob(f"step-{step:06d}-epoch-*") if p.is_dir()]
    return found


def dcp_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a full checkpoint's DCP state (model + optimizer), gathered into one process."""
    state = _load_state_dict_from_keys(storage_reader=JsonMetadataReader(ckpt / DCP_DIR))
    out = {f"model/{k}": v for k, v in state["model"].items()}
    for param, entry in state["optim"]["state"].items():
        out.update({f"optim/{param}/{k}": v for k, v in entry.items() if isinstance(v, torch.Tensor)})
    return out


def compared(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in rows]


@pytest.fixture(scope="module")
def fsdp_reference(synthetic_root, tmp_path_factory):
    values = values_for(synthetic_root, tmp_path_factory.mktemp("ref"))
    ok(train_run(2, values))
    return run_dir_for(build_config(values))


def test_fsdp_killed_inside_the_save_resumes_bit_exact_then_continues_on_one_rank(synthetic_root, tmp_path,
                                                                                    fsdp_reference):
    ref_rows = metrics_lines(fsdp_reference)
    assert [r["step"] for r in ref_rows] == list(range(1, 7))
    ref_state = json.loads((checkpoint_at(fsdp_reference, 4) / TRAINER_STATE_JSON).read_text())
    assert ref_state["world_size"] == 2 and set(ref_state["rng"]) == {"rank0", "rank1"}
    assert checkpoint_at(fsdp_reference, 4).name == f"step-000004-epoch-00-loss={ref_rows[3]['train_loss']:.4f}"

    values = values_for(synthetic_root, tmp_path / "runs", max_steps=4)
    killed = train_run(2, values, {FAULT_ENV: "mid_save@4"})  # the async save of step 4 dies half-written
    assert killed.returncode != 0
    run_dir = run_dir_for(build_config(values))
    assert (run_dir / CHECKPOINTS_DIR / "latest").read_text().strip() == checkpoint_at(run_dir, 2).name
    ok(train_run(2, values))
    assert compared(metrics_lines(run_dir)) == compared(ref_rows[:4])
    assert_bitwise_equal(dcp_tensors(checkpoint_at(run_dir, 4)), dcp_tensors(checkpoint_at(fsdp_reference, 4)))

    # 2 -> 1 rank: DCP reshards; batch 2 x accumulation 2 keeps the global batch, so the same samples
    # make every step and the losses agree with the 2-rank run to float32 round-off
    one = train_run(1, {**values, "max_steps": 6, "grad_accumulation_steps": 2})
    ok(one)
    assert "world size 2 -> 1" in one.stdout
    rows = metrics_lines(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for got, want in zip(rows[4:], ref_rows[4:]):
        assert got["lr"] == want["lr"] and got["epoch"] == want["epoch"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
    last_start = json.loads((run_dir / STARTS_JSONL).read_text().splitlines()[-1])
    assert last_start["changed_fields"]["world_size"] == {"checkpoint": 2, "now": 1}
    final, want = dcp_tensors(checkpoint_at(run_dir, 6)), dcp_tensors(checkpoint_at(fsdp_reference, 6))
    assert final.keys() == want.keys()
    for key in final:
        torch.testing.assert_close(final[key], want[key], rtol=1e-3, atol=1e-5, msg=key)


def test_one_rank_checkpoint_continues_on_two_fsdp_ranks(synthetic_root, tmp_path, fsdp_reference):
    values = values_for(synthetic_root, tmp_path / "runs", max_steps=2, grad_accumulation_steps=2)
    ok(train_run(1, values))
    two = train_run(2, {**values, "max_steps": 4, "grad_accumulation_steps": 1})
    ok(two)
    rows, ref_rows = metrics_lines(run_dir_for(build_config(values))), metrics_lines(fsdp_reference)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for got, want in zip(rows, ref_rows):
        assert got["lr"] == want["lr"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)


def test_ddp_killed_mid_step_resumes_bit_exact(synthetic_root, tmp_path):
    reference = values_for(synthetic_root, tmp_path / "ref", strategy="ddp", max_steps=4, async_save=False)
    ok(train_run(2, reference))
    ref_dir = run_dir_for(build_config(reference))
    values = {**reference, "run_root_dir": str(tmp_path / "runs")}
    assert train_run(2, values, {FAULT_ENV: "backward@3"}).returncode != 0
    run_dir = run_dir_for(build_config(values))
    assert (run_dir / CHECKPOINTS_DIR / "latest").read_text().strip() == checkpoint_at(run_dir, 2).name
    ok(train_run(2, values))
    assert compared(metrics_lines(run_dir)) == compared(metrics_lines(ref_dir))
    assert_bitwise_equal(dcp_tensors(checkpoint_at(run_dir, 4)), dcp_tensors(checkpoint_at(ref_dir, 4)))


def test_users_resume_keys_and_a_truncated_shard(synthetic_root, tmp_path, fsdp_reference):
    from steadyvla.train.full_train import train

    run_dir = tmp_path / "copy" / "full"
    shutil.copytree(fsdp_reference, run_dir)
    ckpt4 = checkpoint_at(run_dir, 4)
    base = values_for(synthetic_root, tmp_path / "other", run_id="from_ckpt", pretrained_checkpoint=str(ckpt4),
                      is_resume=True)
    with pytest.raises(ConfigError, match=r"`resume_step`: 5, but checkpoint .* records step 4"):
        train(build_config({**base, "resume_step": 5}), log=lambda m: None)
    with pytest.raises(ConfigError, match=r"`resume_epoch`: 1, but checkpoint .* records epoch 0"):
        train(build_config({**base, "resume_step": 4, "resume_epoch": 1}), log=lambda m: None)
    assert not (tmp_path / "other").exists()  # refused before anything was written

    # is_resume: false: the checkpoint's weights (or the same weights as a plain safetensors file) start a new run
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({k[len("model/"):]: v.contiguous() for k, v in dcp_tensors(ckpt4).items() if k.startswith("model/")},
              str(weights))
    firsts = []
    for source in (ckpt4, weights):
        messages = []
        fresh = {**base, "pretrained_checkpoint": str(source), "is_resume": False, "max_steps": 1,
                 "run_id": f"init_{source.name}", "async_save": False}
        assert train(build_config(fresh), log=messages.append).final_step == 1
        assert any(f"initialised the model's weights from {source}" in m for m in messages)
        firsts.append(metrics_lines(run_dir_for(build_config(fresh)))[0]["train_loss"])
    assert firsts[0] == firsts[1]

    # a truncated shard of the newest checkpoint: the manifest catches it, resume takes the one before
    shard = sorted((checkpoint_at(run_dir, 6) / DCP_DIR).glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    messages: list[str] = []
    found = CheckpointManager(run_dir, log=messages.append).resolve_latest()
    assert found == ckpt4
    assert any("truncated" in m and shard.name in m for m in messages)


def test_full_training_keys_are_validated_with_the_field_named(synthetic_root, tmp_path):
    from steadyvla.train.full_train import train

    base = values_for(synthetic_root, tmp_path)
    with pytest.raises(ConfigError, match=r"`strategy`: 'zero3' is not one of fsdp, ddp"):
        build_config({**base, "strategy": "zero3"})
    with pytest.raises(ConfigError, match=r"`hsdp_replicate_degree`: 2 needs `strategy: fsdp`"):
        build_config({**base, "strategy": "ddp", "hsdp_replicate_degree": 2})
    with pytest.raises(ConfigError, match="nothing to train"):
        build_config({**base, "train_vision_backbone": False, "train_projector": False, "train_llm": False})
    with pytest.raises(ConfigError, match=r"`resume_step`: -1 must be >= 0"):
        build_config({**base, "resume_step": -1})
    assert build_config({**base, "save_interval": 3}).save_steps == 3
    with pytest.raises(ConfigError, match=r"`use_lora`: true is LoRA fine-tuning"):
        train(build_config({**base, "use_lora": True}))
    with pytest.raises(ConfigError, match=r"`pretrained_checkpoint`: .* is a file .* `is_resume: false`"):
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(b"x")
        train(build_config({**base, "pretrained_checkpoint": str(weights), "is_resume": True}))
    assert not (tmp_path / "full").exists()


def test_method_on_the_fsdp_sharded_model_resumes_bit_exact(synthetic_root, tmp_path):
    method = dict(method_enabled=True, probe_size=16, probe_batch_size=4, icsm_rank=8, icsm_sensitivity_samples=8,
                  thermostat_warmup_steps=1, thermostat_update_interval=1, thermostat_k_beta=50.0,
                  thermostat_k_gamma=100.0, thermostat_base_scale=0.0, icms_artifact_dir=str(tmp_path / "icsm"))
    reference = values_for(synthetic_root, tmp_path / "ref", max_steps=4, **method)
    ok(train_run(2, reference))
    ref_dir = run_dir_for(build_config(reference))
    values = {**reference, "run_root_dir": str(tmp_path / "runs")}
    assert train_run(2, values, {FAULT_ENV: "mid_save@4"}).returncode != 0
    ok(train_run(2, values))
    run_dir = run_dir_for(build_config(values))
    rows = metrics_lines(run_dir)
    assert rows == metrics_lines(ref_dir)  # loss, drift, beta/gamma trajectory, HSW norms
    assert len({r["hsw_beta"] for r in rows}) > 1 and all(r["hsw_g_norm"] > 0 for r in rows)
    assert_bitwise_equal(dcp_tensors(checkpoint_at(run_dir, 4)), dcp_tensors(checkpoint_at(ref_dir, 4)))
    state = json.loads((checkpoint_at(run_dir, 4) / TRAINER_STATE_JSON).read_text())
    assert state["method"]["method"]["last_drift"] == rows[-1]["drift_d"] and state["method"]["method"]["thermostat"]


needs_metaworld = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None,
                                     reason="MetaWorld is not installed (pip install 'steadyvla[demo]')")
# cheap periodic evaluation: 1 task, 1 episode of 1 env step
EVAL = dict(enable_periodic_eval=True, eval_every_steps=2, eval_tasks="reach-v3", eval_episodes=1,
            eval_max_episode_steps=1, eval_num_envs=1)


def without_eval_keys(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("eval_")} for r in rows]


@needs_metaworld
def test_periodic_eval_on_fsdp_ranks_trains_bitwise_the_same_and_keeps_the_best(synthetic_root, tmp_path,
                                                                                fsdp_reference):
    # rank 1 holds half of every weight: it must join each of rank 0's policy forwards
    values = values_for(synthetic_root, tmp_path / "runs", keep_last_k=1, **EVAL)
    ok(train_run(2, values))
    run_dir = run_dir_for(build_config(values))
    rows = metrics_lines(run_dir)
    assert without_eval_keys(rows) == metrics_lines(fsdp_reference)
    assert [r["step"] for r in rows if "eval_success_rate" in r] == [2, 4, 6]
    assert_bitwise_equal(dcp_tensors(checkpoint_at(run_dir, 6)), dcp_tensors(checkpoint_at(fsdp_reference, 6)))
    for step in (2, 4, 6):
        report = json.loads((run_dir / "eval" / f"step-{step:06d}.json").read_text())
        assert report["global_step"] == step and report["during_training"]
    state = json.loads((checkpoint_at(run_dir, 6) / TRAINER_STATE_JSON).read_text())
    assert state["method"]["periodic_eval"]["tracker"]["best_step"] == 2  # later ties are no improvement
    # retention (keep_last_k 1) keeps the best evaluation's checkpoint beside the newest
    assert sorted(p.name[:11] for p in (run_dir / CHECKPOINTS_DIR).iterdir() if p.is_dir()) == \
        ["step-000002", "step-000006"]


@needs_metaworld
def test_periodic_eval_with_autocast_master_weights_trains_bitwise_the_same(synthetic_root, tmp_path):
    from steadyvla.train.full_train import train

    # one process, DDP strategy: float32 master weights, bfloat16 compute under autocast, evaluation too
    common = dict(strategy="ddp", dtype="bfloat16", max_steps=2, save_steps=2, early_stopping_enabled=True,
                  early_stopping_patience=1)
    off = values_for(synthetic_root, tmp_path / "off", **common)
    on = values_for(synthetic_root, tmp_path / "on", **common, **{**EVAL, "eval_every_steps": 1})
    load = lambda v: load_config(CONFIG, v)  # noqa: E731
    assert train(load(off), log=lambda _m: None).final_step == 2
    result = train(load(on), log=lambda _m: None)
    assert result.stopped_early and result.final_step == 2  # evaluations at 1 (best) and 2 (no improvement)
    on_dir, off_dir = run_dir_for(build_config(on)), run_dir_for(build_config(off))
    assert without_eval_keys(metrics_lines(on_dir)) == metrics_lines(off_dir)
    assert_bitwise_equal(dcp_tensors(checkpoint_at(on_dir, 2)), dcp_tensors(checkpoint_at(off_dir, 2)))
    # started again, the run knows it stopped: nothing to do
    assert train(load({**on, "max_steps": 4}), log=lambda _m: None).stopped_early


def test_failed_background_save_on_fsdp_ranks_is_written_again_and_the_run_stays_bit_exact(
        synthetic_root, tmp_path, fsdp_reference):
    # rank 0's commit of step 4 fails once, after every rank wrote its shards: both ranks agree and
    # write step 4 again from the same host copies, at a later step boundary
    values = values_for(synthetic_root, tmp_path / "runs")
    done = train_run(2, values, {FAULT_ENV: "mid_save@4:enospc-once"})
    ok(done)
    assert "failed (OSError: [Errno 28] No space left on device: 'injected by STEADYVLA_FAULT'); retrying once" \
        in done.stdout
    run_dir = run_dir_for(build_config(values))
    assert compared(metrics_lines(run_dir)) == compared(metrics_lines(fsdp_reference))
    for step in (4, 6):  # the retried checkpoint holds step 4, although training had gone on
        assert_bitwise_equal(dcp_tensors(checkpoint_at(run_dir, step)), dcp_tensors(checkpoint_at(fsdp_reference, step)))


def test_save_failing_twice_stops_the_run_with_one_error_line(synthetic_root, tmp_path):
    values = values_for(synthetic_root, tmp_path / "runs", async_save=False, max_steps=4)
    failed = train_run(1, values, {FAULT_ENV: "mid_save@4:enospc"})
    assert failed.returncode == 1, failed.stdout + failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr
    assert errors[0].startswith("error: SaveFailed: saving checkpoint checkpoints/step-000004-epoch-00-loss=")
    assert "failed twice: OSError: [Errno 28] No space left on device" in errors[0]
    run_dir = run_dir_for(build_config(values))
    latest = (run_dir / CHECKPOINTS_DIR / "latest").read_text().strip()
    assert latest == checkpoint_at(run_dir, 2).name and f"still names {latest}" in errors[0]
    assert not list((run_dir / CHECKPOINTS_DIR).glob("step-000004*"))


def test_failed_async_save_under_ddp_stops_at_once_saying_why(synthetic_root, tmp_path):
    values = values_for(synthetic_root, tmp_path / "runs", strategy="ddp", max_steps=6)
    failed = train_run(2, values, {FAULT_ENV: "mid_save@4:enospc-once"})
    assert failed.returncode != 0
    assert "failed (not retried: async saves under DDP keep no host copy to write again): OSError: [Errno 28]" \
        in failed.stderr, failed.stderr[-3000:]
    run_dir = run_dir_for(build_config(values))
    assert (run_dir / CHECKPOINTS_DIR / "latest").read_text().strip() == checkpoint_at(run_dir, 2).name
