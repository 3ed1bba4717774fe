"""Forgetting benchmark: does the method (ICSM + HSW + Thermostat) keep task set A while learning B?

Pipeline, all through steadyvla's own entry points (the functions behind `steadyvla data demo`,
`finetune`, `merge` and `eval`), in --work-dir:

1. MetaWorld v3 demo datasets `setA` and `setB` (disjoint task sets, scripted experts).
2. The base: LoRA on A from the tiny preset, merged (`merge`) into an OpenVLA-layout dir whose
   norm_stats hold setA's statistics. Its closed-loop success on A is what there is to forget.
3. Per seed, two fine-tunes of that base on B with the same seed, steps and data: the LoRA
   baseline and the method (`method_enabled: true`; the ICSM teacher is the frozen base, its probe
   set is A's data: the representations to protect; the other method keys as
   configs/method_icsm_hsw_thermostat.yaml). Each run is merged into an OpenVLA dir
   whose norm_stats hold both setA's (from the base) and setB's statistics.
4. Closed-loop success (`eval`) of each merged model on A (un-normalised with setA's statistics)
   and on B (with setB's): success counts pooled over tasks and seeds, with Wilson 95 % intervals.

Prints a table and writes results.json into --work-dir (also to stdout with --json). After every
eval, results_partial.json holds what exists so far (rows every seed has finished under `results`,
the others under `incomplete`) and one `[forgetting] <elapsed>s ...` line is printed, so a run cut
at a wall limit still tells what it reached.

The GPU run (1 H100, 16 cores; each of the 14 workers evaluates with 8 environments in lockstep):

    PYTHONPATH=src python3 bench/forgetting.py --work-dir /tmp/fg --jobs 14 --time-budget 450 --json

--jobs N runs independent work in N spawned processes: the two datasets together; the base as soon
as setA exists; then the base's evals alongside all fine-tunes (they need only the base), and each
fine-tuned model's evals as soon as its merge exists. Every job is seeded on its own, so the results
equal the inline run's (--jobs 1: the original order, one job after another). --time-budget S
starts no job after S seconds (running ones finish: an eval takes up to ~2 min at the defaults, so
leave that much below the wall limit); the bench then prints what it has, names what it skipped
and exits 0. Runs, merged models and eval JSONs are reused when present (a cut run resumes where
it stopped): use a fresh --work-dir for different settings.

    PYTHONPATH=src python bench/forgetting.py --smoke --jobs 2     # whole pipeline in ~1-2 min on CPU

Scale. The default task sets leave out reach: at 56 px the tiny model cannot locate its goal dot
(open-loop it does worse than predicting the mean action). On this CPU (2 cores, 595 s, results in
docs/PERFORMANCE.md) A = drawer-close, button-press-topdown and B = window-open, handle-press with
10 demo episodes per task, a 600-step base, 200 fine-tune steps, 6 eval episodes per task and seed,
100-step horizon and seeds 0, 1 gave: base 25 % on A; the LoRA baseline 0 % on A, 46 % on B; the
method 50 % on A, 12 % on B. The defaults are sized for the GPU run: 20 episodes per task, 800 base
steps, 300 fine-tune steps per arm and seed, 8 eval episodes per task and seed, 2 seeds. On an
H100 machine (16 cores, --jobs 10) the pipeline took 177 s at 3 tasks per set. Training and eval
use the GPU when there is one (`--device` overrides for eval). A preset's base is rebuilt for merge
and eval on the device type training drew it on (a GPU-trained run needs a GPU there too).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the bench imports steadyvla from src/ when run from a checkout, and its helpers from bench/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from steadyvla.config import build_config  # noqa: E402
from steadyvla.eval.command import EvalRequest, run_eval  # noqa: E402
from steadyvla.model.merge import merge_checkpoint  # noqa: E402
from steadyvla.train.finetune import finetune  # noqa: E402
from steadyvla.train.run_dir import run_dir_for  # noqa: E402

from forgetting_report import (ARMS, PARTIAL_FILE, RESULTS_FILE, TASK_SETS, format_table,  # noqa: E402,F401
                               pooled, results_document, write_document)
from job_schedule import Job, run_jobs  # noqa: E402

SET_A = "setA"
SET_B = "setB"
DEFAULT_TASKS_A = "drawer-close-v3,button-press-topdown-v3"
DEFAULT_TASKS_B = "window-open-v3,handle-press-v3"
BASE = "base-A"  # the base's run id and merged model dir
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MIN_LR = 3e-4  # cosine floor (configs/demo.yaml's)


@dataclass
class Settings:
    """What one benchmark run does (the command-line flags)."""

    work_dir: Path
    tasks_a: list[str]
    tasks_b: list[str]
    episodes_per_task: int = 20
    image_size: int = 64
    base_steps: int = 800
    finetune_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 5e-3
    lora_rank: int = 16
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    eval_episodes: int = 8
    eval_max_steps: int = 120
    num_envs: int = 8
    device: str = "cpu"
    method_overrides: dict[str, Any] = field(default_factory=dict)


def quiet(_message: str) -> None:
    pass


def say(message: str) -> None:
    print(f"[forgetting] {message}", flush=True)


def make_dataset(s: Settings, name: str) -> None:
    """setA or setB under work_dir/data (reused when present: generation is deterministic)."""
    from steadyvla.data.demo_metaworld import ensure_demo_dataset

    tasks = s.tasks_a if name == SET_A else s.tasks_b
    ensure_demo_dataset(s.work_dir / "data" / name, tasks=tasks, episodes_per_task=s.episodes_per_task,
                        image_size=s.image_size, seed=0, progress=False)


def run_config(s: Settings, **values: Any):
    """A run on the bench's data and run root; `values` add to and override the common settings."""
    common = dict(model_preset="tiny", data_root_dir=str(s.work_dir / "data"), run_root_dir=str(s.work_dir / "runs"),
                  batch_size=s.batch_size, learning_rate=s.learning_rate, lr_scheduler="cosine", lr_warmup_steps=10,
                  min_learning_rate=min(MIN_LR, s.learning_rate), lora_rank=s.lora_rank, lora_dropout=0.0,
                  demo_image_size=s.image_size, log_every_steps=10, progress_bar=False, resume="auto")
    return build_config({**common, **values})


def train_and_merge(cfg, out: Path) -> Path:
    """finetune (resumes or skips when the run is already complete), then merge into `out` once
    (through a staging dir, so a run cut mid-merge leaves no half-written model to reuse)."""
    started = time.perf_counter()
    finetune(cfg, log=quiet)
    run_dir = run_dir_for(cfg)
    if not out.exists():
        staged = out.with_name(out.name + ".partial")
        shutil.rmtree(staged, ignore_errors=True)
        merge_checkpoint(run_dir, staged, log=quiet)
        staged.rename(out)
    say(f"{run_dir.name}: {cfg.max_steps} steps in {time.perf_counter() - started:.0f}s -> {out.name}")
    return out


def train_config(s: Settings, arm: str, seed: int):
    """The base (`arm` "base": LoRA on A from the preset) or a fine-tune of it on B."""
    if arm == "base":
        return run_config(s, dataset_name=SET_A, run_id=BASE, max_steps=s.base_steps, save_steps=s.base_steps,
                          seed=0)
    extra = {**method_settings(), "probe_dataset_name": SET_A, **s.method_overrides} if arm == "method" else {}
    return run_config(s, dataset_name=SET_B, vla_path=str(s.work_dir / "models" / BASE), run_id=model_id(arm, seed),
                      max_steps=s.finetune_steps, save_steps=s.finetune_steps, seed=seed, **extra)


def model_id(arm: str, seed: int) -> str:
    """The run id and merged model dir name of a model: `base-A`, `method-B-seed1`."""
    return BASE if arm == "base" else f"{arm}-B-seed{seed}"


def evaluate(s: Settings, model_dir: Path, tasks: list[str], unnorm_key: str, seed: int, name: str) -> dict:
    """Closed-loop results of `model_dir` on `tasks` (JSON written to work_dir/eval, reused when present)."""
    out = s.work_dir / "eval" / f"{name}.json"
    if out.exists():
        return json.loads(out.read_text())
    return run_eval(EvalRequest(tasks=tasks, episodes=s.eval_episodes, seed=seed, vla_path=model_dir,
                                unnorm_key=unnorm_key, max_steps=s.eval_max_steps, out=out,
                                image_size=s.image_size, num_envs=s.num_envs, device=s.device, progress=False),
                    log=quiet)


def method_settings() -> dict[str, Any]:
    """The method's keys as configs/method_icsm_hsw_thermostat.yaml sets them for the demo scale
    (the keys that configs/demo.yaml does not have; `icms_artifact_dir` left to its default)."""
    import yaml

    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    method = yaml.safe_load((CONFIGS / "method_icsm_hsw_thermostat.yaml").read_text())
    return {k: v for k, v in method.items() if k not in demo and k != "icms_artifact_dir"}


def run_job(s: Settings, job: Job) -> Any:
    """Do one job (in a worker process or inline): a dataset, a train + merge, or an eval."""
    if job.kind == "data":
        make_dataset(s, *job.args)
        return None
    if job.kind == "train":
        arm, seed = job.args
        return str(train_and_merge(train_config(s, arm, seed), s.work_dir / "models" / model_id(arm, seed)))
    arm, task_set, seed = job.args
    tasks = s.tasks_a if task_set == "A" else s.tasks_b
    unnorm_key = SET_A if arm == "base" or task_set == "A" else SET_B  # the base knows only setA's statistics
    name = f"{arm}-{task_set}-seed{seed}"  # base-B-seed0: the base on B; names as before --jobs
    return evaluate(s, s.work_dir / "models" / model_id(arm, seed), tasks, unnorm_key, seed, name)


def plan_jobs(s: Settings, sequential: bool) -> list[Job]:
    """Every job with what it needs, in the order to start them.

    Sequential: the original order (base evals per seed, then per seed and arm: train, eval A, eval B).
    Parallel: what gates the most first: base on A, the fine-tunes (they need only the base), their
    evals as each merge appears, and the base on B last.
    """
    data = [Job(f"data-{name}", "data", (name,)) for name in (SET_A, SET_B)]
    base = Job("train-base", "train", ("base", 0), needs=("data-setA",))

    def eval_job(arm: str, task_set: str, seed: int) -> Job:
        needs = ("train-base",) if arm == "base" else (f"train-{arm}-seed{seed}",)
        return Job(f"eval-{arm}-{task_set}-seed{seed}", "eval", (arm, task_set, seed), needs)

    trains = {(arm, seed): Job(f"train-{arm}-seed{seed}", "train", (arm, seed), needs=("train-base", "data-setB"))
              for seed in s.seeds for arm in ARMS}
    if sequential:
        jobs = [*data, base, *(eval_job("base", t, seed) for seed in s.seeds for t in TASK_SETS)]
        for seed in s.seeds:
            for arm in ARMS:
                jobs += [trains[arm, seed], eval_job(arm, "A", seed), eval_job(arm, "B", seed)]
        return jobs
    return [*data, base, *(eval_job("base", "A", seed) for seed in s.seeds), *trains.values(),
            *(eval_job(arm, t, seed) for t in TASK_SETS for seed in s.seeds for arm in ARMS),
            *(eval_job("base", "B", seed) for seed in s.seeds)]


def run_benchmark(s: Settings, jobs: int = 1, time_budget: float | None = None) -> dict[str, Any]:
    """The whole pipeline with `jobs` worker processes (1: inline, in the original order); after
    every eval work_dir/results_partial.json holds what exists. Returns the results document
    (complete: also written to work_dir/results.json; else with `skipped`, the jobs the budget cut)."""
    started = time.perf_counter()
    s.work_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()}
    reports: dict[tuple[str, int], dict] = {}
    plan = plan_jobs(s, sequential=jobs == 1)
    counts = {"eval": 0, "train": 0}
    totals = {kind: sum(j.kind == kind for j in plan) for kind in counts}

    def on_done(job: Job, result: Any) -> None:
        elapsed = time.perf_counter() - started
        if job.kind == "data":
            say(f"{elapsed:.0f}s data {job.args[0]}: {len(s.tasks_a if job.args[0] == SET_A else s.tasks_b)} "
                f"tasks, {s.episodes_per_task} episodes/task, {s.image_size}px")
            return
        counts[job.kind] += 1
        if job.kind == "train":
            say(f"{elapsed:.0f}s {job.name} merged ({counts['train']}/{totals['train']} trains)")
            return
        arm, task_set, seed = job.args
        reports[f"{arm}_{task_set}", seed] = result
        overall = result["overall"]
        say(f"{elapsed:.0f}s {job.name}: {overall['successes']}/{overall['episodes']} "
            f"({overall['successes'] / overall['episodes']:.0%}); evals {counts['eval']}/{totals['eval']}")
        partial = results_document(settings, s.seeds, reports, elapsed)
        write_document(s.work_dir / PARTIAL_FILE, partial)
        if arm == "base" and task_set == "A" and "base_A" in partial["results"]:
            say(f"base on A: {partial['results']['base_A']['success_rate']:.0%} (all seeds)")

    threads = max(1, (os.cpu_count() or 1) // jobs)
    skipped = run_jobs(plan, functools.partial(run_job, s), on_done, workers=jobs, started=started,
                       budget_s=time_budget, threads_per_worker=threads if jobs > 1 else None)
    results = results_document(settings, s.seeds, reports, time.perf_counter() - started,
                               [job.name for job in skipped])
    write_document(s.work_dir / PARTIAL_FILE, results)
    if skipped:
        say(f"time budget {time_budget:g}s reached: skipped {len(skipped)} jobs ({', '.join(j.name for j in skipped)}); "
            f"partial results in {s.work_dir / PARTIAL_FILE}")
    else:
        write_document(s.work_dir / RESULTS_FILE, results)
    return results


SMOKE = dict(tasks_a=["reach-v3"], tasks_b=["drawer-close-v3"], episodes_per_task=1, image_size=32, base_steps=2,
             finetune_steps=2, batch_size=4, lora_rank=4, seeds=[0], eval_episodes=1, eval_max_steps=5,
             method_overrides=dict(probe_size=4, probe_batch_size=2, icsm_rank=4, icsm_sensitivity_samples=4,
                                   thermostat_warmup_steps=1, thermostat_update_interval=1))


def default_jobs() -> int:
    return min(8, os.cpu_count() or 1)


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """The settings, and the flags about how to run (--jobs, --time-budget, --json)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="forgetting-bench", help="data, runs, merged models, eval JSON, results")
    p.add_argument("--tasks-a", default=DEFAULT_TASKS_A, help="comma-separated MetaWorld v3 tasks of the base")
    p.add_argument("--tasks-b", default=DEFAULT_TASKS_B, help="comma-separated tasks of the fine-tune (disjoint)")
    p.add_argument("--episodes-per-task", type=int, default=Settings.episodes_per_task, help="demo episodes")
    p.add_argument("--image-size", type=int, default=Settings.image_size, help="camera pixels (data and eval)")
    p.add_argument("--base-steps", type=int, default=Settings.base_steps)
    p.add_argument("--finetune-steps", type=int, default=Settings.finetune_steps, help="per arm and seed")
    p.add_argument("--batch-size", type=int, default=Settings.batch_size)
    p.add_argument("--lr", type=float, default=Settings.learning_rate)
    p.add_argument("--seeds", default="0,1", help="fine-tune and eval seeds (>= 2 for the report)")
    p.add_argument("--eval-episodes", type=int, default=Settings.eval_episodes, help="per task and seed")
    p.add_argument("--eval-max-steps", type=int, default=Settings.eval_max_steps, help="episode horizon")
    p.add_argument("--device", default=None, help="eval's torch device (default: cuda when there is a GPU, as "
                   "finetune picks; else cpu)")
    p.add_argument("--num-envs", type=int, default=Settings.num_envs,
                   help="environments stepped together per eval (results do not depend on it)")
    p.add_argument("--jobs", type=int, default=default_jobs(),
                   help="worker processes for independent datasets, trains and evals (default min(8, cores)); "
                        "1 runs everything inline in the original order")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no job after this many seconds; running ones finish, then the bench prints "
                        "what it has and exits 0 (results_partial.json holds it)")
    p.add_argument("--smoke", action="store_true", help="the whole pipeline at toy scale (< 2 min on CPU)")
    p.add_argument("--json", action="store_true", help="print the results JSON after the table")
    args = p.parse_args(argv)
    for flag, value in (("--jobs", args.jobs), ("--num-envs", args.num_envs)):
        if value < 1:
            p.error(f"{flag}: {value}; must be >= 1")
    if args.time_budget is not None and args.time_budget < 0:
        p.error(f"--time-budget: {args.time_budget:g}; must be >= 0 seconds")
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        p.error(f"--seeds: {args.seeds!r}; must be distinct integers, e.g. 0,1")
    tasks_a, tasks_b = args.tasks_a.split(","), args.tasks_b.split(",")
    from steadyvla.sim.metaworld import TASK_INSTRUCTIONS

    unknown = sorted(set(tasks_a + tasks_b) - set(TASK_INSTRUCTIONS))
    if unknown:
        p.error(f"--tasks-a/--tasks-b: unknown {unknown}; valid: {', '.join(TASK_INSTRUCTIONS)}")
    if set(tasks_a) & set(tasks_b):
        p.error(f"--tasks-a and --tasks-b must be disjoint; both have {sorted(set(tasks_a) & set(tasks_b))}")
    s = Settings(Path(args.work_dir), tasks_a, tasks_b, args.episodes_per_task, args.image_size, args.base_steps,
                 args.finetune_steps, args.batch_size, args.lr, seeds=seeds,
                 eval_episodes=args.eval_episodes, eval_max_steps=args.eval_max_steps, num_envs=args.num_envs,
                 device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(s, key, value)
    return s, args


def main(argv: list[str] | None = None) -> int:
    s, args = parse_args(argv)
    results = run_benchmark(s, jobs=args.jobs, time_budget=args.time_budget)
    print(format_table(results))
    if args.json:
        print(json.dumps(results, indent=2))
    written = s.work_dir / (PARTIAL_FILE if results.get("skipped") else RESULTS_FILE)
    say(f"{results['seconds']:.0f}s; results in {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
