"""Read what a run dir records — metrics.jsonl, starts.jsonl, eval/*.json — for plots and summaries.

Everything here only reads, and tolerates what a killed run leaves behind (a torn last line, a
missing file): a run that has not logged a metric yet simply has no series for it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, CONFIG_YAML, LATEST_FILE, METRICS_JSONL, STARTS_JSONL
from steadyvla.config import ConfigError
from steadyvla.train.metrics import read_metrics

EVAL_DIR = "eval"  # same name as steadyvla.eval.report.EVAL_DIR (not imported: that pulls the simulator in)
EVAL_SUCCESS_KEY = "eval_success_rate"  # periodic eval's overall success rate in metrics.jsonl
_EVAL_FILE_STEP = re.compile(r"^step-(\d+)\.json$")
RUN_DIR_MARKERS = (CONFIG_YAML, STARTS_JSONL, METRICS_JSONL)


@dataclass
class EvalPoint:
    """One evaluation's overall success rate (with its 95 % interval when the JSON has one)."""

    step: int
    success_rate: float
    ci95: tuple[float, float] | None = None
    source: str = ""


@dataclass
class RunRecord:
    """The parts of a run dir that plots and summaries use."""

    path: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    starts: list[dict[str, Any]] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    label: str = ""  # legend name; the run id (dir name) unless set

    @property
    def run_id(self) -> str:
        return self.label or self.path.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of `key` over the logged rows that have it as a finite number."""
        steps, values = [], []
        for row in self.metrics:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                steps.append(int(row["step"]))
                values.append(float(value))
        return steps, values

    def restart_steps(self) -> list[int]:
        """Steps at which a later start continued the run (every start after the first)."""
        return [int(s.get("resumed_step") or 0) for s in self.starts[1:]]

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `checkpoints/latest` names, if any."""
        latest = self.path / CHECKPOINTS_DIR / LATEST_FILE
        try:
            name = latest.read_text().strip()
        except OSError:
            return None
        return self.path / CHECKPOINTS_DIR / name if name else None


def is_run_dir(path: Path) -> bool:
    """A directory holding at least one of the files every run writes on its first start."""
    return path.is_dir() and any((path / name).is_file() for name in RUN_DIR_MARKERS)


def check_run_dirs(paths: list[Path]) -> None:
    """ConfigError naming the first path that is not a run dir."""
    for path in paths:
        if not is_run_dir(path):
            raise ConfigError(f"RUN_DIR: {str(path)!r} is not a run dir (expected a directory with "
                              f"{', '.join(RUN_DIR_MARKERS)}, e.g. runs/<run_id>)")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_metrics(path)  # same tolerant reader: one JSON object per line, torn tail ignored


def read_eval_files(run_dir: Path) -> tuple[list[EvalPoint], list[str]]:
    """Overall success of every `eval/*.json` whose step is known; notes for files skipped."""
    points, notes = [], []
    for path in sorted((run_dir / EVAL_DIR).glob("*.json")):
        try:
            report = json.loads(path.read_text())
            overall = report["overall"]
            rate = float(overall["success_rate"])
        except (OSError, ValueError, KeyError, TypeError):
            notes.append(f"{path}: not an eval results file; skipped")
            continue
        step = report.get("global_step")
        match = _EVAL_FILE_STEP.match(path.name)
        if step is None and match:
            step = int(match.group(1))
        if step is None:
            notes.append(f"{path}: no global_step; skipped")
            continue
        ci = overall.get("success_ci95")
        points.append(EvalPoint(int(step), rate, tuple(ci) if ci else None, path.name))
    points.sort(key=lambda p: p.step)
    return points, notes


def metrics_eval_points(metrics: list[dict[str, Any]]) -> list[EvalPoint]:
    """Periodic-eval results logged into metrics.jsonl (`eval_success_rate`)."""
    return [EvalPoint(int(r["step"]), float(r[EVAL_SUCCESS_KEY]), source=METRICS_JSONL)
            for r in metrics if isinstance(r.get(EVAL_SUCCESS_KEY), (int, float))]


def load_run(path: Path) -> tuple[RunRecord, list[str]]:
    """The run record of `path` (checked with `check_run_dirs` first) and notes on skipped files.

    Evaluations come from eval/*.json (they carry intervals) and, for steps without such a file,
    from metrics.jsonl's `eval_success_rate`."""
    record = RunRecord(path, _read_jsonl(path / METRICS_JSONL), _read_jsonl(path / STARTS_JSONL))
    evals, notes = read_eval_files(path)
    seen = {p.step for p in evals}
    evals += [p for p in metrics_eval_points(record.metrics) if p.step not in seen]
    record.evals = sorted(evals, key=lambda p: p.step)
    return record, notes
