"""Part of bench/lora_throughput.py: `steadyvla finetune` end to end in a subprocess, on a
synthetic LeRobot v3 dataset written with the repo's writer, then a resume of the same run.

Read from metrics.jsonl: `step_time_s` (median over the steps after warm-up), `ckpt_blocking_s`
of every save, the step times of the steps that overlap a background save, the GPU peaks; and the
wall time from launching the resumed run to its first step's metrics line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from steadyvla.data.lerobot_writer import Episode, write_lerobot_dataset
from steadyvla.memory_runtime import GPU_PEAK_ALLOC, GPU_PEAK_RESERVED, HOST_PEAK_RSS
from steadyvla.train.metrics import CKPT_BLOCKING_S, DATA_WAIT_S, STEP_TIME_S, read_metrics

TASKS = ("pick up the red block and put it in the bowl", "open the top drawer", "push the puck to the goal")
DATASET_NAME = "bench_synth"
REPO = Path(__file__).resolve().parents[1]


def write_dataset(root: Path, size: int, episodes: int = 12, length: int = 20) -> Path:
    """A LeRobot v3 dataset of `episodes` x `length` frames of `size` px noise images, 7-dim actions."""
    rng = np.random.default_rng(0)
    eps = []
    for e in range(episodes):
        images = rng.integers(0, 255, (length, size, size, 3), dtype=np.uint8)
        actions = rng.uniform(-1, 1, (length, 7)).astype(np.float32)
        states = rng.normal(size=(length, 4)).astype(np.float32)
        eps.append(Episode(images=images, states=states, actions=actions, task=TASKS[e % len(TASKS)]))
    return write_lerobot_dataset(root / DATASET_NAME, eps, fps=10, robot_type="synthetic")


def _launch(config: dict, work: Path, name: str, timeout: float, first_step: int) -> dict:
    """Run `steadyvla finetune` with `config`; wall time, time to the metrics line of `first_step`."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = work / f"{name}.log"
    metrics = Path(config["run_root_dir"]) / config["run_id"] / "metrics.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    first_line_s = None
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "steadyvla.cli", "finetune", "--config", str(path)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(work))
        try:
            while proc.poll() is None:
                if first_line_s is None and any(int(r["step"]) >= first_step for r in read_metrics(metrics)):
                    first_line_s = time.perf_counter() - started
                if time.perf_counter() - started > timeout:
                    break
                time.sleep(0.05)
        finally:  # also when the bench's budget alarm interrupts the wait
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.perf_counter() - started
    if first_line_s is None and any(int(r["step"]) >= first_step for r in read_metrics(metrics)):
        first_line_s = wall
    return {"returncode": proc.returncode, "wall_s": round(wall, 2),
            "first_step_line_s": round(first_line_s, 2) if first_line_s is not None else None,
            "log_tail": log.read_text()[-3000:], "metrics": read_metrics(metrics)}


def run_e2e(work: Path, preset: str, tokenizer: str | None, batch_size: int, workers: int, image_size: int,
            warmup: int, steps: int, timeout: float, peak_tflops: float | None, flops: float | None,
            extra: dict | None = None) -> dict:
    """Fresh run of warmup + steps steps (saves every steps // 2 and at the end), then a resume for
    3 more steps. `extra` adds config keys (e.g. to switch fast paths off)."""
    data_root = work / "data"
    if not (data_root / DATASET_NAME).exists():
        write_dataset(data_root, image_size)
    max_steps = warmup + steps
    save_steps = max(2, steps // 2)
    config = {"model_preset": preset, "tokenizer_path": tokenizer, "dtype": "bfloat16" if preset != "tiny" else "float32",
              "data_root_dir": str(data_root), "dataset_name": DATASET_NAME, "run_root_dir": str(work / "runs"),
              "run_id": "e2e", "batch_size": batch_size, "num_workers": workers, "lora_rank": 32, "max_steps": max_steps,
              "save_steps": save_steps, "progress_bar": False, "force": True, "resume": "auto", **(extra or {})}
    started = time.perf_counter()
    fresh = _launch(config, work, "fresh", timeout, 1)
    out: dict = {"config": {k: v for k, v in config.items() if k not in ("data_root_dir", "run_root_dir")},
                 "fresh_returncode": fresh["returncode"], "fresh_wall_s": fresh["wall_s"],
                 "fresh_time_to_first_step_line_s": fresh["first_step_line_s"]}
    rows = fresh.pop("metrics")
    if fresh["returncode"] != 0:
        out["fresh_log_tail"] = fresh["log_tail"]
    out.update(_step_stats(rows, warmup, batch_size, peak_tflops, flops))
    left = timeout - (time.perf_counter() - started)
    if fresh["returncode"] == 0 and left > 30:
        resumed = _launch({**config, "max_steps": max_steps + 3}, work, "resume", left, max_steps + 1)
        out["resume_returncode"] = resumed["returncode"]
        out["resume_wall_s"] = resumed["wall_s"]
        out["resume_time_to_first_step_line_s"] = resumed["first_step_line_s"]
        resumed_rows = [r for r in resumed["metrics"] if int(r["step"]) > max_steps]
        out["resume_first_step_time_s"] = resumed_rows[0].get(STEP_TIME_S) if resumed_rows else None
        if resumed["returncode"] != 0:
            out["resume_log_tail"] = resumed["log_tail"]
    return out


def _step_stats(rows: list[dict], warmup: int, batch_size: int, peak_tflops: float | None, flops: float | None) -> dict:
    measured = [r for r in rows if int(r["step"]) > warmup and STEP_TIME_S in r]
    out: dict = {"logged_steps": len(rows), "measured_steps": len(measured)}
    if rows:
        out["first_step_time_s"] = rows[0].get(STEP_TIME_S)
    saves = [r for r in rows if CKPT_BLOCKING_S in r]
    out["ckpt_blocking_s"] = [round(r[CKPT_BLOCKING_S], 4) for r in saves]
    after = {int(r["step"]) + k for r in saves for k in range(0, 3)}  # the steps the background write overlaps
    out["step_time_s_overlapping_saves"] = [round(r[STEP_TIME_S], 4) for r in rows if int(r["step"]) in after]
    for key in (GPU_PEAK_ALLOC, GPU_PEAK_RESERVED, HOST_PEAK_RSS):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = max(values)
    if measured:
        median = statistics.median(r[STEP_TIME_S] for r in measured)
        out.update({"s_per_step_median": round(median, 4), "samples_per_s": round(batch_size / median, 2)})
        clean = [r[STEP_TIME_S] for r in measured if int(r["step"]) not in after]
        if clean:
            out["s_per_step_median_no_save_nearby"] = round(statistics.median(clean), 4)
        waits = [r[DATA_WAIT_S] for r in measured if DATA_WAIT_S in r]
        if waits:  # the host's wait for the data loader: a data-bound run waits for much of each step
            out["data_wait_s_median"] = round(statistics.median(waits), 4)
        if flops:
            out["tflops_per_s"] = round(flops / median / 1e12, 1)
            if peak_tflops:
                out["mfu"] = round(flops / median / (peak_tflops * 1e12), 4)
    return out


def dump(obj: dict) -> str:
    return json.dumps(obj, indent=1)
