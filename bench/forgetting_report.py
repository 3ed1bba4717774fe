"""The forgetting benchmark's results: success pooled over tasks and seeds, partial documents, the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steadyvla.atomic_files import atomic_write_json
from steadyvla.eval.report import wilson_interval

ARMS = ("baseline", "method")
MODELS = ("base", *ARMS)
TASK_SETS = ("A", "B")
RESULTS_FILE = "results.json"
PARTIAL_FILE = "results_partial.json"


def row_names() -> list[str]:
    """`base_A`, `base_B`, `baseline_A`, ...: one row per model and task set."""
    return [f"{model}_{task_set}" for model in MODELS for task_set in TASK_SETS]


def pooled(reports: list[dict]) -> dict[str, Any]:
    """Successes over every task and seed of `reports`, with a Wilson 95 % interval."""
    successes = sum(r["overall"]["successes"] for r in reports)
    n = sum(r["overall"]["episodes"] for r in reports)
    low, high = wilson_interval(successes, n)
    per_task: dict[str, list[int]] = {}
    for r in reports:
        for task, row in r["tasks"].items():
            counts = per_task.setdefault(task, [0, 0])
            counts[0] += row["successes"]
            counts[1] += row["episodes"]
    return {"successes": successes, "episodes": n, "success_rate": successes / n, "ci95": [low, high],
            "per_task": {t: {"successes": k, "episodes": m, "success_rate": k / m} for t, (k, m) in per_task.items()}}


def results_document(settings: dict[str, Any], seeds: list[int], reports: dict[tuple[str, int], dict],
                     seconds: float, skipped: list[str] | None = None) -> dict[str, Any]:
    """`results` holds the rows every seed has evaluated (reports pooled in seed order);
    `incomplete` the rows only some seeds have, with the seeds done; `skipped` the jobs not run."""
    complete, incomplete = {}, {}
    for row in row_names():
        done = [seed for seed in seeds if (row, seed) in reports]
        if len(done) == len(seeds):
            complete[row] = pooled([reports[row, seed] for seed in seeds])
        elif done:
            incomplete[row] = {**pooled([reports[row, seed] for seed in done]), "seeds": done}
    document = {"settings": settings, "results": complete, "seconds": seconds}
    if incomplete or skipped or len(complete) < len(row_names()):
        document.update(incomplete=incomplete, skipped=list(skipped or []))
    return document


def write_document(path: Path, document: dict[str, Any]) -> None:
    """Atomically, so a run killed mid-write leaves the previous version."""
    atomic_write_json(path, document)


def read_document(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _cell(row: dict[str, Any] | None, seeds_note: str = "") -> str:
    if row is None:
        return "not run"
    return (f"{row['successes']:3d}/{row['episodes']:<3d} {row['success_rate']:4.0%} "
            f"[{row['ci95'][0]:4.0%}, {row['ci95'][1]:4.0%}]{seeds_note}")


def format_table(results: dict[str, Any]) -> str:
    """success on A (forgetting) and on B (plasticity) per model, pooled over tasks and seeds;
    rows only some seeds reached are marked with those seeds, rows not reached `not run`."""
    rows, incomplete = results["results"], results.get("incomplete", {})
    lines = [f"{'model':10s} {'success on A (old tasks)':>34s} {'success on B (new tasks)':>34s}"]
    for model in MODELS:
        cells = []
        for task_set in TASK_SETS:
            name = f"{model}_{task_set}"
            if name in rows:
                cells.append(_cell(rows[name]))
            elif name in incomplete:
                cells.append(_cell(incomplete[name], f" seeds {incomplete[name]['seeds']}"))
            else:
                cells.append(_cell(None))
        lines.append(f"{model:10s} {cells[0]:>34s} {cells[1]:>34s}")
    return "\n".join(lines)
