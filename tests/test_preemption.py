"""SIGTERM to the whole process group (what SLURM and Kubernetes do) with DataLoader workers: the workers
ignore it, the main process saves at the step boundary, exits 0, and the run resumes bit-exactly."""

from __future__ import annotations

import os
import signal
import subprocess

from helpers import (
    assert_same_as_reference, cli_command, cli_env, finetune_args, metrics_lines, resume_values, run_cli,
    run_dir_of, wait_for_metrics,
)
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, LATEST_FILE
from steadyvla.checkpoint.manifest import verify_checkpoint


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
