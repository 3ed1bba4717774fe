"""A background save that fails (disk full) is retried once at the next step boundary, then stops the run
with one `error:` line; the traceback goes to the run dir's errors.log."""

from __future__ import annotations

from helpers import (
    MAX_STEPS, assert_same_as_reference, finetune_args, metrics_lines, resume_values, run_cli, run_dir_of,
)
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, ERROR_LOG, LATEST_FILE
from steadyvla.cli import main
from steadyvla.faults import FAULT_ENV


def test_failed_background_save_is_retried_once_and_the_run_stays_bit_exact(synthetic_root, tmp_path,
                                                                            resume_reference):
    values = resume_values(synthetic_root, tmp_path)
    done = run_cli(finetune_args(values), extra_env={FAULT_ENV: "mid_save@4:enospc-once"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("saving checkpoint checkpoints/step-000004 failed (OSError: [Errno 28] No space left on device: "
            "'injected by STEADYVLA_FAULT'); retrying once") in done.stdout
    assert_same_as_reference(values, resume_reference)


def test_save_failing_twice_stops_at_the_next_step_with_one_error_line(synthetic_root, tmp_path):
    values = resume_values(synthetic_root, tmp_path)
    run_dir = run_dir_of(values)
    failed = run_cli(finetune_args(values), extra_env={FAULT_ENV: "mid_save@4:enospc"})
    assert failed.returncode == 1, failed.stdout + failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert "Traceback" not in failed.stderr and sum(line.startswith("error:") for line in lines) == 1
    error = lines[-1]
    assert error.startswith("error: SaveFailed: saving checkpoint checkpoints/step-000004 failed twice: OSError: "
                            "[Errno 28] No space left on device"), error
    assert f"full traceback in {run_dir / ERROR_LOG}" in error
    assert "Traceback" in (run_dir / ERROR_LOG).read_text()
    assert (run_dir / CHECKPOINTS_DIR / LATEST_FILE).read_text().strip() == "step-000002"
    assert not (run_dir / CHECKPOINTS_DIR / "step-000004").exists()
    assert 4 <= metrics_lines(run_dir)[-1]["step"] < MAX_STEPS  # stopped at a step boundary soon after


def test_unexpected_exceptions_are_one_error_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import steadyvla.cli as cli

    def boom(args, extra):
        raise KeyError("surprise")

    monkeypatch.setitem(cli.COMMANDS, "ckpt", boom)
    assert main(["ckpt", "ls", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "error: KeyError: 'surprise' (rerun with --debug for the full traceback)\n"
    assert main(["ckpt", "ls", str(tmp_path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: KeyError")


def test_metrics_are_made_durable_before_each_commit_off_the_training_thread(synthetic_root, tmp_path, monkeypatch):
    """metrics.jsonl is fsynced before every checkpoint is committed (a resumed run finds every line
    up to its checkpoint), and for background saves on the writer thread, not inside the step."""
    import threading

    from steadyvla.train.metrics import MetricsLogger

    values = resume_values(synthetic_root, tmp_path, max_steps=4, async_save=True)
    run_dir = run_dir_of(values)
    calls = []
    real_sync = MetricsLogger.sync

    def recording_sync(self):
        real_sync(self)
        committed = sorted(p.name for p in (run_dir / CHECKPOINTS_DIR).glob("step-*"))
        lines = [line["step"] for line in metrics_lines(run_dir)]
        calls.append((threading.current_thread() is threading.main_thread(), committed, lines))

    monkeypatch.setattr(MetricsLogger, "sync", recording_sync)
    assert main(finetune_args(values)) == 0
    # saves at steps 2 (background) and 4 (the last one: blocking, on the training thread)
    assert [(on_main, committed) for on_main, committed, _ in calls] == [
        (False, []), (True, ["step-000002"])]
    assert all(lines[-1] >= step for (_, _, lines), step in zip(calls, (2, 4)))


def test_a_failed_run_exits_even_when_a_background_thread_would_keep_it_alive(tmp_path):
    """After the `error:` line the process ends with the error's status, also when a non-daemon thread
    is stuck (the exit guard's grace period, shortened here)."""
    import subprocess
    import sys
    import time

    script = (
        "import sys, threading, time\n"
        "import steadyvla.exit_guard as guard\n"
        "import steadyvla.cli as cli\n"
        "guard.EXIT_GRACE_S = 1.0\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()  # non-daemon, stuck\n"
        "def broken(args, extra):\n"
        "    raise RuntimeError('boom')\n"
        "cli.COMMANDS['plot'] = broken\n"
        "sys.exit(cli.main(['plot', 'x']))\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 30
    assert "error: RuntimeError: boom" in done.stderr
    assert "still running 1 s after the error above (a background thread did not stop); exiting with status 1" \
        in done.stderr
