"""Memory preflight (estimate vs measured peak, refusal with the numbers, --force), memory keys in
metrics.jsonl, and a CUDA OOM inside a step (injected) that saves the last completed step exactly."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from helpers import (
    DEMO_CONFIG, MAX_STEPS, assert_bitwise_equal, assert_same_as_reference, checkpoint_tensors, cli_env,
    config_args, finetune_args, metrics_lines, resume_values, run_cli, run_dir_of,
)
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, LATEST_FILE, METRICS_JSONL, TRAINER_STATE_JSON
from steadyvla.faults import FAULT_ENV
from steadyvla.memory_estimate import GIB
from steadyvla.memory_report import MemoryWillNotFit, Preflight, enforce, run_preflight
from steadyvla.memory_runtime import HOST_PEAK_RSS, HOST_RSS, HostMemory, host_memory, host_rss
from steadyvla.train.metrics import read_metrics

# Runs finetune in a fresh interpreter and prints the preflight's host estimate and the measured peak RSS.
MEASURE = """
import json, sys
from steadyvla.config import build_config
from steadyvla.memory_runtime import peak_rss
from steadyvla.train.finetune import finetune
from steadyvla.train.full_train import train
cfg = build_config(json.loads(sys.argv[1]))
result = (finetune if cfg.use_lora else train)(cfg, log=lambda m: None)
print(json.dumps({"estimate": result.memory_estimate.host_total, "peak": peak_rss()}))
"""
TOLERANCE = 0.20
HUGE = dict(model_preset="openvla-7b", dtype="bfloat16", batch_size=4096)  # ~8 TiB of activations


def _measure(values: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(values)], env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("batch_size,method,lora", [(2, False, True), (16, False, True), (8, True, True),
                                                    (8, False, False)])
def test_host_estimate_is_within_20_percent_of_the_measured_peak_rss(synthetic_root, tmp_path, batch_size, method,
                                                                      lora):
    values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(tmp_path),
                  batch_size=batch_size, max_steps=3, save_steps=2, lora_rank=4, progress_bar=False,
                  method_enabled=method, probe_size=16, probe_batch_size=4, use_lora=lora)
    got = _measure(values)
    error = got["estimate"] / got["peak"] - 1
    print(f"batch_size={batch_size} method={method}: estimate {got['estimate'] / GIB:.3f} GiB, "
          f"measured peak RSS {got['peak'] / GIB:.3f} GiB ({error:+.1%})")
    assert abs(error) <= TOLERANCE


def test_a_run_that_cannot_fit_stops_before_step_1_with_the_numbers_and_the_knobs(synthetic_root, tmp_path):
    values = resume_values(synthetic_root, tmp_path, **HUGE)
    done = run_cli(finetune_args(values))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: memory preflight: this run will not fit: host: needs ")
    assert "activations" in done.stderr and "estimated peak" in done.stderr and "GiB available" in done.stderr
    assert "--batch_size " in done.stderr and "--force true" in done.stderr
    assert not tmp_path.joinpath("exact").exists()  # nothing on disk: not even the run dir


def test_steadyvla_memory_prints_the_table_and_doctor_reports_the_verdict(synthetic_root, tmp_path):
    values = resume_values(synthetic_root, tmp_path)
    args = finetune_args(values)[1:]
    shown = run_cli(["memory", *args])
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "python/torch baseline (measured)" in shown.stdout and shown.stdout.strip().endswith("fits")
    huge = run_cli(["memory", *finetune_args(resume_values(synthetic_root, tmp_path, **HUGE))[1:]])
    assert huge.returncode == 2 and "will NOT fit" in huge.stdout
    doctor = run_cli(["doctor", *finetune_args(resume_values(synthetic_root, tmp_path, **HUGE))[1:]])
    assert doctor.returncode == 1 and "[FAIL] memory: will not fit: host: needs" in doctor.stdout


def _report(problems: list[str]) -> Preflight:
    from steadyvla.memory_estimate import MemoryEstimate

    return Preflight(MemoryEstimate(host={"x": GIB}), HostMemory(GIB, None, "test"), 0, None, problems, ["--knob"])


def test_force_goes_ahead_and_the_refusal_is_a_config_error(make_config):
    messages: list[str] = []
    enforce(_report(["host: needs 9 GiB"]), make_config(force=True), messages.append)
    assert "force: true: starting anyway" in messages[-1]
    with pytest.raises(MemoryWillNotFit, match="host: needs 9 GiB"):
        enforce(_report(["host: needs 9 GiB"]), make_config(), messages.append)


def test_knobs_keep_the_global_batch_and_fit(make_config):
    cfg = make_config(**HUGE, grad_accumulation_steps=1)
    report = run_preflight(cfg, torch.device("cpu"))
    assert not report.fits
    knob = report.knobs[0]
    small = int(knob.split()[1])
    assert f"--grad_accumulation_steps {4096 // small}" in knob and small < 4096


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_cgroup_limit_below_memavailable_is_what_counts(tmp_path, monkeypatch, version):
    import steadyvla.memory_runtime as runtime

    names = {"v2": ("CGROUP_V2_MAX", "CGROUP_V2_CURRENT"), "v1": ("CGROUP_V1_LIMIT", "CGROUP_V1_USAGE")}
    for attr in ("CGROUP_V2_MAX", "CGROUP_V2_CURRENT", "CGROUP_V1_LIMIT", "CGROUP_V1_USAGE"):
        monkeypatch.setattr(runtime, attr, tmp_path / attr)  # absent unless written below
    limit, usage = names[version]
    (tmp_path / limit).write_text(f"{GIB}\n")
    (tmp_path / usage).write_text(f"{GIB // 4}\n")
    host = runtime.host_memory()
    assert (host.available, host.limit) == (GIB * 3 // 4, GIB) and "cgroup" in host.source
    (tmp_path / limit).write_text("max\n" if version == "v2" else f"{2**63 - 4096}\n")  # no limit
    assert runtime.host_memory().limit is None


def test_host_limits_and_rss_are_read():
    host = host_memory()
    assert host.available > 0
    assert host_rss() >= host_rss(include_children=False) > 100 * 2**20


def test_memory_keys_are_logged_at_every_logging_step(make_config):
    from steadyvla.train.finetune import finetune
    from steadyvla.train.run_dir import run_dir_for

    cfg = make_config(max_steps=2, save_steps=2)
    finetune(cfg, log=lambda m: None)
    rows = read_metrics(run_dir_for(cfg) / METRICS_JSONL)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.1 < row[HOST_RSS] <= row[HOST_PEAK_RSS] + 0.5
        assert "gpu_peak_alloc_gib" not in row  # CPU


def test_oom_inside_a_step_saves_the_last_completed_step_and_resumes_bit_exact(synthetic_root, tmp_path,
                                                                               resume_reference):
    values = resume_values(synthetic_root, tmp_path)  # save_steps 2, grad accumulation 2
    run_dir = run_dir_of(values)
    # step 6 fails after the first micro-batch's backward: a gradient is half accumulated, the data
    # position and the RNG have moved; step 5 is complete but not a save step
    failed = run_cli(finetune_args(values), extra_env={FAULT_ENV: "backward@6:oom"})
    assert failed.returncode == 1, failed.stdout + failed.stderr
    error = failed.stderr.strip().splitlines()
    assert sum(line.startswith("error:") for line in error) == 1
    text = failed.stderr
    assert "out of memory in step 6 (OutOfMemoryError)" in text and "host peak RSS" in text
    assert "the preflight estimated" in text and "saved checkpoint checkpoints/step-000005" in text
    assert "--batch_size 1 --grad_accumulation_steps 4" in text and "--activation_checkpointing true" in text
    assert (run_dir / CHECKPOINTS_DIR / LATEST_FILE).read_text().strip() == "step-000005"
    state = json.loads((run_dir / CHECKPOINTS_DIR / "step-000005" / TRAINER_STATE_JSON).read_text())
    assert state["global_step"] == 5 and state["data_position"]["position"] == 5 * 2 * 2
    done = run_cli(finetune_args(values))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restored step 5" in done.stdout
    assert_same_as_reference(values, resume_reference)
    assert MAX_STEPS == 8


def test_oom_in_a_method_step_restores_drift_probe_position_and_beta_gamma(synthetic_root, tmp_path):
    """The Thermostat measures drift at the start of every warmup step (probe position, drift history
    move before the OOM): the saved step must still be the uninterrupted run's."""
    values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(tmp_path / "runs"),
                  run_id="m", batch_size=2, grad_accumulation_steps=2, max_steps=6, save_steps=2, lora_rank=4,
                  learning_rate=0.05, progress_bar=False, seed=5, method_enabled=True, probe_size=16,
                  probe_batch_size=4, icsm_rank=8, icsm_sensitivity_samples=8, thermostat_warmup_steps=3,
                  thermostat_update_interval=1, thermostat_k_beta=50.0, thermostat_k_gamma=100.0,
                  thermostat_base_scale=0.0, icms_artifact_dir=str(tmp_path / "icsm"))
    reference = {**values, "run_root_dir": str(tmp_path / "ref")}
    assert run_cli(finetune_args(reference)).returncode == 0
    failed = run_cli(finetune_args(values), extra_env={FAULT_ENV: "backward@4:oom"})
    assert failed.returncode == 1 and "saved checkpoint checkpoints/step-000003" in failed.stderr, failed.stderr
    assert "--probe_batch_size 2" in failed.stderr
    done = run_cli(finetune_args(values))
    assert done.returncode == 0, done.stdout + done.stderr
    ref_dir, run_dir = run_dir_of(reference), run_dir_of(values)
    assert metrics_lines(run_dir) == metrics_lines(ref_dir)  # loss, drift, beta/gamma trajectory
    assert_bitwise_equal(checkpoint_tensors(run_dir / CHECKPOINTS_DIR / "step-000006"),
                         checkpoint_tensors(ref_dir / CHECKPOINTS_DIR / "step-000006"))


def test_activation_checkpointing_trains_the_same_model(make_config):
    from safetensors.torch import load_file

    from steadyvla.train.finetune import finetune
    from steadyvla.train.run_dir import run_dir_for

    plain = make_config(max_steps=2, save_steps=2, lora_dropout=0.1)
    recomputed = make_config(max_steps=2, save_steps=2, lora_dropout=0.1, activation_checkpointing=True,
                             run_id="ac")
    results = [finetune(cfg, log=lambda m: None) for cfg in (plain, recomputed)]
    layers = [r.model.get_base_model().language_model.model.layers[0] for r in results]
    assert [getattr(layer, "gradient_checkpointing", False) for layer in layers] == [False, True]
    weights = [load_file(str(run_dir_for(c) / CHECKPOINTS_DIR / "step-000002" / "adapter_model.safetensors"))
               for c in (plain, recomputed)]
    assert_bitwise_equal(*weights)
    assert [r["train_loss"] for r in metrics_lines(run_dir_for(plain))] == \
        [r["train_loss"] for r in metrics_lines(run_dir_for(recomputed))]


class _Stub:
    """Records calls; stands in for the checkpointer and logger where the test shows they are not used."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append(name)


@pytest.mark.parametrize("consistent,distributed,expected", [
    (False, False, "the optimizer update had started, so step 3 cannot be saved exactly"),
    (True, True, "under data parallelism the other ranks may be waiting in a collective"),
])
def test_oom_that_cannot_be_undone_saves_nothing(make_config, consistent, distributed, expected):
    from steadyvla.distributed import DistEnv
    from steadyvla.train.oom import StepOutOfMemory, StepStart, stop_after_oom

    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    state = type("S", (), {"global_step": 3, "optimizer": torch.optim.AdamW([param]), "hooks": []})()
    env = DistEnv(world_size=2 if distributed else 1)
    checkpointer, logger = _Stub(), _Stub()
    err = stop_after_oom(torch.OutOfMemoryError("CUDA out of memory"), make_config(), state,
                         StepStart(None, ({}, {}), []), consistent, checkpointer, logger, env, None)
    assert isinstance(err, StepOutOfMemory) and expected in str(err) and "out of memory in step 4" in str(err)
    assert param.grad is None and checkpointer.calls == [] and logger.calls == []


def test_full_training_device_estimate_matches_the_h100_measurement():
    """vla-1b full training, batch 8, bf16 compute, activation checkpointing, FSDP on one rank: the
    H100 run of bench/full_train.py peaked at 27.69 GiB allocated (docs/PERFORMANCE.md)."""
    from steadyvla.config import build_config
    from steadyvla.memory_estimate import estimate_memory, model_shape

    cfg = build_config(dict(model_preset="vla-1b", use_lora=False, dtype="bfloat16", batch_size=8,
                            activation_checkpointing=True, strategy="fsdp"))
    shape = model_shape(cfg)
    assert shape.trainable_params == 1_785_057_952 and shape.base_params == 43_080_480  # as the run logged
    one = estimate_memory(cfg, shape, on_gpu=True, baseline_bytes=GIB, fsdp=True, shards=1)
    allocated = one.device_total - one.device["allocator reserve"]
    assert abs(allocated / (27.69 * GIB) - 1) < 0.10
    state = ("weights (float32 master)", "grads + adamw (float32)")
    four = estimate_memory(cfg, shape, on_gpu=True, baseline_bytes=GIB, fsdp=True, shards=4)
    assert all(abs(four.device[k] * 4 - one.device[k]) <= 4 for k in state)
    assert four.host["checkpoint host copy (model + adamw)"] * 4 == pytest.approx(
        one.host["checkpoint host copy (model + adamw)"], abs=4)
    ddp = estimate_memory(dataclasses.replace(cfg, strategy="ddp"), shape, on_gpu=True, baseline_bytes=GIB,
                          world_size=2)
    assert ddp.device["autocast weight copies"] == 2 * (shape.base_params + shape.trainable_params)
    assert ddp.device["weights (float32 master)"] == one.device["weights (float32 master)"]


def test_a_full_training_run_that_cannot_fit_stops_before_the_run_dir_exists(synthetic_root, tmp_path):
    values = dict(resume_values(synthetic_root, tmp_path, **HUGE), use_lora=False, run_id="full")
    done = run_cli(["train", "--config", str(DEMO_CONFIG), *config_args(values)])
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: memory preflight: this run will not fit: host: needs ")
    assert "grads + adamw (float32)" in done.stderr and "--force true" in done.stderr
    assert not tmp_path.joinpath("full").exists()
