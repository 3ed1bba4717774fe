"""Run a training command and stay with it: forward preemption signals, explain a death, restart.

The launchers (scripts/run_*.sh) run the job through `supervise`. When the job (or one torchrun
rank) dies by a signal or runs out of memory, the report names the rank, the signal, the memory
evidence (cgroup limit and OOM-kill count, the kernel's line, the last logged host RSS and GPU
peak), the knobs of the users' FAQ, and the command that resumes. With `restart_on_failure: N`
the job is relaunched with `resume: auto` up to N times with back-off; every restart is recorded
in the run's starts.jsonl (through RESTART_ENV, which `record_start` reads).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from steadyvla.diagnose import (
    GIB, MEMORY_METRICS, Evidence, Failure, is_out_of_memory, kernel_oom_lines, last_memory_metrics, memory_error_line,
    read_cgroup_memory, torchrun_failures,
)

RESTART_ENV = "STEADYVLA_RESTART"  # JSON {"attempt", "of", "after"} of a supervised restart
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_USAGE = 2  # a refusal (bad config, run dir in use): restarting cannot help
TAIL_BYTES = 64 * 1024
MEMORY_KNOBS = (
    "num_workers (fewer DataLoader workers; safe to change when resuming)",
    "batch_size with a larger grad_accumulation_steps (the same global batch; a different run, so give it a new "
    "run_id_note)",
    "probe_batch_size (the method's extra probe forward; also a new run)",
    "merge after training with `steadyvla merge`, not during it",
)


def _fmt_gib(value: int | None) -> str:
    return "none" if value is None else f"{value / GIB:.1f} GiB"


def explain(ev: Evidence, resume_command: str) -> str:
    """The multi-line report printed after a failed run."""
    lines = []
    for f in ev.failures:
        how = f"was killed by {f.signal_name} (exit {f.exitcode})" if f.signal_name else f"exited with {f.exitcode}"
        lines.append(f"{f.who} (pid {f.pid}) {how}")
    oom = is_out_of_memory(ev)
    before, after = ev.cgroup_before, ev.cgroup_after
    if ev.memory_error:
        lines.append(f"it ran out of memory: {ev.memory_error}")
    if after.source:
        kills = ("unreadable" if after.oom_kills is None else
                 f"{before.oom_kills} -> {after.oom_kills}" if before.oom_kills is not None else str(after.oom_kills))
        lines.append(f"cgroup {after.source}: memory limit {_fmt_gib(after.limit_bytes)}, OOM kills {kills}")
    else:
        lines.append("cgroup memory: not readable here")
    lines += [f"kernel: {line}" for line in ev.kernel_lines]
    if any(f.signal_name == "SIGKILL" for f in ev.failures) and not oom:
        lines.append("no OOM record was found (cgroup count unchanged or unreadable, kernel log not readable): "
                     "SIGKILL is usually the host OOM killer, otherwise the scheduler (time limit, scancel, "
                     "kubectl delete)")
    if ev.last_metrics:
        m = ev.last_metrics
        parts = [f"{k} {m[k]}" for k in MEMORY_METRICS if k in m]
        lines.append(f"last logged memory (step {m.get('step', '?')}): " + ", ".join(parts))
    if oom or any(f.signal_name == "SIGKILL" for f in ev.failures):
        lines.append("to use less memory: " + "; ".join(MEMORY_KNOBS) + ". `steadyvla memory --config ...` "
                     "estimates the peak before a run")
    lines.append(f"resume (continues from the last complete checkpoint): {resume_command}")
    return "\n".join(f"[steadyvla] {line}" for line in lines)


class _Tail:
    """Copies a child's stderr through to ours as it comes and keeps its last bytes for diagnosis."""

    def __init__(self, stream) -> None:
        self.data = bytearray()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        while chunk := os.read(stream.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            self.data += chunk
            del self.data[:-TAIL_BYTES]

    def text(self) -> str:
        self.thread.join(timeout=5)
        return self.data.decode("utf-8", "replace")


def run_once(command: list[str], env: dict[str, str]) -> tuple[int, int, str]:
    """Run `command`, forwarding preemption signals to it; return (exit code, pid, stderr tail)."""
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    tail = _Tail(child.stderr)
    previous = {sig: signal.signal(sig, lambda s, _f: child.send_signal(s)) for sig in FORWARDED_SIGNALS}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, child.pid, tail.text()


def gather(code: int, pid: int, output: str, before, run_dir: Path | None) -> Evidence:
    """Collect the evidence about a run that ended with `code`."""
    failures = torchrun_failures(output) or [Failure("the training process", pid, code)]
    return Evidence(failures, memory_error_line(output), before, read_cgroup_memory(),
                    kernel_oom_lines([f.pid for f in failures]), last_memory_metrics(run_dir))


def supervise(command: list[str], *, run_dir: Path | None, restarts: int, backoff_s: float, resume_command: str,
              log: Callable[[str], None] = print) -> int:
    """Run `command`; after a failure report it and restart (with `--resume auto`) up to `restarts`
    times, waiting backoff_s, 2·backoff_s, ... (at most 5 minutes) in between. Returns the exit code."""
    env = dict(os.environ)
    for attempt in range(restarts + 1):
        before = read_cgroup_memory()
        code, pid, output = run_once(command, env)
        if code in (0, EXIT_USAGE):
            return code
        evidence = gather(code, pid, output, before, run_dir)
        log(explain(evidence, resume_command))
        if attempt == restarts:
            return code if code > 0 else 128 - code  # the shell's convention for "killed by signal"
        cause = "; ".join(f"{f.who} {f.signal_name or f'exit {f.exitcode}'}" for f in evidence.failures)
        wait = min(300.0, backoff_s * 2**attempt)
        log(f"[steadyvla] restart {attempt + 1} of {restarts} in {wait:.0f} s with resume: auto (restart_on_failure)")
        time.sleep(wait)
        env[RESTART_ENV] = json.dumps({"attempt": attempt + 1, "of": restarts, "after": cause})
        command = with_resume_auto(command)
    return 1  # not reached


def with_resume_auto(command: list[str]) -> list[str]:
    """`command` with `--resume auto` (replacing a `--resume X` it has): a restart continues the run."""
    if "--resume" in command:
        i = command.index("--resume")
        return [*command[:i], "--resume", "auto", *command[i + 2:]]
    return [*command, "--resume", "auto"]
