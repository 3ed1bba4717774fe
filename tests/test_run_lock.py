"""One process per run dir: a second start is refused naming the holder, read-only verbs still work,
a kill -9 leaves no stale lock, and leftovers of saves are only cleaned under the lock."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    cli_command, cli_env, finetune_args, resume_values, run_cli, run_dir_of,
    wait_for_metrics,
)
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, LATEST_FILE, RUN_LOCK_FILE
from steadyvla.checkpoint.manager import CheckpointManager
from steadyvla.checkpoint.run_lock import RunDirBusy, RunLock, is_locked_elsewhere, read_holder

HOLD = ("import sys, time; from pathlib import Path; from steadyvla.checkpoint.run_lock import RunLock; "
        "lock = RunLock.acquire(Path(sys.argv[1])); lock.announce(); print('locked', flush=True); time.sleep(600)")


def _hold(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run dir's lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=cli_env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_exclusive_across_processes_and_released_by_kill_9(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = _hold(run_dir)
    try:
        assert is_locked_elsewhere(run_dir)
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            RunLock.acquire(run_dir)
        # a standalone manager neither cleans the holder's temp dirs nor saves under it
        tmp = run_dir / CHECKPOINTS_DIR / ".tmp-step-000004-99999"
        tmp.mkdir(parents=True)
        with pytest.raises(RunDirBusy):
            CheckpointManager(run_dir, log=lambda _m: None).save(4, lambda d: None)
        assert tmp.is_dir() and not (run_dir / CHECKPOINTS_DIR / LATEST_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
    assert not is_locked_elsewhere(run_dir)  # the kernel released it: nothing stale to remove
    with RunLock.acquire(run_dir) as lock, RunLock.acquire(run_dir) as again:  # re-entrant in a process
        assert lock is again
    assert read_holder(run_dir)["pid"] == holder.pid  # the file stays; only the flock matters


def test_second_start_on_a_live_run_is_refused_and_read_only_verbs_work(synthetic_root, tmp_path):
    values = resume_values(synthetic_root, tmp_path, max_steps=200, save_steps=1)
    run_dir = run_dir_of(values)
    first = subprocess.Popen(cli_command(finetune_args(values)), env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_metrics(run_dir, 2, first)
        second = run_cli(finetune_args(values))
        assert second.returncode == 2, second.stdout + second.stderr
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: run dir"), second.stderr
        assert f"in use by pid {first.pid} on host {socket.gethostname()}" in err[0]
        assert RUN_LOCK_FILE in err[0] and "another run_id" in err[0]
        assert "resume" not in second.stdout  # refused before even planning the resume
        for verb in (["ckpt", "ls", str(run_dir)], ["ckpt", "verify", str(run_dir)],
                     ["doctor", *finetune_args(values)[1:]]):
            done = run_cli(verb)
            assert "Traceback" not in done.stderr and "step-0000" in done.stdout, (verb, done.stdout, done.stderr)
        assert f"in use by pid {first.pid}" in done.stdout  # doctor says a run is live
        assert first.poll() is None  # the live run was not disturbed
    finally:
        first.kill()
        first.wait()
