"""SIGTERM to the whole process group (what SLURM and Kubernetes do) with DataLoader workers: the workers
ignore it, the main process saves at the step boundary, exits 0, and the run resumes bit-exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from helpers import (
    assert_same_as_reference, cli_command, cli_env, finetune_args, metrics_lines, resume_values, run_cli,
    run_dir_of, wait_for_metrics,
)
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, LATEST_FILE
from steadyvla.checkpoint.manifest import verify_checkpoint
from steadyvla.train.signals import PreemptionFlag


def test_sigterm_to_the_process_group_with_workers_saves_exits_0_and_resumes_bit_exact(
        synthetic_root, tmp_path, resume_reference):
    values = resume_values(synthetic_root, tmp_path, num_workers=2)
    run_dir = run_dir_of(values)
    proc = subprocess.Popen(cli_command(finetune_args(values)), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_metrics(run_dir, 3, proc)
        os.killpg(proc.pid, signal.SIGTERM)  # main process and both workers at once
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "killed by signal" not in out and "SIGTERM received" in out and "preempted" in out
    last = metrics_lines(run_dir)[-1]["step"]
    latest = (run_dir / CHECKPOINTS_DIR / LATEST_FILE).read_text().strip()
    assert latest == f"step-{last:06d}" and verify_checkpoint(run_dir / CHECKPOINTS_DIR / latest) == []
    done = run_cli(finetune_args(values))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_as_reference(values, resume_reference)


def test_the_same_preemption_delivered_twice_is_one_request(capsys):
    """Group delivery plus a launcher forwarding it (torchrun) must not turn into "second signal: exit now"."""
    flag = PreemptionFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # within DUPLICATE_WINDOW_S: ignored, the process lives on
    finally:
        flag.uninstall()
    assert flag.requested == signal.SIGTERM
    assert capsys.readouterr().err.count("SIGTERM received") == 1


def test_workers_ignore_preemption_signals():
    code = ("import os, signal; from steadyvla.train.signals import ignore_preemption_signals; "
            "ignore_preemption_signals(0); os.kill(os.getpid(), signal.SIGTERM); "
            "os.kill(os.getpid(), signal.SIGUSR1); print('alive')")
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "alive", done.stderr
