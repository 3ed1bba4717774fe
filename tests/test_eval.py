"""`steadyvla eval`: closed-loop MetaWorld rollouts, the results file, determinism, bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from helpers import run_cli, tiny_lora_run, tree_digest
from steadyvla.config import ConfigError
from steadyvla.eval.report import build_report, default_results_path, wilson_interval
from steadyvla.eval.rollout import EpisodeResult

if importlib.util.find_spec("metaworld") is None:
    pytest.skip("MetaWorld is not installed (pip install 'steadyvla[demo]')", allow_module_level=True)

from steadyvla.eval.command import EvalRequest, run_eval  # noqa: E402
from steadyvla.eval.policy import load_checkpoint_target, vla_action_source  # noqa: E402
from steadyvla.eval.rollout import expert_action_source, rollout_task  # noqa: E402
from steadyvla.sim.metaworld import TASK_INSTRUCTIONS  # noqa: E402

QUICK = dict(episodes=2, seed=3, max_steps=4, image_size=32, progress=False)
TIMING_KEYS = ("timing",)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_root):
    """A 2-step tiny LoRA run on the synthetic 4-d action dataset (demo_image_size 32 px)."""
    return tiny_lora_run(tmp_path_factory.mktemp("evalrun"), synthetic_root)


def _without_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMING_KEYS}


@pytest.mark.parametrize("k, n, expected", [
    (7, 10, (0.396778, 0.892209)),  # (p + z²/2n ∓ z√(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964
    (0, 2, (0.0, 0.657620)),
    (2, 2, (0.342380, 1.0)),
    (1, 2, (0.094531, 0.905469)),
])
def test_wilson_interval_matches_hand_computed_values(k, n, expected):
    assert wilson_interval(k, n) == pytest.approx(expected, abs=1e-6)  # values rounded to 6 places


def test_report_fields_per_task_and_overall(tmp_path):
    eps = [EpisodeResult("reach-v3", i, 100 + i, success=i < 2, length=10 * (i + 1)) for i in range(4)]
    report = build_report({"reach-v3": eps}, TASK_INSTRUCTIONS, {"seed": 3})
    row = report["tasks"]["reach-v3"]
    assert row["instruction"] == "reach the red goal position"
    assert (row["episodes"], row["successes"], row["success_rate"]) == (4, 2, 0.5)
    assert row["mean_episode_length"] == 25.0
    assert row["success_ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert row["per_episode"][1] == {"index": 1, "env_seed": 101, "success": True, "length": 20}
    assert report["overall"]["successes"] == 2 and report["seed"] == 3 and report["format"] == 1
    assert default_results_path(tmp_path, 250) == tmp_path / "eval" / "step-000250.json"


def test_scripted_expert_succeeds_and_batching_does_not_change_results(tmp_path):
    """Success detection works: MetaWorld's expert, plugged in as the action source, succeeds."""
    reports = []
    for num_envs in (1, 2):
        req = EvalRequest(tasks=["reach-v3"], episodes=2, seed=0, max_steps=80, image_size=16, num_envs=num_envs,
                          videos=1, out=tmp_path / f"expert-{num_envs}.json", progress=False)
        reports.append(run_eval(req, log=lambda _m: None, source=expert_action_source("reach-v3")))
    row = reports[0]["tasks"]["reach-v3"]
    assert row["successes"] == 2 and all(e["length"] < 80 for e in row["per_episode"])
    assert _without_timing(reports[0])["tasks"] == _without_timing(reports[1])["tasks"]
    assert json.loads((tmp_path / "expert-1.json").read_text())["tasks"] == reports[0]["tasks"]
    video = tmp_path / "expert-1-videos" / "reach-v3-000.mp4"
    assert video.stat().st_size > 0 and reports[0]["videos"]["files"] == ["reach-v3-000.mp4"]


def test_same_seed_same_actions_and_results(run_dir):
    target = load_checkpoint_target(run_dir, None, None)
    assert target.global_step == 2 and target.unnorm_key == "synth" and target.demo_image_size == 32
    # decoded with the bins the preset run trained on (the tokenizer's vocab_size, not OpenVLA's rule)
    from steadyvla.model.build import action_tokenizer_for

    assert target.bundle.action_tokenizer.vocab_end == action_tokenizer_for(target.bundle.tokenizer).vocab_end
    runs = []
    for _ in range(2):
        actions = []
        source = vla_action_source(target)

        def recording(images, instructions, states, source=source, actions=actions):
            out = source(images, instructions, states)
            actions.append(out)
            return out

        results = rollout_task("reach-v3", recording, episodes=2, seed=5, max_steps=3, image_size=32, num_envs=2)
        runs.append((np.concatenate(actions), [(e.env_seed, e.success, e.length) for e in results]))
    assert runs[0][0].shape == (6, 4)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_trained_checkpoint_evaluates_through_the_cli(run_dir, tmp_path):
    args = ["eval", "--checkpoint", str(run_dir), "--tasks", "reach-v3", "--episodes", "2",
            "--seed", "3", "--max-steps", "4", "--no-progress"]
    done = run_cli(args)
    assert done.returncode == 0, done.stderr
    path = run_dir / "eval" / "step-000002.json"
    report = json.loads(path.read_text())
    assert report["global_step"] == 2 and report["image_size"] == 32 and report["unnorm_key"] == "synth"
    assert report["checkpoint"].endswith("step-000002") and set(report["tasks"]) == {"reach-v3"}
    for row in report["tasks"].values():
        assert row["episodes"] == 2 and len(row["per_episode"]) == 2
        assert 0 <= row["success_ci95"][0] <= row["success_rate"] <= row["success_ci95"][1] <= 1
        assert all(1 <= e["length"] <= 4 for e in row["per_episode"])
    assert f"wrote {path}" in done.stdout
    again = run_cli(args + ["--out", str(tmp_path / "again.json")])
    assert again.returncode == 0, again.stderr
    assert _without_timing(json.loads((tmp_path / "again.json").read_text())) == _without_timing(report)


def test_plain_openvla_dir_with_vla_path(tmp_path):
    from openvla_fixtures import NORM_STATS, write_tiny_openvla

    four = {"metaworld": {"action": {k: v[:3] + v[-1:] for k, v in NORM_STATS["bridge_orig"]["action"].items()}}}
    base, _ = write_tiny_openvla(tmp_path / "ov", seed=1, norm_stats=four)
    report = run_eval(EvalRequest(tasks=["reach-v3", "push-v3"], vla_path=base, out=tmp_path / "r.json", **QUICK),
                      log=lambda _m: None)
    assert report["unnorm_key"] == "metaworld" and report["global_step"] is None
    assert [row["episodes"] for row in report["tasks"].values()] == [2, 2]
    assert report["tasks"]["push-v3"]["instruction"] == "push the red puck to the green goal"
    seven, _ = write_tiny_openvla(tmp_path / "ov7", seed=1)
    with pytest.raises(ConfigError, match="7 action dimensions; MetaWorld needs 4"):
        run_eval(EvalRequest(tasks=["reach-v3"], vla_path=seven, out=tmp_path / "r7.json", **QUICK))
    assert not (tmp_path / "r7.json").exists()


def test_bad_input_is_one_error_line_and_writes_nothing(run_dir, tmp_path, capsys):
    from steadyvla.cli import main

    no_stats = tmp_path / "no-stats"
    shutil.copytree(run_dir, no_stats, ignore=shutil.ignore_patterns("eval"))
    (no_stats / "dataset_statistics.json").unlink()
    before = tree_digest(run_dir), tree_digest(no_stats)
    base = ["eval", "--checkpoint", str(run_dir), "--tasks", "reach-v3", "--episodes", "1", "--no-progress"]
    cases = [
        (["--tasks", "fly-v3"], "error: --tasks: unknown ['fly-v3']; valid: comma-separated distinct names from reach-v3"),
        (["--episodes", "0"], "error: --episodes: 0; must be >= 1"),
        (["--max-steps", "501"], "error: --max-steps: 501; must be in [1, 500]"),
        (["--checkpoint", str(tmp_path / "nope")], f"error: --checkpoint: checkpoint path {tmp_path / 'nope'} does not exist"),
        (["--checkpoint", str(no_stats)], f"error: --checkpoint: {no_stats / 'dataset_statistics.json'} is missing"),
    ]
    for extra, message in cases:  # in-process: a CLI start costs seconds (the subprocess path is below)
        code = main(base + extra)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (extra, lines)
        assert lines[-1].startswith(message), (extra, lines[-1])
        assert sum(line.startswith("error:") for line in lines) == 1
    done = run_cli(["eval", "--vla_path", str(tmp_path), "--tasks", "reach-v3", "--episodes", "1"])
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --out: required with --vla_path alone (there is no run dir to write eval/ into)"]
    assert (tree_digest(run_dir), tree_digest(no_stats)) == before
