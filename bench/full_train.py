"""Full training on one device: an OpenVLA-style FSDP2 reference loop vs `steadyvla train`, same preset and batch.

One invocation runs, each in its own process (so one arm's GPU memory never counts against another):
  (a) reference (bench/full_train_reference.py): FSDP2 full shard per block, bf16 compute / float32
      master weights and reduction, activation checkpointing of the LLM layers, AdamW, a fixed batch;
      its checkpoint the OpenVLA way (full state dict gathered to rank 0 on the CPU, safetensors),
      then loaded back the same way. Median s/step over --steps after --warmup, samples/s, peak GPU
      memory, save blocking time, load time.
  (b) `steadyvla train` as a subprocess on a generated LeRobot v3 dataset (random images of
      --image-size, 7-d actions) with the same preset, batch and precision, once with
      `async_save: true` and once `false`: step_time_s, ckpt_blocking_s and the memory keys read from
      the run's metrics.jsonl; wall time to the first step of a fresh start and of a resume.
  (c) kill -9 inside step --kill-step (STEADYVLA_FAULT=backward@K, the loop's fault point) of a copy
      of the async run, the same command again (resume: auto), and its metrics.jsonl compared line by
      line with the uninterrupted run (timing and memory keys left out).
Prints one table and writes everything to --out (JSON), also after each arm (a run cut off at a time
limit keeps what it has).

    PYTHONPATH=src python bench/full_train.py --device cpu --preset tiny --batch-size 2 --steps 10 --out /tmp/ft.json
    PYTHONPATH=src python bench/full_train.py --preset vla-1b --tokenizer-path DIR_WITH_LLAMA2_TOKENIZER \\
        --batch-size 8 --steps 20 --out full_train.json                                   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# metrics.jsonl keys that differ between identical runs (wall-clock timings, memory high-water marks)
TIMING_KEYS = ("step_time_s", "ckpt_blocking_s")
DEADLINE: float | None = None  # time.monotonic() by which every `steadyvla train` run is stopped (--time-limit-s)


def volatile_keys() -> set[str]:
    """Keys left out of the line-by-line comparison: timings and memory (as tests/helpers.py does)."""
    from steadyvla.memory_runtime import MEMORY_METRIC_KEYS

    from steadyvla.train.metrics import TIMING_METRIC_KEYS

    return set(MEMORY_METRIC_KEYS) | set(TIMING_KEYS) | set(TIMING_METRIC_KEYS)


# ---------------------------------------------------------------- (b), (c): steadyvla train subprocesses

def make_dataset(root: Path, image_size: int, episodes: int, length: int, seed: int = 0) -> Path:
    """A LeRobot v3 dataset of smooth random images (PNG stays small) and 7-d actions, 4 instructions."""
    import numpy as np

    from steadyvla.data.lerobot_writer import Episode, write_lerobot_dataset

    rng = np.random.default_rng(seed)
    tasks = ("pick up the red block", "open the top drawer", "push the puck to the goal", "press the button")
    ramp = np.linspace(0, 255, image_size, dtype=np.float32)

    def episode(i: int) -> Episode:
        base = (ramp[None, :, None] * rng.random(3)[None, None, :] + ramp[:, None, None] * 0.3) % 256
        images = np.stack([np.roll(base, t, axis=1) for t in range(length)]).astype(np.uint8)
        actions = np.concatenate([rng.normal(0, 0.3, (length, 6)), np.sign(rng.normal(size=(length, 1)))], axis=1)
        return Episode(images=images, states=rng.normal(size=(length, 8)).astype(np.float32),
                       actions=actions.astype(np.float32), task=tasks[i % len(tasks)])

    return write_lerobot_dataset(root, (episode(i) for i in range(episodes)), fps=10, robot_type="bench")


def train_values(args, data_root: Path, run_root: Path, run_id: str, async_save: bool, max_steps: int) -> dict:
    """The config of a `steadyvla train` arm (issue 11's keys), matching the reference's settings."""
    return dict(
        model_preset=args.preset, tokenizer_path=args.tokenizer_path, use_lora=False, strategy="fsdp",
        reshard_after_forward=True, reduce_dtype="float32", dtype=args.compute_dtype,
        activation_checkpointing=args.activation_checkpointing, train_vision_backbone=True, train_projector=True,
        train_llm=True, data_root_dir=str(data_root), dataset_name="bench_synth", image_aug=False,
        num_workers=args.num_workers, batch_size=args.batch_size, grad_accumulation_steps=1, max_steps=max_steps,
        learning_rate=args.learning_rate, lr_scheduler="none", weight_decay=0.0, max_grad_norm=1.0, seed=args.seed,
        save_steps=args.save_steps, async_save=async_save, keep_last_k=1, log_every_steps=1, progress_bar=False,
        run_root_dir=str(run_root), run_id=run_id, resume="auto",
        force=True,  # the preflight estimate is not under test here; the run's own peaks are
    )


def _metrics(run_root: Path) -> list[dict]:
    paths = sorted(run_root.glob("*/metrics.jsonl"))
    if not paths:
        return []
    return [json.loads(line) for line in paths[0].read_text().splitlines() if line.strip()]


def run_train(values: dict, work: Path, name: str, after_step: int = 0, env: dict | None = None,
              timeout: float = 3600, torchrun: bool = False) -> dict:
    """Run `steadyvla train` with `values`; the wall time until it logs a step > `after_step`, its exit."""
    config = work / f"{name}.json"  # JSON is YAML
    config.write_text(json.dumps(values))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun else []
    command = [sys.executable, *launcher, "-m", "steadyvla.cli", "train", "--config", str(config)]
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
                    TOKENIZERS_PARALLELISM="false", **(env or {}))
    run_root = Path(values["run_root_dir"])
    if DEADLINE is not None:
        timeout = min(timeout, max(10.0, DEADLINE - time.monotonic()))
    log = (work / f"{name}.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    first = None
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        if first is None and any(row.get("step", 0) > after_step for row in _metrics(run_root)):
            first = time.perf_counter() - t0
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()
    tail = (work / f"{name}.log").read_text().splitlines()[-15:]
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0, "time_to_first_step_s": first,
            "log_tail": tail}


def drop_checkpoints(run_root: Path, keep: bool) -> None:
    """Free the disk once an arm's checkpoints are no longer needed (vla-1b: ~22 GB each; metrics stay)."""
    if not keep:
        for ckpts in run_root.glob("*/checkpoints"):
            shutil.rmtree(ckpts, ignore_errors=True)


def summarize(rows: list[dict], warmup: int, batch_size: int) -> dict:
    """step_time_s (median after warm-up), ckpt_blocking_s of the saves, peak memory keys."""
    timed = [r["step_time_s"] for r in rows if r.get("step", 0) > warmup and "step_time_s" in r]
    blocking = [r["ckpt_blocking_s"] for r in rows if r.get("ckpt_blocking_s") is not None]
    out: dict = {"steps_logged": len(rows), "steps_timed": len(timed), "ckpt_blocking_s_all": blocking}
    if timed:
        median = statistics.median(timed)
        out.update(s_per_step=median, samples_per_s=batch_size / median)
        # what each save cost the run: its blocking time (not part of any step_time_s; the line after
        # the save carries it) plus the time over the median of the step that saved and of the step
        # after it (whose update waits for the save's host copies)
        times = {r["step"]: r["step_time_s"] for r in rows if "step_time_s" in r}
        out["save_stall_s_all"] = [
            r["ckpt_blocking_s"] + sum(max(0.0, times[s] - median) for s in (r["step"] - 1, r["step"]) if s in times)
            for r in rows if r.get("ckpt_blocking_s") is not None]
    if blocking:
        out["save_blocking_s"] = statistics.median(blocking)
    for key in ("gpu_peak_alloc_gib", "gpu_peak_reserved_gib", "host_peak_rss_gib"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = max(values)
    return out


def compare_runs(reference: list[dict], resumed: list[dict]) -> dict:
    """Line by line, volatile keys left out: equal lines, and the largest train_loss difference."""
    skip = volatile_keys()
    strip = [{k: v for k, v in r.items() if k not in skip} for r in reference]
    other = [{k: v for k, v in r.items() if k not in skip} for r in resumed]
    equal = sum(a == b for a, b in zip(strip, other))
    diffs = [abs(a.get("train_loss", 0) - b.get("train_loss", 0)) for a, b in zip(strip, other)]
    return {"lines_reference": len(strip), "lines_resumed": len(other), "lines_equal": equal,
            "steps_in_order": [r.get("step") for r in other] == [r.get("step") for r in strip],
            "bitwise_equal": strip == other, "max_abs_train_loss_diff": max(diffs, default=None)}


def steadyvla_arms(args, work: Path, results: dict, save: Callable[[], None]) -> None:
    """(b) async and sync runs plus a resume, (c) kill -9 + resume vs the uninterrupted async run;
    into `results`, `save()`d after each run (a bench cut off at a time limit keeps what it has)."""
    total = args.warmup + args.steps
    data_root = work / "data"
    make_dataset(data_root / "bench_synth", args.image_size, args.episodes, args.episode_length)
    det_env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    for mode, async_save in (("async", True), ("sync", False)):
        values = train_values(args, data_root, work / f"runs-{mode}", mode, async_save, total)
        run = run_train(values, work, mode, env=det_env, torchrun=args.torchrun)
        results[f"steadyvla_{mode}"] = {**run, **summarize(_metrics(work / f"runs-{mode}"), args.warmup,
                                                           args.batch_size)}
        save()
        if mode == "sync" and run["returncode"] == 0:  # resume the finished run for a few more steps
            extra = dict(values, max_steps=total + args.resume_steps)
            resumed = run_train(extra, work, "sync-resume", after_step=total, env=det_env, torchrun=args.torchrun)
            results["steadyvla_resume"] = {"returncode": resumed["returncode"],
                                           "time_to_first_step_s": resumed["time_to_first_step_s"],
                                           "fresh_time_to_first_step_s": run["time_to_first_step_s"],
                                           "log_tail": resumed["log_tail"]}
            save()
        drop_checkpoints(work / f"runs-{mode}", args.keep_checkpoints)
    if "kill" in args.arms:
        values = train_values(args, data_root, work / "runs-kill", "async", True, total)
        killed = run_train(values, work, "kill", env={**det_env, "STEADYVLA_FAULT": f"backward@{args.kill_step}"},
                           torchrun=args.torchrun)
        done = _metrics(work / "runs-kill")
        last = max((r.get("step", 0) for r in done), default=0)
        resumed = run_train(values, work, "kill-resume", after_step=last, env=det_env, torchrun=args.torchrun)
        results["kill_resume"] = {"kill_step": args.kill_step, "killed_returncode": killed["returncode"],
                                  "resumed_returncode": resumed["returncode"],
                                  "time_to_first_step_after_kill_s": resumed["time_to_first_step_s"],
                                  **compare_runs(_metrics(work / "runs-async"), _metrics(work / "runs-kill")),
                                  "log_tail": resumed["log_tail"] if resumed["returncode"] else []}
        drop_checkpoints(work / "runs-kill", args.keep_checkpoints)
        save()


# ---------------------------------------------------------------- orchestration and report

def reference_in_subprocess(args, work: Path) -> dict:
    """Arm (a) in a child process: its GPU memory and process group end with it."""
    out = work / "reference.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--arms", "_reference", "--out", str(out),
               *_passthrough(args)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}", "log_tail": (done.stdout + done.stderr).splitlines()[-15:]}
    return json.loads(out.read_text())


def _passthrough(args) -> list[str]:
    pairs = [("--preset", args.preset), ("--batch-size", args.batch_size), ("--warmup", args.warmup),
             ("--steps", args.steps), ("--device", args.device), ("--compute-dtype", args.compute_dtype),
             ("--learning-rate", args.learning_rate), ("--save-repeats", args.save_repeats), ("--seed", args.seed),
             ("--activation-checkpointing", str(args.activation_checkpointing).lower())]
    if args.tokenizer_path:
        pairs.append(("--tokenizer-path", args.tokenizer_path))
    return [str(part) for pair in pairs for part in pair]


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(results: dict) -> str:
    """One table: a row per arm."""
    head = ("arm", "s/step", "samples/s", "GPU peak alloc GiB", "GPU peak reserved GiB", "host peak GiB",
            "save blocking s", "save stall s (each)", "load s / start -> first step s: fresh, resumed")
    rows = [head]
    ref = results.get("reference", {})
    if "s_per_step" in ref:
        rows.append(("(a) OpenVLA-style FSDP2 + rank-0 safetensors", _fmt(ref["s_per_step"]),
                     _fmt(ref["samples_per_s"], 2), _fmt(ref.get("gpu_peak_alloc_gib"), 2),
                     _fmt(ref.get("gpu_peak_reserved_gib"), 2), _fmt(ref.get("host_peak_rss_gib"), 2),
                     _fmt(ref["save_blocking_s"]), _fmt(ref["save_blocking_s"]), f"load {_fmt(ref['load_s'])}"))
    resume = results.get("steadyvla_resume", {})
    for mode in ("async", "sync"):
        arm = results.get(f"steadyvla_{mode}")
        if not arm:
            continue
        after = f"{_fmt(arm.get('time_to_first_step_s'))}, " + (
            _fmt(resume.get("time_to_first_step_s")) if mode == "sync" else "-")
        rows.append((f"(b) steadyvla train, async_save {mode == 'async'}", _fmt(arm.get("s_per_step")),
                     _fmt(arm.get("samples_per_s"), 2), _fmt(arm.get("gpu_peak_alloc_gib"), 2),
                     _fmt(arm.get("gpu_peak_reserved_gib"), 2), _fmt(arm.get("host_peak_rss_gib"), 2),
                     _fmt(arm.get("save_blocking_s")),
                     " ".join(f"{x:.2f}" for x in arm.get("save_stall_s_all", [])) or "-", after))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    kill = results.get("kill_resume")
    if kill:
        lines.append(f"(c) kill -9 in step {kill['kill_step']} (exit {kill['killed_returncode']}) + resume (exit "
                     f"{kill['resumed_returncode']}): {kill['lines_equal']}/{kill['lines_reference']} metrics lines "
                     f"equal, bitwise {kill['bitwise_equal']}, max |d train_loss| "
                     f"{_fmt(kill['max_abs_train_loss_diff'], 6)}")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="vla-1b", help="tiny | vla-1b | openvla-7b (tiny for a CPU smoke run)")
    p.add_argument("--tokenizer-path", default=None, help="Llama-2 tokenizer dir (presets other than tiny)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps (>= 10 for the recorded numbers)")
    p.add_argument("--image-size", type=int, default=None, help="generated dataset's images (default: the preset's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compute-dtype", default=None, help="bfloat16 (default on GPU) | float32 (default on CPU)")
    p.add_argument("--activation-checkpointing", default="true", choices=("true", "false"))
    p.add_argument("--learning-rate", type=float, default=2e-5, help="AdamW lr (OpenVLA's full-training value)")
    p.add_argument("--save-repeats", type=int, default=2, help="reference saves to take the median of")
    p.add_argument("--save-steps", type=int, default=None, help="steadyvla save interval (default: every 5 steps)")
    p.add_argument("--resume-steps", type=int, default=3, help="steps the resumed run adds")
    p.add_argument("--kill-step", type=int, default=None, help="(c) step to kill -9 in (default: 2 after a save)")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--episode-length", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--torchrun", action="store_true", help="start `steadyvla train` under torchrun (1 process)")
    p.add_argument("--arms", default="reference,steadyvla,kill", help="comma-separated: reference, steadyvla, kill")
    p.add_argument("--work-dir", default=None, help="keep run dirs and logs here (default: a temporary dir)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each arm's checkpoints (default: deleted "
                   "once measured, so the disk holds one arm's at a time)")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="stop (kill) any `steadyvla train` run still going this many seconds after the start; "
                        "the JSON keeps what finished")
    p.add_argument("--out", required=True, help="JSON results")
    args = p.parse_args(argv)
    args.activation_checkpointing = args.activation_checkpointing == "true"
    args.compute_dtype = args.compute_dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.save_steps = args.save_steps or 5
    args.kill_step = args.kill_step or args.save_steps + 2
    args.arms = set(args.arms.split(","))
    if args.image_size is None:
        from steadyvla.model.presets import get_preset

        args.image_size = get_preset(args.preset).image_size
    if args.kill_step > args.warmup + args.steps:
        p.error(f"--kill-step {args.kill_step} is past the run's last step {args.warmup + args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    global DEADLINE
    args = parse_args(argv)
    if args.time_limit_s is not None:
        DEADLINE = time.monotonic() + args.time_limit_s
    out = Path(args.out)
    if args.arms == {"_reference"}:  # the child process of arm (a)
        from full_train_reference import run_reference

        work = out.parent
        result = run_reference(args.preset, args.tokenizer_path, args.batch_size, args.warmup, args.steps,
                               args.device, args.compute_dtype, args.activation_checkpointing, args.learning_rate,
                               args.save_repeats, work, args.seed)
        out.write_text(json.dumps(result))
        return 0
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results: dict = {"settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
                     "device": device_name, "torch": torch.__version__, "notes": [],
                     "date": time.strftime("%Y-%m-%d")}
    results["notes"].append("the reference trains on one fixed batch; steadyvla reads the generated dataset "
                            f"through its DataLoader ({args.num_workers} workers)")

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "reference" in args.arms:
            results["reference"] = reference_in_subprocess(args, work)
            save()
        if args.arms & {"steadyvla", "kill"}:
            steadyvla_arms(args, work, results, save)
    print(table(results))
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
