"""Evaluation results: per-task success rate with a Wilson 95 % interval, mean episode length,
written atomically as JSON (`<run_dir>/eval/step-XXXXXX.json` or a named file)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steadyvla.atomic_files import atomic_write_json
from steadyvla.checkpoint.layout import step_dir_name
from steadyvla.eval.rollout import EpisodeResult

EVAL_DIR = "eval"
RESULTS_FORMAT = 1
Z_95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (sane at 0 % and 100 %, unlike Wald)."""
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def task_summary(episodes: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Success count and rate, its Wilson 95 % interval, mean length, and every episode."""
    n = len(episodes)
    successes = sum(e.success for e in episodes)
    low, high = wilson_interval(successes, n)
    return {
        "episodes": n,
        "successes": successes,
        "success_rate": successes / n,
        "success_ci95": [low, high],
        "mean_episode_length": sum(e.length for e in episodes) / n,
        "per_episode": [{"index": e.index, "env_seed": e.env_seed, "success": e.success, "length": e.length}
                        for e in episodes],
    }


def build_report(results: dict[str, list[EpisodeResult]], instructions: dict[str, str],
                 settings: dict[str, Any]) -> dict[str, Any]:
    """The results document: `settings` (what was evaluated, how), per-task and overall summaries."""
    tasks = {task: {"instruction": instructions[task], **task_summary(eps)} for task, eps in results.items()}
    everything = [e for eps in results.values() for e in eps]
    overall = {k: v for k, v in task_summary(everything).items() if k != "per_episode"}
    return {"format": RESULTS_FORMAT, **settings, "tasks": tasks, "overall": overall}


def default_results_path(run_dir: Path, step: int) -> Path:
    """`<run_dir>/eval/step-XXXXXX.json` for the checkpoint of `step`."""
    return Path(run_dir) / EVAL_DIR / f"{step_dir_name(step)}.json"


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write `report` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)
    return path


def format_summary(report: dict[str, Any]) -> str:
    """One line per task plus the overall line, for the terminal."""
    lines = []
    for name, row in [*report["tasks"].items(), ("overall", report["overall"])]:
        low, high = row["success_ci95"]
        lines.append(f"{name:28s} success {row['successes']}/{row['episodes']} = {row['success_rate']:.0%} "
                     f"(95% CI {low:.0%}-{high:.0%}), mean length {row['mean_episode_length']:.1f}")
    return "\n".join(lines)
