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
