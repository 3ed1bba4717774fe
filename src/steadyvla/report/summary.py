"""The end-of-run summary `finetune` (and `train`) print: what the run did and where its results are.

Built only from the run dir's files, so any entry point can call `run_summary(run_dir)` once its
loop has finished (rank 0). Plots are not drawn here (matplotlib would add seconds to every run);
the summary names the `steadyvla plot` command instead.
"""

from __future__ import annotations

import shlex
import time
from datetime import datetime
from pathlib import Path

from steadyvla.checkpoint.layout import METRICS_JSONL
from steadyvla.report.plot import PLOTS_DIR, smoothing_window
from steadyvla.report.run_files import RunRecord, load_run

STEP_TIME_KEY = "step_time_s"  # issue 14's timing key (seconds of one optimizer step)
_START_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # starts.jsonl `time`


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def smoothed_ends(values: list[float]) -> tuple[float, float] | None:
    """Mean of the first and of the last `smoothing_window` logged values (the plots' smoothing)."""
    if not values:
        return None
    window = smoothing_window(len(values))
    return sum(values[:window]) / len(values[:window]), sum(values[-window:]) / len(values[-window:])


def _wall_time_line(run: RunRecord, now: float) -> str | None:
    parts = []
    if run.starts:
        try:
            started = datetime.strptime(run.starts[-1]["time"], _START_TIME_FORMAT).timestamp()
            parts.append(f"{_format_duration(now - started)} this start")
        except (KeyError, TypeError, ValueError):
            pass
        if len(run.starts) > 1:
            parts.append(f"{len(run.starts)} starts ({len(run.starts) - 1} restarts)")
    _, step_times = run.series(STEP_TIME_KEY)
    if step_times:
        parts.append(f"{_format_duration(sum(step_times))} in logged optimizer steps")
    return "wall time: " + ", ".join(parts) if parts else None


def _metric_line(run: RunRecord, key: str, label: str, fmt: str) -> str | None:
    _, values = run.series(key)
    ends = smoothed_ends(values)
    if ends is None:
        return None
    window = smoothing_window(len(values))
    how = f"mean of {window} logged steps" if window > 1 else "logged value"
    return f"{label}: {ends[0]:{fmt}} -> {ends[1]:{fmt}} (first -> last, {how})"


def _best_eval_line(run: RunRecord) -> str | None:
    if not run.evals:
        return None
    best = max(run.evals, key=lambda p: (p.success_rate, -p.step))
    ci = f" (95% CI {best.ci95[0]:.0%}-{best.ci95[1]:.0%})" if best.ci95 else ""
    return f"best eval: success {best.success_rate:.0%}{ci} at step {best.step} ({len(run.evals)} evals)"


def run_summary(run_dir: Path, now: float | None = None) -> str:
    """The summary of `run_dir` as a few lines of text."""
    run_dir = Path(run_dir)
    run, _notes = load_run(run_dir)
    now = time.time() if now is None else now
    steps = int(run.metrics[-1]["step"]) if run.metrics else 0
    lines = [f"run {run.run_id}: {steps} optimizer steps"]
    for line in (_wall_time_line(run, now),
                 _metric_line(run, "train_loss", "train loss", ".4f"),
                 _metric_line(run, "action_accuracy", "action accuracy", ".1%"),
                 _best_eval_line(run)):
        if line:
            lines.append(line)
    checkpoint = run.latest_checkpoint()
    lines.append(f"checkpoint: {checkpoint}" if checkpoint else "checkpoint: none yet")
    lines.append(f"metrics: {run_dir / METRICS_JSONL}")
    lines.append(f"plots: steadyvla plot {shlex.quote(str(run_dir))}   (PNGs into {run_dir / PLOTS_DIR})")
    return "\n".join(lines)
