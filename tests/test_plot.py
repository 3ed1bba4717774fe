"""`steadyvla plot` and the end-of-run summary, on real short runs (baseline and method) so that
a renamed metric key shows up here."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import cli_command, cli_env, metrics_lines
from steadyvla.report.plot import CHARTS, EVAL_CHART_FILE, plot_runs
from steadyvla.report.summary import run_summary
from steadyvla.train.finetune import finetune
from steadyvla.train.run_dir import run_dir_for

pytest.importorskip("matplotlib")

METHOD = dict(method_enabled=True, probe_size=8, probe_batch_size=4, icsm_rank=4, icsm_sensitivity_samples=4,
              thermostat_warmup_steps=1, thermostat_update_interval=1)
BASELINE_FILES = {"train_loss.png", "action_accuracy.png", "l1_loss.png", "lr.png"}
METHOD_FILES = BASELINE_FILES | {"drift_d.png", "hsw_beta.png", "hsw_gamma.png"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(synthetic_root, tmp_path_factory):
    """A 4-step baseline run (its summary lines captured) and a 4-step method run."""
    root = tmp_path_factory.mktemp("runs")
    common = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(root), batch_size=4,
                  max_steps=4, save_steps=2, lora_rank=4, learning_rate=3e-3, progress_bar=False, seed=3)
    from steadyvla.config import build_config

    lines: list[str] = []
    base = build_config({**common, "run_id": "base"})
    finetune(base, log=lines.append)
    method = build_config({**common, "run_id": "method", **METHOD})
    finetune(method, log=lambda m: None)
    return run_dir_for(base), run_dir_for(method), lines


def _png_names(paths) -> set[str]:
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, path
    return {p.name for p in paths}


def test_plot_writes_the_baseline_charts_and_skips_the_rest_with_a_note(two_runs, tmp_path):
    base, _method, _lines = two_runs
    notes: list[str] = []
    written = plot_runs([base], log=notes.append)
    assert _png_names(written) == BASELINE_FILES
    assert all(p.parent == base / "plots" for p in written)
    assert any("drift_d.png skipped" in n for n in notes)
    assert any(f"{EVAL_CHART_FILE} skipped" in n for n in notes)


def test_method_run_logs_every_charted_key_and_gets_its_charts(two_runs, tmp_path):
    _base, method, _lines = two_runs
    rows = metrics_lines(method)
    assert all(chart.key in rows[-1] for chart in CHARTS), "a charted metric key is not logged any more"
    assert _png_names(plot_runs([method], tmp_path / "p", log=lambda m: None)) == METHOD_FILES


def test_overlay_and_eval_results_with_restart_lines(two_runs, tmp_path):
    base, method, _lines = two_runs
    # a restart and two evaluations, in the formats starts.jsonl and `steadyvla eval` write
    starts = (method / "starts.jsonl").read_text().splitlines()
    restart = {**json.loads(starts[0]), "resumed_step": 2, "resumed_from": "checkpoints/step-000002"}
    (method / "starts.jsonl").write_text("\n".join([*starts, json.dumps(restart)]) + "\n")
    (method / "eval").mkdir()
    for step, rate in ((2, 0.25), (4, 0.5)):
        report = {"global_step": step, "overall": {"episodes": 4, "successes": int(4 * rate),
                                                   "success_rate": rate, "success_ci95": [0.1, 0.9]}}
        (method / "eval" / f"step-{step:06d}.json").write_text(json.dumps(report))
    (method / "eval" / "notes.json").write_text("{}")  # not an eval file: skipped with a note
    notes: list[str] = []
    written = plot_runs([base, method], log=notes.append)
    assert _png_names(written) == METHOD_FILES | {EVAL_CHART_FILE}
    assert all(p.parent == base / "plots" / "overlay" for p in written)
    assert any("notes.json" in n for n in notes)
    summary = run_summary(method)
    assert "best eval: success 50% (95% CI 10%-90%) at step 4 (2 evals)" in summary
    assert "2 starts (1 restarts)" in summary


def test_plot_cli_refuses_a_dir_that_is_not_a_run_dir_and_writes_nothing(two_runs, tmp_path):
    base, _method, _lines = two_runs
    out = tmp_path / "out"
    done = subprocess.run(cli_command(["plot", str(base), str(tmp_path), "--out", str(out)]), capture_output=True,
                          text=True, env=cli_env(), timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path) in errors[0], done.stderr
    assert not out.exists()


def test_end_of_run_summary(two_runs):
    base, _method, lines = two_runs
    printed = lines[-1]
    assert printed.startswith("done: run base: 4 optimizer steps")
    summary = run_summary(base)
    for expected in ("wall time:", "train loss:", "action accuracy:", f"checkpoint: {base / 'checkpoints'}",
                     "step-000004", f"steadyvla plot {base}"):
        assert expected in printed and expected in summary, expected
    rows = metrics_lines(base)
    assert f"{rows[0]['train_loss']:.4f} -> {rows[-1]['train_loss']:.4f}" in summary  # 4 points: no smoothing
    assert "best eval" not in summary
