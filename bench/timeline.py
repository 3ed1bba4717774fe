"""Where a profiled GPU step's wall time goes, from torch.profiler's trace (bench/lora_throughput.py).

The profiler's op table sums each op's device time, and with compiled graphs it counts a graph's
kernels twice (once in the graph's range, once as kernels), so it cannot say how long the device
sat idle waiting for the host. This reads the kernels' own intervals from the exported trace:

- busy: the union of all kernel / memcpy / memset intervals, as a share of the profiled wall time;
- kernel time by kind (large GEMMs, small GEMMs such as the LoRA matmuls, attention, Triton
  kernels that inductor generated, other elementwise, the optimizer, copies);
- idle gaps between kernels: their total, and the largest ones with the kernel before, the kernel
  after and the host op that launched the kernel after (what the device was waiting for).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
SMALL_GEMM_US = 20.0  # GEMMs shorter than this are the thin LoRA matmuls and the like
GAP_US = 5.0  # idle stretches shorter than this are launch latency inside a stream of kernels


@dataclass(frozen=True)
class _Interval:
    start: float
    end: float
    name: str
    correlation: int | None


def kernel_kind(name: str, dur_us: float) -> str:
    """A coarse class for a device event's name (what the time is spent on)."""
    low = name.lower()
    if "memcpy" in low or "memset" in low:
        return "copy/memset"
    if any(k in low for k in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "matmul")):
        return "gemm (small)" if dur_us < SMALL_GEMM_US else "gemm"
    if "adam" in low or "multi_tensor" in low:
        return "optimizer"
    if low.startswith("triton") or "triton_" in low:
        return "triton (inductor)"
    if "elementwise" in low or "reduce" in low:
        return "aten elementwise/reduce"
    return "other"


def _device_intervals(events: list[dict]) -> list[_Interval]:
    out = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES and e.get("dur", 0) > 0:
            out.append(_Interval(float(e["ts"]), float(e["ts"]) + float(e["dur"]), str(e.get("name", "")),
                                 (e.get("args") or {}).get("correlation")))
    out.sort(key=lambda i: i.start)
    return out


def _launching_ops(events: list[dict]) -> dict[int, str]:
    """correlation id -> the outermost host op (and the innermost, if different) open on the launching
    thread when the kernel was launched (one sweep per thread with a stack of open ops)."""
    by_thread: dict[object, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime"):
            by_thread[e.get("tid")].append(e)
    out: dict[int, str] = {}
    for thread_events in by_thread.values():
        # at equal start times the longer (enclosing) event comes first
        thread_events.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
        stack: list[dict] = []
        for e in thread_events:
            ts = float(e["ts"])
            while stack and float(stack[-1]["ts"]) + float(stack[-1].get("dur", 0)) < ts:
                stack.pop()
            if e["cat"] != "cuda_runtime":
                stack.append(e)
                continue
            corr = (e.get("args") or {}).get("correlation")
            if corr is None:
                continue
            if stack:
                outer, inner = stack[0]["name"], stack[-1]["name"]
                out[corr] = outer if inner == outer else f"{outer} > {inner}"
            else:
                out[corr] = e.get("name", "?")
    return out


def _short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def analyse_trace(trace_path: str | Path, wall_s: float, steps: int, top_gaps: int = 12) -> dict:
    """The device timeline of an exported chrome trace: busy share, time per kernel kind and the
    largest idle gaps (all per step, in milliseconds)."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    kernels = _device_intervals(events)
    if not kernels:
        return {"kernels": 0}
    by_kind: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for k in kernels:
        kind = kernel_kind(k.name, k.end - k.start)
        by_kind[kind] += k.end - k.start
        counts[kind] += 1
    busy, gaps, reach, before = 0.0, [], kernels[0].start, kernels[0]
    busy_start = kernels[0].start
    for k in kernels:
        if k.start > reach:
            busy += reach - busy_start
            if k.start - reach >= GAP_US:
                gaps.append((k.start - reach, before, k))
            busy_start = k.start
        if k.end > reach:
            reach, before = k.end, k
    busy += reach - busy_start
    launchers = _launching_ops(events) if gaps else {}
    by_launcher: dict[str, float] = defaultdict(float)
    for gap, _, after in gaps:
        by_launcher[_short(launchers.get(after.correlation, "?"), 90)] += gap
    gaps.sort(key=lambda g: -g[0])
    per_step = 1e-3 / steps  # microseconds over `steps` steps -> milliseconds per step
    return {
        "wall_ms_per_step": round(wall_s * 1e3 / steps, 2),
        "device_busy_ms_per_step": round(busy * per_step, 2),
        "device_busy_share": round(busy * 1e-6 / wall_s, 4),
        "kernels_per_step": len(kernels) // steps,
        "ms_per_step_by_kind": {k: round(v * per_step, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "launches_per_step_by_kind": {k: counts[k] // steps for k in by_kind},
        f"idle_gaps_over_{GAP_US:g}us_ms_per_step": round(sum(g for g, _, _ in gaps) * per_step, 2),
        "idle_ms_per_step_by_next_launcher": {k: round(v * per_step, 2) for k, v in
                                             sorted(by_launcher.items(), key=lambda kv: -kv[1])[:15]},
        "largest_gaps": [{"us": round(g, 1), "after": _short(b.name), "before": _short(a.name),
                          "launched_by": _short(launchers.get(a.correlation, "?"), 90)} for g, b, a in gaps[:top_gaps]],
    }


def format_timeline(summary: dict) -> str:
    """The analysis as printable lines."""
    if not summary.get("kernels_per_step"):
        return "timeline: no device kernels in the trace"
    lines = [f"timeline: {summary['wall_ms_per_step']} ms/step wall, device busy {summary['device_busy_ms_per_step']} ms "
             f"({summary['device_busy_share']:.1%}), {summary['kernels_per_step']} kernels/step"]
    launches = summary["launches_per_step_by_kind"]
    for kind, ms in summary["ms_per_step_by_kind"].items():
        lines.append(f"  {kind:<26} {ms:8.2f} ms/step  {launches[kind]:6d} launches/step")
    gap_key = next(k for k in summary if k.startswith("idle_gaps_over_"))
    lines.append(f"  idle gaps >= {GAP_US:g} us: {summary[gap_key]} ms/step; by the host op launching the next kernel:")
    for launcher, ms in summary["idle_ms_per_step_by_next_launcher"].items():
        lines.append(f"    {ms:8.2f} ms  {launcher}")
    lines.append("  largest gaps:")
    for gap in summary["largest_gaps"]:
        lines.append(f"    {gap['us']:9.1f} us  after {gap['after']}  before {gap['before']}  ({gap['launched_by']})")
    return "\n".join(lines)
