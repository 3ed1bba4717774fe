"""bench/forgetting.py --smoke: the whole pipeline (demo data, base, merge, both arms, eval) at toy scale."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

# probe without importing: nothing may import mujoco before the GL backend is chosen
if importlib.util.find_spec("metaworld") is None:
    pytest.skip("MetaWorld is not installed (pip install 'steadyvla[demo]')", allow_module_level=True)

BENCH = Path(__file__).resolve().parents[1] / "bench" / "forgetting.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("forgetting_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_forgetting_smoke_runs_the_whole_pipeline(tmp_path, capsys):
    bench = _bench_module()
    assert bench.main(["--smoke", "--work-dir", str(tmp_path)]) == 0
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
