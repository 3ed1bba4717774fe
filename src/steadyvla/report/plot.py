"""`steadyvla plot RUN_DIR [RUN_DIR ...]`: PNG charts of one run, or of several overlaid.

One PNG per chart (see CHARTS): the training metrics every run logs, the method's metrics when a
run has them, and eval success (eval/*.json with its 95 % interval, else metrics.jsonl's
`eval_success_rate`). Restarts from starts.jsonl are dashed vertical lines in the run's colour.
A chart no run has data for is skipped with a note. matplotlib renders off-screen (Agg).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from steadyvla.config import ConfigError
from steadyvla.report.run_files import RunRecord, check_run_dirs, load_run

PLOTS_DIR = "plots"  # default output: <run_dir>/plots/
OVERLAY_DIR = "overlay"  # several runs, no --out: <first run_dir>/plots/overlay/
SMOOTHED_KEYS = ("train_loss", "action_accuracy", "l1_loss")  # noisy per-step values: raw + moving mean
DPI = 110


@dataclass(frozen=True)
class Chart:
    """One PNG: a metrics.jsonl key against the optimizer step."""

    file: str
    key: str
    title: str
    ylabel: str
    log_y: bool = False


CHARTS: tuple[Chart, ...] = (
    Chart("train_loss.png", "train_loss", "training loss (action tokens)", "cross-entropy"),
    Chart("action_accuracy.png", "action_accuracy", "action token accuracy", "accuracy"),
    Chart("l1_loss.png", "l1_loss", "L1 of decoded actions", "L1 (normalized action)"),
    Chart("lr.png", "lr", "learning rate", "lr"),
    Chart("drift_d.png", "drift_d", "method: representation drift d (Thermostat input)", "drift"),
    Chart("hsw_beta.png", "hsw_beta", "method: HSW beta (fragile-subspace damping)", "beta"),
    Chart("hsw_gamma.png", "hsw_gamma", "method: HSW gamma (plastic-subspace gain)", "gamma"),
)
EVAL_CHART_FILE = "eval_success.png"


def smoothing_window(n: int) -> int:
    """Moving-mean window for n logged points: 10 % of them, between 1 and 50."""
    return max(1, min(50, n // 10))


def moving_mean(values: list[float], window: int) -> list[float]:
    """Trailing moving mean (shorter at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("steadyvla plot needs matplotlib: pip install 'steadyvla[plot]'") from None
    matplotlib.use("Agg")  # no display needed; must come before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _mark_restarts(ax, run: RunRecord, color) -> None:
    for i, step in enumerate(run.restart_steps()):
        ax.axvline(step, color=color, linestyle="--", linewidth=0.9, alpha=0.7,
                   label=f"{run.run_id}: restart" if i == 0 else None)


def _draw_metric(plt, chart: Chart, runs: list[RunRecord], path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for i, run in enumerate(runs):
        steps, values = run.series(chart.key)
        if not steps:
            continue
        color = f"C{i}"
        if chart.key in SMOOTHED_KEYS and len(values) > 2:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            window = smoothing_window(len(values))
            ax.plot(steps, moving_mean(values, window), color=color, linewidth=1.6,
                    label=f"{run.run_id} (mean of {window})" if window > 1 else run.run_id)
        else:
            ax.plot(steps, values, color=color, linewidth=1.4, marker="." if len(steps) < 30 else None,
                    label=run.run_id)
        _mark_restarts(ax, run, color)
        drawn = True
    if drawn:
        _finish(plt, fig, ax, chart.title, chart.ylabel, path, log_y=chart.log_y)
    else:
        plt.close(fig)
    return drawn


def _draw_eval(plt, runs: list[RunRecord], path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for i, run in enumerate(runs):
        if not run.evals:
            continue
        color = f"C{i}"
        steps = [p.step for p in run.evals]
        rates = [p.success_rate for p in run.evals]
        ax.plot(steps, rates, color=color, marker="o", linewidth=1.4, label=run.run_id)
        with_ci = [p for p in run.evals if p.ci95 is not None]
        if with_ci:
            ax.errorbar([p.step for p in with_ci], [p.success_rate for p in with_ci],
                        yerr=[[p.success_rate - p.ci95[0] for p in with_ci],
                              [p.ci95[1] - p.success_rate for p in with_ci]],
                        fmt="none", ecolor=color, capsize=3, alpha=0.7)
        _mark_restarts(ax, run, color)
        drawn = True
    if drawn:
        ax.set_ylim(-0.02, 1.02)
        _finish(plt, fig, ax, "closed-loop success rate (95 % Wilson interval)", "success rate", path)
    else:
        plt.close(fig)
    return drawn


def _finish(plt, fig, ax, title: str, ylabel: str, path: Path, log_y: bool = False) -> None:
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def default_out_dir(run_dirs: list[Path]) -> Path:
    """<run_dir>/plots for one run; <first run_dir>/plots/overlay for several."""
    out = run_dirs[0] / PLOTS_DIR
    return out if len(run_dirs) == 1 else out / OVERLAY_DIR


def plot_runs(run_dirs: list[Path], out: Path | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Write the PNGs of `run_dirs` (overlaid when several) into `out`; return the files written.

    A path that is not a run dir is a ConfigError before anything is written; a chart without data
    in any run is skipped with a note."""
    if not run_dirs:
        raise ConfigError("RUN_DIR: at least one run dir is needed")
    run_dirs = [Path(p) for p in run_dirs]
    check_run_dirs(run_dirs)
    names = [p.name for p in run_dirs]
    if len(set(names)) != len(names):  # legends label runs by id
        names = [str(p) for p in run_dirs]
    runs = []
    for path, name in zip(run_dirs, names):
        run, notes = load_run(path)
        run.label = name
        for note in notes:
            log(f"note: {note}")
        if not run.metrics:
            log(f"note: {path}: no metrics logged yet")
        runs.append(run)
    plt = _pyplot()
    out = Path(out) if out is not None else default_out_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for chart in CHARTS:
        if _draw_metric(plt, chart, runs, out / chart.file):
            written.append(out / chart.file)
        else:
            log(f"note: no `{chart.key}` in metrics.jsonl of {', '.join(r.run_id for r in runs)}; "
                f"{chart.file} skipped")
    if _draw_eval(plt, runs, out / EVAL_CHART_FILE):
        written.append(out / EVAL_CHART_FILE)
    else:
        log(f"note: no eval results (eval/*.json or `eval_success_rate`); {EVAL_CHART_FILE} skipped")
    log(f"wrote {len(written)} plots to {out}")
    return written
