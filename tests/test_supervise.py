"""Launchers that supervise: a death is explained (rank, signal, memory evidence, knobs, the resume
command) and `restart_on_failure` finishes the run bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import DEMO_CONFIG, assert_same_as_reference, cli_env, resume_values, run_dir_of
from steadyvla.checkpoint.layout import STARTS_JSONL
from steadyvla.diagnose import (
    Evidence, Failure, CgroupMemory, is_out_of_memory, last_memory_metrics, read_cgroup_memory, torchrun_failures,
)
from steadyvla.faults import FAULT_ENV, FAULT_MARKER_ENV
from steadyvla.launch import resume_command
from steadyvla.supervise import explain, supervise, with_resume_auto

TORCHRUN_SUMMARY = """
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
steadyvla.cli FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-06_05:40:00
  host      : node7
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
============================================================
"""


def test_torchrun_summary_names_the_rank_pid_and_signal():
    (failure,) = torchrun_failures(TORCHRUN_SUMMARY)
    assert (failure.who, failure.pid, failure.exitcode, failure.signal_name) == ("rank 1", 4242, -9, "SIGKILL")


def test_cgroup_v2_and_v1_memory_files(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{8 << 30}\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert read_cgroup_memory(v2) == CgroupMemory(8 << 30, 1, str(v2))
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(1 << 62))  # v1's "no limit"
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert read_cgroup_memory(tmp_path / "v1") == CgroupMemory(None, 2, str(v1))
    assert read_cgroup_memory(tmp_path / "none") == CgroupMemory()


def test_report_of_an_oom_kill_names_everything_a_user_needs(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 1.0}) + "\n" + json.dumps(
        {"step": 2, "train_loss": 0.9, "host_rss_gib": 21.5, "host_peak_rss_gib": 22.0, "gpu_peak_alloc_gib": 60.1})
        + "\n" + json.dumps({"step": 3, "train_loss": 0.8}) + "\n")
    ev = Evidence([Failure("rank 1", 4242, -9)], None, CgroupMemory(24 << 30, 0, "/sys/fs/cgroup"),
                  CgroupMemory(24 << 30, 1, "/sys/fs/cgroup"), [], last_memory_metrics(tmp_path))
    assert is_out_of_memory(ev)
    report = explain(ev, "CONFIG=c.yaml scripts/run_method_train.sh 2")
    for text in ("rank 1 (pid 4242) was killed by SIGKILL (exit -9)", "memory limit 24.0 GiB, OOM kills 0 -> 1",
                 "last logged memory (step 2): host_rss_gib 21.5, host_peak_rss_gib 22.0, gpu_peak_alloc_gib 60.1",
                 "num_workers", "grad_accumulation_steps", "probe_batch_size",
                 "resume (continues from the last complete checkpoint): CONFIG=c.yaml scripts/run_method_train.sh 2"):
        assert text in report, (text, report)
    assert "no OOM record" not in report
    unexplained = explain(Evidence([Failure("the training process", 7, -9)]), "x")
    assert "no OOM record was found" in unexplained and "scheduler" in unexplained


def test_restart_continues_with_resume_auto():
    assert with_resume_auto(["a", "--resume", "never", "--x", "1"]) == ["a", "--resume", "auto", "--x", "1"]
    assert with_resume_auto(["a"]) == ["a", "--resume", "auto"]


def test_resume_command_repeats_the_launcher_line_with_its_environment():
    line = resume_command("method", ["2", "1000", "--lora_rank", "8"], {"CONFIG": "/c/m.yaml", "BATCH_SIZE": "4",
                                                                         "HOME": "/root"})
    assert line == "CONFIG=/c/m.yaml BATCH_SIZE=4 scripts/run_method_train.sh 2 1000 --lora_rank 8"


def test_steadyvla_launch_is_the_launcher(tmp_path):
    env = cli_env({"STEADYVLA_DRY_RUN": "1", "BATCH_SIZE": "3"})
    via_cli = subprocess.run([sys.executable, "-m", "steadyvla.cli", "launch", "baseline", "1", "5", "--lora_rank", "8"],
                             env=env, capture_output=True, text=True, timeout=120)
    direct = subprocess.run([sys.executable, "-m", "steadyvla.launch", "baseline", "1", "5", "--lora_rank", "8"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert via_cli.returncode == direct.returncode == 0, via_cli.stderr + direct.stderr
    assert via_cli.stdout == direct.stdout and "--batch_size 3 --max_steps 5" in via_cli.stdout
    bad = subprocess.run([sys.executable, "-m", "steadyvla.cli", "launch", "lora"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: launcher kind: 'lora' is not one of method, baseline, full")


def test_a_child_that_runs_out_of_address_space_is_reported_as_out_of_memory(capfd):
    hog = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); x = []\n"
           "while True: x.append(bytearray(64 << 20))")
    messages: list[str] = []
    code = supervise([sys.executable, "-c", hog], run_dir=None, restarts=0, backoff_s=0, resume_command="again",
                     log=messages.append)
    assert code == 1
    report = "\n".join(messages)
    assert "the training process" in report and "exited with 1" in report
    assert "it ran out of memory: MemoryError" in report and "to use less memory" in report
    assert "MemoryError" in capfd.readouterr().err  # the child's own output still reaches the user


def test_a_killed_child_without_restarts_exits_like_the_shell_says():
    messages: list[str] = []
    code = supervise([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                     run_dir=None, restarts=0, backoff_s=0, resume_command="again", log=messages.append)
    assert code == 128 + 9
    assert "was killed by SIGKILL (exit -9)" in messages[0] and "resume (continues" in messages[0]


@pytest.mark.slow
def test_launcher_explains_a_sigkill_and_restarts_to_the_uninterrupted_result(synthetic_root, tmp_path,
                                                                              resume_reference):
    values = resume_values(synthetic_root, tmp_path / "runs", restart_on_failure=1, restart_backoff_s=0)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(DEMO_CONFIG.read_text()), **values}))
    env = cli_env({"CONFIG": str(config), FAULT_ENV: "mid_save@4:kill-once", FAULT_MARKER_ENV: str(tmp_path / "m")})
    done = subprocess.run([sys.executable, "-m", "steadyvla.launch", "baseline", "1"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the training process" in done.stderr and "was killed by SIGKILL (exit -9)" in done.stderr
    assert f"resume (continues from the last complete checkpoint): CONFIG={config} scripts/run_baseline_lora.sh 1" \
        in done.stderr
    assert "restart 1 of 1" in done.stderr
    starts = [json.loads(line) for line in (run_dir_of(values) / STARTS_JSONL).read_text().splitlines()]
    assert [s["restart"] for s in starts] == [None, {"attempt": 1, "of": 1, "after": "the training process SIGKILL"}]
    assert starts[1]["resumed_step"] == 2
    assert_same_as_reference(values, resume_reference)
