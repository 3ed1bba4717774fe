"""Rollout throughput of `steadyvla eval`: env steps per second per --num-envs and --device.

For each device the merged model (an OpenVLA-layout dir, `steadyvla merge`'s output) is loaded
once; after a short warm-up rollout, the same closed-loop eval (one task, fixed seed) runs once
per --num-envs value. Reported per run, from the eval report's `timing` field: env steps, seconds,
env steps/s; and the model's share of that time (the batched `predict_action` calls, timed around
the action source; the rest is simulation, rendering and bookkeeping).

    # on a merged model (e.g. the forgetting bench's), CPU and GPU
    PYTHONPATH=src python3 bench/rollout_throughput.py --vla-path /tmp/fg/models/base-A \\
        --unnorm-key setA --task reach-v3 --episodes 8 --max-steps 120 --num-envs 1,8 --out rollout.json
    # no --vla-path: a tiny merged model is made first (1 demo episode, 2 LoRA steps; ~30 s on CPU)
    PYTHONPATH=src python3 bench/rollout_throughput.py --episodes 4 --max-steps 60 --num-envs 1,4 --devices cpu

--devices defaults to cpu, plus cuda when a GPU is visible.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from steadyvla.atomic_files import atomic_write_json  # noqa: E402
from steadyvla.config import ConfigError, build_config  # noqa: E402
from steadyvla.eval.command import EvalRequest, run_eval  # noqa: E402

TINY_DATASET = "throughput"


def quiet(_message: str) -> None:
    pass


def make_tiny_model(work_dir: Path, task: str, image_size: int) -> tuple[Path, str]:
    """A 2-step tiny-preset LoRA on one demo episode of `task`, merged; returns (dir, unnorm key).
    Reused when present. Its actions are near-random: it measures speed, not skill."""
    from steadyvla.data.demo_metaworld import ensure_demo_dataset
    from steadyvla.model.merge import merge_checkpoint
    from steadyvla.train.finetune import finetune
    from steadyvla.train.run_dir import run_dir_for

    out = work_dir / "tiny-merged"
    if out.exists():
        return out, TINY_DATASET
    ensure_demo_dataset(work_dir / "data" / TINY_DATASET, tasks=[task], episodes_per_task=1, image_size=image_size,
                        seed=0, progress=False)
    cfg = build_config(dict(model_preset="tiny", data_root_dir=str(work_dir / "data"), dataset_name=TINY_DATASET,
                            run_root_dir=str(work_dir / "runs"), run_id="tiny", batch_size=4, max_steps=2,
                            save_steps=2, lora_rank=4, demo_image_size=image_size, progress_bar=False, seed=0))
    finetune(cfg, log=quiet)
    merge_checkpoint(run_dir_for(cfg), out, log=quiet)
    return out, TINY_DATASET


class TimedSource:
    """An action source that adds up the time spent in the wrapped one (the model's forward)."""

    def __init__(self, source, device: str):
        self.source, self.device, self.seconds, self.calls = source, device, 0.0, 0

    def __call__(self, images, instructions, states):
        started = time.perf_counter()
        actions = self.source(images, instructions, states)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return actions


def measure(vla_path: Path, unnorm_key: str | None, task: str, episodes: int, max_steps: int, image_size: int,
            num_envs: list[int], devices: list[str], out_dir: Path, seed: int = 0) -> list[dict[str, Any]]:
    """One row per (device, num_envs): env steps, seconds, env steps/s, model forward share."""
    from steadyvla.eval.policy import check_action_dims, load_openvla_target, vla_action_source

    rows = []
    for device in devices:
        target = load_openvla_target(vla_path, unnorm_key, device)
        check_action_dims(target, 4)
        source = vla_action_source(target)

        def request(n: int, eps: int, steps: int, name: str) -> EvalRequest:
            return EvalRequest(tasks=[task], episodes=eps, seed=seed, max_steps=steps, image_size=image_size,
                               num_envs=n, device=device, progress=False, out=out_dir / name)

        run_eval(request(max(num_envs), 1, 2, f"warmup-{device}.json"), log=quiet, source=source)
        for n in num_envs:
            timed = TimedSource(source, device)
            report = run_eval(request(n, episodes, max_steps, f"{device}-envs{n}.json"), log=quiet, source=timed)
            timing = report["timing"]
            rows.append({"device": device, "num_envs": n, "task": task, "episodes": episodes, "max_steps": max_steps,
                         "image_size": image_size, "env_steps": timing["env_steps"], "seconds": timing["seconds"],
                         "env_steps_per_s": timing["env_steps_per_s"], "forward_calls": timed.calls,
                         "forward_s": timed.seconds, "forward_share": timed.seconds / timing["seconds"],
                         "successes": report["overall"]["successes"]})
        del target, source
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'device':7s} {'num_envs':>8s} {'env_steps':>9s} {'seconds':>8s} {'steps/s':>8s} {'forward':>8s}"]
    for r in rows:
        lines.append(f"{r['device']:7s} {r['num_envs']:8d} {r['env_steps']:9d} {r['seconds']:8.1f} "
                     f"{r['env_steps_per_s']:8.1f} {r['forward_share']:8.0%}")
    return "\n".join(lines)


def _positive_ints(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        p.error(f"{flag}: {text!r}; must be comma-separated integers >= 1, e.g. 1,8")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vla-path", type=Path, default=None, help="merged model dir (default: make a tiny one)")
    p.add_argument("--unnorm-key", default=None, help="its norm_stats key (default: the first)")
    p.add_argument("--task", default="reach-v3", help="MetaWorld v3 task")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=120, help="episode horizon")
    p.add_argument("--image-size", type=int, default=64, help="camera pixels")
    p.add_argument("--num-envs", default="1,8", help="comma-separated environments stepped together")
    p.add_argument("--devices", default=None, help="comma-separated torch devices (default: cpu, plus cuda if any)")
    p.add_argument("--work-dir", type=Path, default=None, help="tiny model and eval JSONs (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    from steadyvla.sim.metaworld import TASK_INSTRUCTIONS

    if args.task not in TASK_INSTRUCTIONS:
        p.error(f"--task: {args.task!r} unknown; valid: {', '.join(TASK_INSTRUCTIONS)}")
    if args.episodes < 1:
        p.error(f"--episodes: {args.episodes}; must be >= 1")
    args.num_envs = _positive_ints(p, "--num-envs", args.num_envs)
    args.devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if any(d.startswith("cuda") for d in args.devices) and not torch.cuda.is_available():
        p.error(f"--devices: {','.join(args.devices)} names cuda, but no GPU is visible; use cpu")
    if args.vla_path is not None and not args.vla_path.is_dir():
        p.error(f"--vla-path: {args.vla_path} is not a directory (a merged OpenVLA-layout model)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rollout-throughput-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        vla_path, key = (args.vla_path, args.unnorm_key) if args.vla_path else \
            make_tiny_model(work_dir, args.task, args.image_size)
        try:
            rows = measure(vla_path, key, args.task, args.episodes, args.max_steps, args.image_size, args.num_envs,
                           args.devices, work_dir / "eval")
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(format_rows(rows))
    document = {"vla_path": str(args.vla_path) if args.vla_path else "tiny (made by the bench)", "rows": rows}
    if args.out:
        atomic_write_json(args.out, document)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
