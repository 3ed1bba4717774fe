"""bench/job_schedule.py: dependency order, priority order, the time budget, worker processes."""

from __future__ import annotations

import operator
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from job_schedule import Job, run_jobs  # noqa: E402

JOBS = [Job("data-a", "data"), Job("data-b", "data"), Job("train", "train", needs=("data-a",)),
        Job("eval-late", "eval", needs=("train", "data-b")), Job("eval", "eval", needs=("train",))]


def _run(jobs, **kwargs):
    order = []

    def on_done(job, result):
        assert result == job.name and all(n in order for n in job.needs)
        order.append(job.name)

    skipped = run_jobs(jobs, operator.attrgetter("name"), on_done, **kwargs)
    return order, [job.name for job in skipped]


def test_one_worker_runs_inline_in_listed_order_once_needs_are_met():
    assert _run(JOBS) == (["data-a", "data-b", "train", "eval-late", "eval"], [])


def test_worker_processes_run_every_job_after_its_needs():
    order, skipped = _run(JOBS, workers=2, threads_per_worker=1)
    assert sorted(order) == sorted(job.name for job in JOBS) and skipped == []


def test_no_job_starts_after_the_budget():
    assert _run(JOBS, budget_s=0) == ([], [job.name for job in JOBS])
    assert _run(JOBS, workers=2, started=time.perf_counter() - 10, budget_s=5)[0] == []


def test_bad_plans_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="job 'train' needs \\['data'\\], which are not listed before it"):
        run_jobs([Job("train", "train", needs=("data",)), Job("data", "data")], str, print)
    with pytest.raises(ValueError, match="job 'a' is listed twice"):
        run_jobs([Job("a", "data"), Job("a", "data")], str, print)
    with pytest.raises(ValueError, match="workers: 0; must be >= 1"):
        run_jobs([], str, print, workers=0)
