"""bench/forgetting.py --smoke: the whole pipeline (demo data, base, merge, both arms, eval) at toy scale,
inline (--jobs 1) and in worker processes (--jobs 2, same results); --time-budget's partial results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# probe without importing: nothing may import mujoco before the GL backend is chosen
if importlib.util.find_spec("metaworld") is None:
    pytest.skip("MetaWorld is not installed (pip install 'steadyvla[demo]')", allow_module_level=True)

BENCH = Path(__file__).resolve().parents[1] / "bench" / "forgetting.py"
SRC = Path(__file__).resolve().parents[1] / "src"


def _bench_module():
    spec = importlib.util.spec_from_file_location("forgetting_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_forgetting_smoke_runs_the_whole_pipeline(tmp_path, capsys):
    bench = _bench_module()
    assert bench.main(["--smoke", "--work-dir", str(tmp_path), "--jobs", "1"]) == 0
    results = json.loads((tmp_path / bench.RESULTS_FILE).read_text())
    rows = results["results"]
    assert set(rows) == {f"{model}_{s}" for model in ("base", *bench.ARMS) for s in "AB"}
    for row in rows.values():
        assert row["episodes"] == 1 and 0.0 <= row["ci95"][0] <= row["success_rate"] <= row["ci95"][1] <= 1.0
    assert set(rows["method_A"]["per_task"]) == set(results["settings"]["tasks_a"])
    # the method arm really ran the method from the base: its metrics carry the HSW coefficients
    method_metrics = (tmp_path / "runs" / "method-B-seed0" / "metrics.jsonl").read_text().splitlines()
    assert "hsw_beta" in json.loads(method_metrics[-1])
    baseline_cfg = (tmp_path / "runs" / "baseline-B-seed0" / "config.yaml").read_text()
    assert "models/base-A" in baseline_cfg
    # the merged fine-tunes carry both data sets' statistics (A is un-normalised with the base's)
    config = json.loads((tmp_path / "models" / "method-B-seed0" / "config.json").read_text())
    assert {"setA", "setB"} <= set(config["norm_stats"])
    table = capsys.readouterr().out
    assert "success on A (old tasks)" in table and "method" in table
    # every eval rewrote the partial results; the last one is the complete document
    partial = json.loads((tmp_path / bench.PARTIAL_FILE).read_text())
    assert partial["results"] == rows and "skipped" not in partial
    assert table.count("[forgetting]") >= 6 and "evals 6/6" in table

    # --jobs 2: the same jobs in spawned worker processes (run as the lead runs it: a script)
    parallel = tmp_path.parent / (tmp_path.name + "-jobs2")
    env = {**os.environ, "PYTHONPATH": str(SRC), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--work-dir", str(parallel), "--jobs", "2"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((parallel / bench.RESULTS_FILE).read_text())["results"] == rows
    for name in ("base-A-seed0", "baseline-B-seed0", "method-A-seed0"):  # episode by episode, not only counts
        inline, spawned = (json.loads((d / "eval" / f"{name}.json").read_text()) for d in (tmp_path, parallel))
        assert spawned["tasks"] == inline["tasks"]


def test_time_budget_zero_starts_nothing_and_writes_partial_results(tmp_path, capsys):
    bench = _bench_module()
    assert bench.main(["--smoke", "--work-dir", str(tmp_path), "--jobs", "1", "--time-budget", "0"]) == 0
    partial = json.loads((tmp_path / bench.PARTIAL_FILE).read_text())
    assert partial["results"] == {} and partial["incomplete"] == {}
    assert {"train-base", "train-method-seed0", "eval-base-A-seed0"} <= set(partial["skipped"])
    assert not (tmp_path / bench.RESULTS_FILE).exists() and not (tmp_path / "runs").exists()
    out = capsys.readouterr().out
    assert "time budget 0s reached: skipped 11 jobs" in out and "not run" in out


def test_bad_flags_name_the_flag_and_what_is_valid(tmp_path, capsys):
    bench = _bench_module()
    for flag, value, message in (("--jobs", "0", "--jobs: 0; must be >= 1"),
                                 ("--time-budget", "-5", "--time-budget: -5; must be >= 0 seconds"),
                                 ("--seeds", "0,0", "--seeds: '0,0'; must be distinct integers, e.g. 0,1")):
        with pytest.raises(SystemExit):
            bench.main(["--work-dir", str(tmp_path), flag, value])
        assert message in capsys.readouterr().err
