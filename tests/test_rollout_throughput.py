"""bench/rollout_throughput.py at toy scale: a tiny merged model, env steps/s per --num-envs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("metaworld") is None:
    pytest.skip("MetaWorld is not installed (pip install 'steadyvla[demo]')", allow_module_level=True)

BENCH = Path(__file__).resolve().parents[1] / "bench" / "rollout_throughput.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("rollout_throughput_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_model_rows_per_num_envs(tmp_path, capsys):
    bench = _bench_module()
    out = tmp_path / "rollout.json"
    assert bench.main(["--episodes", "2", "--max-steps", "3", "--num-envs", "1,2", "--devices", "cpu",
                       "--image-size", "32", "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["device"], r["num_envs"]) for r in rows] == [("cpu", 1), ("cpu", 2)]
    for r in rows:
        assert r["env_steps"] == 6  # 2 episodes x 3 steps (an untrained model does not succeed that fast)
        assert r["env_steps_per_s"] == pytest.approx(r["env_steps"] / r["seconds"])
        assert r["forward_calls"] == (3 if r["num_envs"] == 2 else 6) and 0 < r["forward_share"] <= 1
    table = capsys.readouterr().out
    assert "steps/s" in table and f"wrote {out}" in table


def test_bad_flags_name_the_flag(capsys):
    bench = _bench_module()
    for args, message in ((["--num-envs", "0,8"], "--num-envs: '0,8'; must be comma-separated integers >= 1"),
                          (["--task", "fly-v3"], "--task: 'fly-v3' unknown; valid:"),
                          (["--vla-path", "/nonexistent"], "--vla-path: /nonexistent is not a directory")):
        with pytest.raises(SystemExit):
            bench.main(args)
        assert message in capsys.readouterr().err
