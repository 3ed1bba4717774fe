"""Why did a training process die? The evidence a launcher can gather after the fact.

SIGKILL (exit -9) is almost always the kernel's OOM killer (host memory), sometimes the scheduler
(a time limit, `scancel`, `kubectl delete`). The cgroup's `memory.events` counts OOM kills, the
kernel log names the killed pid when it is readable, and the run's metrics.jsonl holds the last
host RSS and GPU peak that training logged. A Python-level allocation failure (`ulimit -v`, a
failed CUDA allocation) does not kill the process: it prints a memory error and exits 1.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from steadyvla.checkpoint.layout import METRICS_JSONL
from steadyvla.memory_runtime import GPU_PEAK_ALLOC, GPU_PEAK_RESERVED, HOST_PEAK_RSS, HOST_RSS

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMORY_ERROR_PATTERNS = ("MemoryError", "Cannot allocate memory", "can't allocate memory", "CUDA out of memory",
                         "OutOfMemoryError", "out of memory")
# metrics.jsonl keys with memory numbers (written by the runtime memory tracking)
MEMORY_METRICS = (HOST_RSS, HOST_PEAK_RSS, GPU_PEAK_ALLOC, GPU_PEAK_RESERVED)
_TORCHRUN_RANK = re.compile(r"rank\s*:\s*(\d+)")
_TORCHRUN_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)")
GIB = 1024**3


@dataclass
class Failure:
    """One dead worker: which one, how it ended."""

    who: str  # "rank 1" or "the training process"
    pid: int
    exitcode: int  # negative: killed by that signal

    @property
    def signal_name(self) -> str | None:
        if self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"


@dataclass
class CgroupMemory:
    """The memory limit and OOM-kill count of this process's cgroup (None where unreadable)."""

    limit_bytes: int | None = None
    oom_kills: int | None = None
    source: str | None = None


@dataclass
class Evidence:
    """Everything gathered about one death."""

    failures: list[Failure]
    memory_error: str | None = None  # the line of output that reported a failed allocation
    cgroup_before: CgroupMemory = field(default_factory=CgroupMemory)
    cgroup_after: CgroupMemory = field(default_factory=CgroupMemory)
    kernel_lines: list[str] = field(default_factory=list)
    last_metrics: dict | None = None


def read_cgroup_memory(root: Path = CGROUP_ROOT) -> CgroupMemory:
    """cgroup v2 `memory.max` + `memory.events` (oom_kill), else v1 `memory/memory.limit_in_bytes` +
    `memory.oom_control` (oom_kill)."""
    for limit_file, events_file in ((root / "memory.max", root / "memory.events"),
                                    (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.oom_control")):
        if not limit_file.exists():
            continue
        raw = limit_file.read_text().strip()
        limit = None if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60 else int(raw)
        kills = None
        if events_file.exists():
            for line in events_file.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    kills = int(value)
        return CgroupMemory(limit, kills, str(limit_file.parent))
    return CgroupMemory()


def kernel_oom_lines(pids: list[int], limit: int = 3) -> list[str]:
    """Kernel log lines about OOM kills of `pids`, if `dmesg` may be read (often root only)."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    lines = [line for line in out.stdout.splitlines() if "Out of memory" in line or "oom-kill" in line
             or "Killed process" in line]
    return [line for line in lines if any(f"process {pid} " in line or f"pid={pid}," in line for pid in pids)][-limit:]


def torchrun_failures(output: str) -> list[Failure]:
    """The failed ranks torchrun lists in its error summary ("rank : 1", "exitcode : -9 (pid: 123)")."""
    failures, rank = [], None
    for line in output.splitlines():
        if (m := _TORCHRUN_RANK.search(line)) and "local_rank" in line:
            rank = int(m.group(1))
        elif (m := _TORCHRUN_EXIT.search(line)) and rank is not None:
            failures.append(Failure(f"rank {rank}", int(m.group(2)), int(m.group(1))))
            rank = None
    return failures


def memory_error_line(output: str) -> str | None:
    """The last line of `output` reporting a failed allocation."""
    hits = [line.strip() for line in output.splitlines() if any(p in line for p in MEMORY_ERROR_PATTERNS)]
    return hits[-1] if hits else None


def last_memory_metrics(run_dir: Path | None) -> dict | None:
    """The last metrics.jsonl record that carries memory numbers (step included)."""
    path = run_dir / METRICS_JSONL if run_dir else None
    if path is None or not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if any(k in record for k in MEMORY_METRICS):
            return {k: record[k] for k in ("step", *MEMORY_METRICS) if k in record}
    return None


def is_out_of_memory(ev: Evidence) -> bool:
    """True when the evidence says memory ran out (a new cgroup OOM kill, a kernel OOM line for the
    pid, or an allocation error in the output)."""
    before, after = ev.cgroup_before.oom_kills, ev.cgroup_after.oom_kills
    return bool(ev.memory_error or ev.kernel_lines
                or (before is not None and after is not None and after > before))
