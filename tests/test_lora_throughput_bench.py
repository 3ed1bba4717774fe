"""bench/lora_throughput.py runs every kind of arm on CPU (tiny preset) without an arm error: a
broken arm found here costs seconds, found on the GPU it costs a lease."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_kind_of_arm_runs_on_cpu(tmp_path):
    arms = ["ref_eager", "step_fast", "step_no_cudagraphs", "step_plain", "finetune_e2e"]
    out = tmp_path / "lt.json"
    cmd = [sys.executable, str(ROOT / "bench" / "lora_throughput.py"), "--device", "cpu", "--preset", "tiny",
           "--batch-size", "2", "--steps", "2", "--warmup", "1", "--arms", ",".join(arms), "--workers", "0",
           "--image-size", "64", "--estimate-scale", "0", "--no-profile", "--work-dir", str(tmp_path / "work"),
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())["arms"]
    assert list(results) == arms
    for name, result in results.items():
        assert "error" not in result and "skipped" not in result, (name, result)
        assert result["s_per_step_median"] > 0, name
    e2e = results["finetune_e2e"]
    assert e2e["fresh_returncode"] == 0 and e2e["resume_returncode"] == 0 and e2e["ckpt_blocking_s"]
    assert 0 <= e2e["data_wait_s_median"] <= e2e["s_per_step_median"]


def _event(cat: str, name: str, ts: float, dur: float, tid: int = 1, corr: int | None = None) -> dict:
    args = {} if corr is None else {"correlation": corr}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_timeline_finds_busy_time_kinds_and_the_host_op_behind_each_gap(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from timeline import analyse_trace

    # one step, 1000 us of wall: a GEMM, a gap of 300 us while the optimizer op launches its kernel,
    # an overlapping pair of kernels (counted once as busy), and a 2 us gap (launch latency, not idle)
    events = [
        _event("cpu_op", "## Call CompiledFxGraph abc", 0, 100),
        _event("cuda_runtime", "cudaGraphLaunch", 10, 5, corr=1),
        _event("cpu_op", "Optimizer.step#AdamW.step", 150, 400),
        _event("cpu_op", "aten::_fused_adamw_", 160, 300),
        _event("cuda_runtime", "cudaLaunchKernel", 390, 5, corr=2),
        _event("cuda_runtime", "cudaLaunchKernel", 395, 5, corr=3),
        _event("kernel", "nvjet_sm90_tst_256x144_64x4", 100, 200, tid=7, corr=1),
        _event("kernel", "multi_tensor_apply_kernel<FusedAdamW>", 600, 100, tid=7, corr=2),
        _event("kernel", "triton_poi_fused_add_0", 650, 100, tid=7, corr=3),
        _event("kernel", "nvjet_sm90_lora", 752, 8, tid=7),
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    summary = analyse_trace(trace, wall_s=1e-3, steps=1)
    assert summary["device_busy_ms_per_step"] == round((200 + 150 + 8) / 1e3, 2)
    assert summary["ms_per_step_by_kind"] == {"gemm": 0.2, "optimizer": 0.1, "triton (inductor)": 0.1,
                                              "gemm (small)": 0.01}
    assert summary["idle_gaps_over_5us_ms_per_step"] == 0.3
    [gap] = summary["largest_gaps"]
    assert gap["us"] == 300 and gap["after"].startswith("nvjet") and gap["before"].startswith("multi_tensor")
    assert gap["launched_by"] == "Optimizer.step#AdamW.step > aten::_fused_adamw_"
