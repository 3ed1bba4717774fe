"""Run a set of dependent benchmark jobs in priority order, in spawned worker processes or inline.

A job starts once every job it `needs` has finished; among the ready jobs, the one listed first
starts first. With one worker the jobs run inline, one after another, in exactly that order. With
a time budget no job starts after the budget has passed (running ones finish); the jobs left are
returned as skipped.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Job:
    """One unit of work: `kind` and `args` tell the worker function what to do."""

    name: str
    kind: str
    args: tuple = ()
    needs: tuple[str, ...] = ()


def limit_threads(threads: int) -> None:
    """Worker initializer: `threads` intra-op threads, so parallel workers do not oversubscribe the cores."""
    import torch

    torch.set_num_threads(threads)


def check_jobs(jobs: list[Job]) -> None:
    """Names are unique and every need names an earlier-listed job (so no cycle can exist)."""
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"job {job.name!r} is listed twice")
        missing = [n for n in job.needs if n not in seen]
        if missing:
            raise ValueError(f"job {job.name!r} needs {missing}, which are not listed before it")
        seen.add(job.name)


def run_jobs(jobs: list[Job], work: Callable[[Job], Any], on_done: Callable[[Job, Any], None], *,
             workers: int = 1, started: float | None = None, budget_s: float | None = None,
             threads_per_worker: int | None = None) -> list[Job]:
    """Run `jobs` (priority order) with `workers` processes; `on_done(job, result)` runs in this
    process after each. Returns the jobs not started because the budget (seconds since `started`)
    ran out. A failing job stops new starts; its exception is raised once the running ones end.
    `work` must be picklable (a module-level function or a partial of one) when `workers` > 1.
    """
    if workers < 1:
        raise ValueError(f"workers: {workers}; must be >= 1")
    check_jobs(jobs)
    started = time.perf_counter() if started is None else started
    waiting = list(jobs)
    finished: set[str] = set()

    def over_budget() -> bool:
        return budget_s is not None and time.perf_counter() - started >= budget_s

    def next_ready() -> Job | None:
        ready = next((job for job in waiting if all(n in finished for n in job.needs)), None)
        if ready is not None:
            waiting.remove(ready)
        return ready

    if workers == 1:
        while waiting and not over_budget():
            job = next_ready()
            result = work(job)
            finished.add(job.name)
            on_done(job, result)
        return waiting

    initializer = (limit_threads, (threads_per_worker,)) if threads_per_worker else (None, ())
    failure: BaseException | None = None
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=initializer[0], initargs=initializer[1]) as pool:
        running: dict[Future, Job] = {}
        while True:
            while failure is None and len(running) < workers and not over_budget():
                job = next_ready()
                if job is None:
                    break
                running[pool.submit(work, job)] = job
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    result = future.result()
                except BaseException as err:  # noqa: BLE001 - re-raised after the running jobs end
                    failure = failure or err
                    continue
                finished.add(job.name)
                on_done(job, result)
    if failure is not None:
        raise failure
    return waiting
