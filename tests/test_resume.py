"""Kill -9 / SIGTERM / corruption / bad-input tests: a resumed run is bit-for-bit the uninterrupted one."""

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (
    MAX_STEPS, assert_same_as_reference, cli_command, cli_env, finetune_args, metrics_lines, resume_values, run_cli,
    run_dir_of, tree_digest,
)
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, METRICS_JSONL
from steadyvla.cli import main
from steadyvla.faults import FAULT_ENV

_values, _args, _run_dir = resume_values, finetune_args, run_dir_of


def _kill_when(values: dict, n_lines: int, sig: int) -> int:
    """Start a run, send `sig` once metrics.jsonl has n_lines lines; return the exit code."""
    metrics = _run_dir(values) / METRICS_JSONL
    proc = subprocess.Popen(cli_command(_args(values)), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n_lines:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=240)
    return proc.returncode, out


def test_sigkill_at_random_points_and_mid_save_resumes_bit_exact(synthetic_root, tmp_path, resume_reference):
    values = _values(synthetic_root, tmp_path)
    killed = run_cli(_args(values), extra_env={FAULT_ENV: "mid_save@4"})
    assert killed.returncode == -signal.SIGKILL
    ckpts = _run_dir(values) / CHECKPOINTS_DIR
    assert (ckpts / "latest").read_text().strip() == "step-000002"  # step 4 was never completed
    rng = random.Random(1234)
    for _ in range(2):
        code, _out = _kill_when(values, rng.randint(3, MAX_STEPS - 1), signal.SIGKILL)
        assert code in (-signal.SIGKILL, 0)
    done = run_cli(_args(values))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resume: auto — continuing from" in done.stdout
    assert_same_as_reference(values, resume_reference)


def test_sigterm_saves_at_step_boundary_exits_0_and_resumes_bit_exact(synthetic_root, tmp_path, resume_reference):
    values = _values(synthetic_root, tmp_path)
    code, out = _kill_when(values, 3, signal.SIGTERM)
    assert code == 0, out
    assert "SIGTERM received" in out and "preempted" in out
    run_dir = _run_dir(values)
    last_logged = metrics_lines(run_dir)[-1]["step"]
    assert (run_dir / CHECKPOINTS_DIR / "latest").read_text().strip() == f"step-{last_logged:06d}"
    done = run_cli(_args(values))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_as_reference(values, resume_reference)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_and_explicit_corrupt_is_an_error(synthetic_root, tmp_path,
                                                                              resume_reference,
                                                                              capsys):
    values = _values(synthetic_root, tmp_path, max_steps=6)
    assert run_cli(_args(values)).returncode == 0
    ckpts = _run_dir(values) / CHECKPOINTS_DIR
    _flip_byte(ckpts / "step-000006" / "adapter_model.safetensors")
    before = tree_digest(ckpts)
    assert main(_args({**values, "resume": str(ckpts / "step-000006"), "max_steps": MAX_STEPS})) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors: sha256" in err and "corrupt" in err
    assert tree_digest(ckpts) == before

    (ckpts / "step-000004" / "trainer_state.safetensors").write_bytes(b"trunc")  # truncated too
    done = run_cli(_args({**values, "max_steps": MAX_STEPS}))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipping checkpoints/step-000006" in done.stdout and "skipping checkpoints/step-000004" in done.stdout
    assert "continuing from" in done.stdout and "step-000002" in done.stdout
    assert_same_as_reference(values, resume_reference)


def test_bad_resume_inputs_are_clear_errors_that_touch_nothing(synthetic_root, tmp_path, capsys):
    values = _values(synthetic_root, tmp_path, max_steps=2)
    assert run_cli(_args(values)).returncode == 0
    run_dir = _run_dir(values)
    before = tree_digest(run_dir)
    cases = [
        ({"resume_global_step": 5, "max_steps": 4}, ["resume_global_step", "5", "step 2"]),
        ({"lora_rank": 8, "max_steps": 4}, ["lora_rank", "checkpoint 4, now 8"]),
        ({"batch_size": 4, "max_steps": 4}, ["batch_size", "checkpoint 2, now 4"]),
        ({"resume": str(tmp_path / "nope"), "max_steps": 4}, ["resume", "does not exist"]),
        ({"resume": "never", "max_steps": 4}, ["resume", "already holds checkpoints up to step 2"]),
    ]
    for change, expected in cases:
        assert main(_args({**values, **change})) == 2, change  # in-process: these fail before any work
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, (change, err)
        assert tree_digest(run_dir) == before, change
    ok = run_cli(_args({**values, "resume_global_step": None, "max_steps": 4}))
    assert ok.returncode == 0, ok.stderr
    assert [r["step"] for r in metrics_lines(run_dir)] == [1, 2, 3, 4]
