"""What memory the machine has and what this run uses: cgroup / host limits, process RSS (workers
included), GPU peaks. Read-only; cheap enough for every logging step."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
# metrics.jsonl keys (not deterministic: resume tests compare every other key bit for bit)
GPU_PEAK_ALLOC = "gpu_peak_alloc_gib"
GPU_PEAK_RESERVED = "gpu_peak_reserved_gib"
HOST_RSS = "host_rss_gib"
HOST_PEAK_RSS = "host_peak_rss_gib"
MEMORY_METRIC_KEYS = (GPU_PEAK_ALLOC, GPU_PEAK_RESERVED, HOST_RSS, HOST_PEAK_RSS)

CGROUP_V2_MAX = Path("/sys/fs/cgroup/memory.max")
CGROUP_V2_CURRENT = Path("/sys/fs/cgroup/memory.current")
CGROUP_V1_LIMIT = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
CGROUP_V1_USAGE = Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")
MEMINFO = Path("/proc/meminfo")
UNLIMITED_V1 = 2**60  # v1 reports "no limit" as a page-rounded huge number


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2: no limit) -> None


@dataclass(frozen=True)
class HostMemory:
    """Host memory this process may still use: the tighter of the cgroup and the machine."""

    available: int  # bytes that can still be allocated
    limit: int | None  # cgroup limit, None if none
    source: str  # what `available` came from

    def describe(self) -> str:
        limit = f", cgroup limit {self.limit / GIB:.1f} GiB" if self.limit else ""
        return f"{self.available / GIB:.1f} GiB available ({self.source}{limit})"


def host_memory() -> HostMemory:
    """MemAvailable of /proc/meminfo, capped by the cgroup (v2 memory.max, v1 limit_in_bytes)."""
    available = None
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    source = "MemAvailable"
    for limit_path, usage_path in ((CGROUP_V2_MAX, CGROUP_V2_CURRENT), (CGROUP_V1_LIMIT, CGROUP_V1_USAGE)):
        limit = _read_int(limit_path)
        if limit is None or limit >= UNLIMITED_V1:
            continue
        usage = _read_int(usage_path) or 0
        if limit - usage < available:
            available, source = max(0, limit - usage), f"cgroup {limit_path}"
        return HostMemory(available, limit, source)
    return HostMemory(available, None, source)


def device_free(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device, None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)


def _proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def host_rss(include_children: bool = True) -> int:
    """Resident bytes of this process plus (by default) its child processes (DataLoader workers).
    Shared copy-on-write pages count in each process, as `top` shows them."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        me = psutil.Process()
        procs = [me] + (me.children(recursive=True) if include_children else [])
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a worker that just exited
                pass
        return total
    pids = [os.getpid()] + (_children(os.getpid()) if include_children else [])
    total = 0
    for pid in pids:
        try:
            total += _proc_rss(pid)
        except OSError:
            pass
    return total


def peak_rss() -> int:
    """Peak resident bytes of this process so far: /proc's VmHWM, the high-water mark of this
    process's own memory. Not ru_maxrss: Linux carries that across fork and exec, so a process started
    by a large parent (pytest, a launcher) reports at least the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_peaks(device: torch.device) -> tuple[int, int] | None:
    """(peak allocated, peak reserved) bytes of the CUDA caching allocator since start; None on CPU."""
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def memory_metrics(device: torch.device) -> dict[str, float]:
    """The memory keys of one metrics.jsonl line (GPU keys only on CUDA)."""
    metrics = {HOST_RSS: round(host_rss() / GIB, 4), HOST_PEAK_RSS: round(peak_rss() / GIB, 4)}
    peaks = gpu_peaks(device)
    if peaks is not None:
        metrics[GPU_PEAK_ALLOC] = round(peaks[0] / GIB, 4)
        metrics[GPU_PEAK_RESERVED] = round(peaks[1] / GIB, 4)
    return metrics
