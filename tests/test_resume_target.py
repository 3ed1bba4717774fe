"""Which checkpoint a start continues from: an explicit target is a starting point only, going back is an
explicit and crash-safe rewind, and a run dir whose checkpoints all fail verification is never overwritten."""

from __future__ import annotations

import json
import signal

import pytest

from helpers import (
    assert_same_as_reference, finetune_args, metrics_lines, resume_values, run_cli, run_dir_of, tree_digest,
)
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, LATEST_FILE, STARTS_JSONL
from steadyvla.cli import main
from steadyvla.config import ConfigError, build_config
from steadyvla.faults import FAULT_ENV
from steadyvla.train.resume import plan_resume
from test_checkpoint_manager import _truncate, make  # fake checkpoints, as in the manager tests


def _plan(values: dict, log: list[str] | None = None):
    return plan_resume(build_config(values), run_dir_of(values), (log if log is not None else []).append)


def test_explicit_target_is_a_starting_point_and_going_back_is_an_explicit_crash_safe_rewind(
        synthetic_root, tmp_path, resume_reference):
    values = resume_values(synthetic_root, tmp_path)
    killed = run_cli(finetune_args(values), extra_env={FAULT_ENV: "mid_save@8"})  # preempted: up to step 6
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    run_dir = run_dir_of(values)
    ckpts = run_dir / CHECKPOINTS_DIR
    before = {name: tree_digest(ckpts / name) for name in ("step-000002", "step-000004", "step-000006")}

    # the users' YAML keeps naming step 2: after a preemption the same command continues from the newest
    pinned = {**values, "resume_adapter_dir": str(ckpts / "step-000002")}
    done = run_cli(finetune_args(pinned))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "only a starting point" in done.stdout and "step-000006 (step 6)" in done.stdout
    assert "replacing" not in done.stdout
    assert {name: tree_digest(ckpts / name) for name in before} == before
    assert_same_as_reference(values, resume_reference)
    assert _plan({**values, "resume": str(ckpts / "step-000008")}).checkpoint == ckpts / "step-000008"
    # another run dir with its own (older) history: the named checkpoint is not part of it
    make(tmp_path, steps=[2])
    other = {**values, "run_id": "run", "resume": str(ckpts / "step-000008")}
    with pytest.raises(ConfigError, match="is at step 8, ahead of this run dir's newest complete checkpoint"):
        _plan(other)
    with pytest.raises(ConfigError, match="`resume_rewind`: true, but .*step-000008 is not a checkpoint of this"):
        _plan({**other, "resume_rewind": True})

    # going back is explicit; killed in the middle of the first save after it, everything agrees on step 4
    rewind = {**values, "resume": str(ckpts / "step-000004"), "resume_rewind": True}
    killed = run_cli(finetune_args(rewind), extra_env={FAULT_ENV: "mid_save@6"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "going back from step-000008 (step 8) to step-000004 (step 4)" in killed.stdout
    assert (ckpts / LATEST_FILE).read_text().strip() == "step-000004"
    start = json.loads((run_dir / STARTS_JSONL).read_text().splitlines()[-1])
    assert start["rewind"] == {"from": "step-000008", "to": "step-000004"}
    steps = [r["step"] for r in metrics_lines(run_dir)]  # 5, 6 (maybe 7) of the new history
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 6
    assert _plan(values).checkpoint == ckpts / "step-000004"  # a plain restart agrees with `latest`

    # the same command again: finishes the rewind, replacing the abandoned checkpoints loudly
    done = run_cli(finetune_args(rewind))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from" in done.stdout and "replacing existing checkpoints/step-000006" in done.stdout
    assert_same_as_reference(values, resume_reference)
    # ... and once the run has moved on, the flag left in the command does not go back a second time
    log: list[str] = []
    assert _plan({**rewind, "max_steps": 10}, log).checkpoint == ckpts / "step-000008"
    assert any("was done by an earlier start" in m for m in log)


def test_every_checkpoint_failing_verification_is_refused_not_overwritten(synthetic_root, tmp_path, capsys):
    values = resume_values(synthetic_root, tmp_path)
    run_dir = run_dir_of(values)
    manager, _ = make(run_dir.parent, steps=[2, 4])
    (run_dir.parent / "run").rename(run_dir)
    for name in ("step-000002", "step-000004"):
        _truncate(run_dir / CHECKPOINTS_DIR / name)
    before = tree_digest(run_dir)
    assert main(finetune_args(values)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config field `resume`: auto, but no checkpoint") and err.count("error:") == 1
    assert "skipping checkpoints/step-000004: adapter_model.safetensors: size 100" in err
    assert "skipping checkpoints/step-000002: adapter_model.safetensors: size 100" in err
    assert "--resume never` with another run_id" in err
    assert main(finetune_args({**values, "resume": "never"})) == 2
    assert "already holds checkpoints up to step 4" in capsys.readouterr().err
    assert main(["ckpt", "verify", str(run_dir)]) == 1
    assert "would refuse to start" in capsys.readouterr().out
    assert tree_digest(run_dir) == before
    assert _plan({**values, "run_id": "over", "resume": "never"}).checkpoint is None  # the way to start over
