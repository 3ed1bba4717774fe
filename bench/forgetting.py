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

Prints a table and writes results.json into --work-dir (also to stdout with --json).

    PYTHONPATH=src python bench/forgetting.py                      # defaults: see --help
    PYTHONPATH=src python bench/forgetting.py --smoke              # whole pipeline in < 2 min on CPU

Scale found on CPU (2 shared cores): the default base (tiny preset, 10 demo episodes per task of
reach / button-press-topdown / drawer-close at 64 px, batch 16, lr 5e-3 cosine to 3e-4, LoRA r16,
400 steps: train loss 4.4 -> ~2.3, action token accuracy 20 % -> ~55 %) reached 2/15 = 13 %
closed-loop success on A (button-press-topdown 2/5, reach 0/5, drawer-close 0/5; eval seed 0,
120-step horizon). Training ran ~4 steps/s on the idle CPU; evaluation is the cost: that eval took
25 min wall (1750 env steps, 1.2 env steps/s, the 2 cores shared by ~10 processes). The defaults
keep that base and budget the rest for a GPU run of about 8 minutes: 300 fine-tune steps per arm
and seed, 8 eval episodes per task and seed, 2 seeds (at most 34,560 env steps; successful
episodes end early). Training and eval use the GPU when there is one (`--device` overrides for
eval). Runs, merged models and eval JSONs are reused when present: use a fresh --work-dir for
different settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the bench imports steadyvla from src/ when run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from steadyvla.config import build_config  # noqa: E402
from steadyvla.eval.command import EvalRequest, run_eval  # noqa: E402
from steadyvla.eval.report import wilson_interval  # noqa: E402
from steadyvla.model.merge import merge_checkpoint  # noqa: E402
from steadyvla.train.finetune import finetune  # noqa: E402
from steadyvla.train.run_dir import run_dir_for  # noqa: E402

SET_A = "setA"
SET_B = "setB"
DEFAULT_TASKS_A = "reach-v3,button-press-topdown-v3,drawer-close-v3"
DEFAULT_TASKS_B = "window-open-v3,plate-slide-v3,handle-press-v3"
ARMS = ("baseline", "method")
RESULTS_FILE = "results.json"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MIN_LR = 3e-4  # cosine floor (configs/demo.yaml's)


@dataclass
class Settings:
    """What one benchmark run does (the command-line flags)."""

    work_dir: Path
    tasks_a: list[str]
    tasks_b: list[str]
    episodes_per_task: int = 10
    image_size: int = 64
    base_steps: int = 400
    finetune_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 5e-3
    lora_rank: int = 16
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    eval_episodes: int = 8
    eval_max_steps: int = 120
    device: str = "cpu"
    method_overrides: dict[str, Any] = field(default_factory=dict)


def quiet(_message: str) -> None:
    pass


def say(message: str) -> None:
    print(f"[forgetting] {message}", flush=True)


def make_datasets(s: Settings) -> None:
    """setA and setB under work_dir/data (reused when present: generation is deterministic)."""
    from steadyvla.data.demo_metaworld import ensure_demo_dataset

    for name, tasks in ((SET_A, s.tasks_a), (SET_B, s.tasks_b)):
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
    """finetune (resumes or skips when the run is already complete), then merge into `out` once."""
    started = time.perf_counter()
    finetune(cfg, log=quiet)
    run_dir = run_dir_for(cfg)
    if not out.exists():
        merge_checkpoint(run_dir, out, log=quiet)
    say(f"{run_dir.name}: {cfg.max_steps} steps in {time.perf_counter() - started:.0f}s -> {out.name}")
    return out


def evaluate(s: Settings, model_dir: Path, tasks: list[str], unnorm_key: str, seed: int, name: str) -> dict:
    """Closed-loop results of `model_dir` on `tasks` (JSON written next to the model)."""
    out = s.work_dir / "eval" / f"{name}.json"
    if out.exists():
        return json.loads(out.read_text())
    return run_eval(EvalRequest(tasks=tasks, episodes=s.eval_episodes, seed=seed, vla_path=model_dir,
                                unnorm_key=unnorm_key, max_steps=s.eval_max_steps, out=out,
                                image_size=s.image_size, device=s.device, progress=False), log=quiet)


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


def method_settings() -> dict[str, Any]:
    """The method's keys as configs/method_icsm_hsw_thermostat.yaml sets them for the demo scale
    (the keys that configs/demo.yaml does not have; `icms_artifact_dir` left to its default)."""
    import yaml

    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    method = yaml.safe_load((CONFIGS / "method_icsm_hsw_thermostat.yaml").read_text())
    return {k: v for k, v in method.items() if k not in demo and k != "icms_artifact_dir"}


def run_benchmark(s: Settings) -> dict[str, Any]:
    """The whole pipeline; returns the results document (also written to work_dir/results.json)."""
    started = time.perf_counter()
    s.work_dir.mkdir(parents=True, exist_ok=True)
    make_datasets(s)
    say(f"data: A={s.tasks_a} B={s.tasks_b}, {s.episodes_per_task} episodes/task, {s.image_size}px")
    models = s.work_dir / "models"
    base_cfg = run_config(s, dataset_name=SET_A, run_id="base-A", max_steps=s.base_steps, save_steps=s.base_steps,
                          seed=0)
    base = train_and_merge(base_cfg, models / "base-A")
    reports: dict[str, list[dict]] = {"base_A": [], "base_B": []}
    for seed in s.seeds:
        reports["base_A"].append(evaluate(s, base, s.tasks_a, SET_A, seed, f"base-A-seed{seed}"))
        reports["base_B"].append(evaluate(s, base, s.tasks_b, SET_A, seed, f"base-B-seed{seed}"))
    say(f"base on A: {pooled(reports['base_A'])['success_rate']:.0%}")
    for arm in ARMS:
        reports[f"{arm}_A"], reports[f"{arm}_B"] = [], []
    for seed in s.seeds:
        for arm in ARMS:
            extra = {**method_settings(), "probe_dataset_name": SET_A, **s.method_overrides} if arm == "method" else {}
            cfg = run_config(s, dataset_name=SET_B, vla_path=str(base), run_id=f"{arm}-B-seed{seed}",
                             max_steps=s.finetune_steps, save_steps=s.finetune_steps, seed=seed, **extra)
            model = train_and_merge(cfg, models / f"{arm}-B-seed{seed}")
            reports[f"{arm}_A"].append(evaluate(s, model, s.tasks_a, SET_A, seed, f"{arm}-A-seed{seed}"))
            reports[f"{arm}_B"].append(evaluate(s, model, s.tasks_b, SET_B, seed, f"{arm}-B-seed{seed}"))
    results = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()},
        "results": {name: pooled(rs) for name, rs in reports.items()},
        "seconds": time.perf_counter() - started,
    }
    (s.work_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict[str, Any]) -> str:
    """success on A (forgetting) and on B (plasticity) per model, pooled over tasks and seeds."""
    rows = results["results"]
    lines = [f"{'model':10s} {'success on A (old tasks)':>28s} {'success on B (new tasks)':>28s}"]
    for model in ("base", *ARMS):
        cells = []
        for task_set in ("A", "B"):
            r = rows[f"{model}_{task_set}"]
            cells.append(f"{r['successes']:3d}/{r['episodes']:<3d} {r['success_rate']:4.0%} "
                         f"[{r['ci95'][0]:4.0%}, {r['ci95'][1]:4.0%}]")
        lines.append(f"{model:10s} {cells[0]:>28s} {cells[1]:>28s}")
    return "\n".join(lines)


SMOKE = dict(tasks_a=["reach-v3"], tasks_b=["drawer-close-v3"], episodes_per_task=1, image_size=32, base_steps=2,
             finetune_steps=2, batch_size=4, lora_rank=4, seeds=[0], eval_episodes=1, eval_max_steps=5,
             method_overrides=dict(probe_size=4, probe_batch_size=2, icsm_rank=4, icsm_sensitivity_samples=4,
                                   thermostat_warmup_steps=1, thermostat_update_interval=1))


def parse_args(argv: list[str] | None = None) -> tuple[Settings, bool]:
    """The settings, and whether to print the results JSON."""
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
    p.add_argument("--smoke", action="store_true", help="the whole pipeline at toy scale (< 2 min on CPU)")
    p.add_argument("--json", action="store_true", help="print the results JSON after the table")
    args = p.parse_args(argv)
    tasks_a, tasks_b = args.tasks_a.split(","), args.tasks_b.split(",")
    from steadyvla.sim.metaworld import TASK_INSTRUCTIONS

    unknown = sorted(set(tasks_a + tasks_b) - set(TASK_INSTRUCTIONS))
    if unknown:
        p.error(f"--tasks-a/--tasks-b: unknown {unknown}; valid: {', '.join(TASK_INSTRUCTIONS)}")
    if set(tasks_a) & set(tasks_b):
        p.error(f"--tasks-a and --tasks-b must be disjoint; both have {sorted(set(tasks_a) & set(tasks_b))}")
    s = Settings(Path(args.work_dir), tasks_a, tasks_b, args.episodes_per_task, args.image_size, args.base_steps,
                 args.finetune_steps, args.batch_size, args.lr, seeds=[int(x) for x in args.seeds.split(",")],
                 eval_episodes=args.eval_episodes, eval_max_steps=args.eval_max_steps,
                 device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(s, key, value)
    return s, args.json


def main(argv: list[str] | None = None) -> int:
    s, print_json = parse_args(argv)
    results = run_benchmark(s)
    print(format_table(results))
    if print_json:
        print(json.dumps(results, indent=2))
    say(f"{results['seconds']:.0f}s; results in {s.work_dir / RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
