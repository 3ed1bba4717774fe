"""OpenVLA checkpoint I/O at the real shape: load time + peak host RSS, predict latency, merge.

    PYTHONPATH=src python bench/openvla_io.py write --out /tmp/ov7b --tokenizer ../shared/reference/llama2-tokenizer
    PYTHONPATH=src python bench/openvla_io.py all --dir /tmp/ov7b            # GPU machine

`write` builds openvla-7b with random weights directly on the GPU and writes it in the exact
upstream layout (bf16, three shards). Every measurement then runs in a fresh child process so its
peak RSS (VmHWM of the process alone) is its own:

- `steadyvla`: `load_vla(dir, device="cuda")` (meta init, shards streamed onto the GPU);
- `naive`: the reference, what `from_pretrained` on the CPU then `.to("cuda")` does: the whole
  state dict read into host memory, the model materialised on the CPU, then moved;
- `predict`: median `predict_action` latency over --repeats calls (after one warm-up), one image
  and a batch of 8;
- `finetune`: one step of `finetune --vla_path` (bf16, LoRA r=32) on a small synthetic dataset,
  which writes a real checkpoint;
- `merge`: `merge_checkpoint` (what `steadyvla merge` runs) of that checkpoint into the base on the
  CPU, written as a new OpenVLA dir.

The naive and steadyvla loads alternate for --rounds rounds (medians reported).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _rss_gib() -> float:
    from steadyvla.memory_runtime import peak_rss  # VmHWM: ru_maxrss would include the parent's size

    return peak_rss() / 1024**3


def _gpu_peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 1024**3


def cmd_write(args: argparse.Namespace) -> dict:
    from steadyvla.model.bundle import tokenizer_from_dir
    from steadyvla.model.openvla_save import write_openvla_dir
    from steadyvla.model.presets import get_preset
    from steadyvla.model.vla import VLA

    tok = tokenizer_from_dir(args.tokenizer)
    spec = get_preset("openvla-7b").spec(len(tok), int(tok.pad_token_id))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VLA(spec).to(torch.bfloat16)
    stats = {"bridge_orig": {"action": {"mask": [True] * 6 + [False], "q01": [-1.0] * 7, "q99": [1.0] * 7,
                                        "mean": [0.0] * 7, "std": [1.0] * 7, "min": [-1.0] * 7, "max": [1.0] * 7},
                             "num_transitions": 1, "num_trajectories": 1}}
    start = time.perf_counter()
    write_openvla_dir(args.out, spec, model.state_dict(), tok, stats)
    return {"write_s": time.perf_counter() - start}


def cmd_steadyvla(args: argparse.Namespace) -> dict:
    from steadyvla import load_vla

    start = time.perf_counter()
    load_vla(args.dir, device="cuda")
    torch.cuda.synchronize()
    return {"load_s": time.perf_counter() - start, "peak_rss_gib": _rss_gib(), "gpu_peak_gib": _gpu_peak_gib()}


def cmd_steadyvla_parts(args: argparse.Namespace) -> dict:
    """What `load_vla` spends its time on: the weights (meta build, header check, shard streaming)
    and the tokenizer (transformers builds the fast tokenizer from the files)."""
    from steadyvla.model.bundle import tokenizer_from_dir
    from steadyvla.model.openvla_load import load_weights, read_openvla_dir

    start = time.perf_counter()
    load_weights(read_openvla_dir(args.dir), "cuda")
    torch.cuda.synchronize()
    weights = time.perf_counter() - start
    tokenizer_from_dir(args.dir)
    return {"weights_s": weights, "tokenizer_s": time.perf_counter() - start - weights}


def cmd_naive(args: argparse.Namespace) -> dict:
    from safetensors.torch import load_file

    from steadyvla.model.openvla_keys import from_openvla_key
    from steadyvla.model.openvla_load import build_empty, read_openvla_dir

    start = time.perf_counter()
    src = read_openvla_dir(args.dir)
    state = {}
    for shard in src.shard_files:
        state.update({from_openvla_key(k): v for k, v in load_file(str(src.path / shard)).items()})
    model = build_empty(src.spec)
    model.load_state_dict(state, assign=True)
    model.to("cuda")
    torch.cuda.synchronize()
    return {"load_s": time.perf_counter() - start, "peak_rss_gib": _rss_gib(), "gpu_peak_gib": _gpu_peak_gib()}


def cmd_predict(args: argparse.Namespace) -> dict:
    from steadyvla import load_vla, predict_action

    vla = load_vla(args.dir, device="cuda")
    rng = np.random.default_rng(0)
    images = [(rng.random((256, 256, 3)) * 255).astype(np.uint8) for _ in range(8)]
    out = {}
    for name, batch in (("single", images[0]), ("batch8", images)):
        predict_action(vla, batch, "put the eggplant in the pot")
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            predict_action(vla, batch, "put the eggplant in the pot")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[f"predict_{name}_median_s"] = statistics.median(times)
    out["repeats"] = args.repeats
    return out


def cmd_finetune(args: argparse.Namespace) -> dict:
    """One LoRA step of `steadyvla finetune --vla_path` (bf16, r=32) on a small synthetic dataset,
    so that `merge` has a real checkpoint to merge."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from synthetic import write_synthetic_dataset

    from steadyvla.config import build_config
    from steadyvla.train.finetune import finetune

    work = Path(args.dir).parent
    for stale in (work / "runs" / "bench", work / "merged"):  # a re-run measures a fresh run and merge
        shutil.rmtree(stale, ignore_errors=True)
    if not (work / "data" / "synth").exists():
        write_synthetic_dataset(work / "data" / "synth")
    cfg = build_config({"vla_path": args.dir, "dtype": "bfloat16", "data_root_dir": str(work / "data"),
                        "dataset_name": "synth", "run_root_dir": str(work / "runs"), "run_id": "bench",
                        "batch_size": 2, "max_steps": 1, "save_steps": 1, "lora_rank": 32,
                        "progress_bar": False})
    start = time.perf_counter()
    finetune(cfg, log=lambda _m: None)
    return {"finetune_1_step_s": time.perf_counter() - start, "run_dir": str(work / "runs" / "bench")}


def cmd_merge(args: argparse.Namespace) -> dict:
    """`steadyvla merge` of the run that `finetune` wrote, into a new OpenVLA dir (CPU)."""
    from steadyvla.model.merge import merge_checkpoint

    work = Path(args.dir).parent
    start = time.perf_counter()
    merge_checkpoint(work / "runs" / "bench", work / "merged", log=lambda _m: None)
    return {"merge_s": time.perf_counter() - start, "peak_rss_gib": _rss_gib()}


MEASURES = {"steadyvla": cmd_steadyvla, "steadyvla_parts": cmd_steadyvla_parts, "naive": cmd_naive, "predict": cmd_predict, "finetune": cmd_finetune,
            "merge": cmd_merge}


def _child(name: str, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, __file__, name, "--dir", args.dir, "--repeats", str(args.repeats)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    result = {"measure": name, **json.loads(out.stdout.strip().splitlines()[-1])}
    print(json.dumps(result), flush=True)
    return result


def cmd_all(args: argparse.Namespace) -> dict:
    """The two load arms alternate --rounds times (each in a fresh process), then predict,
    finetune and merge once; every result is printed as it comes."""
    rows = []
    for _ in range(args.rounds):
        rows += [_child("naive", args), _child("steadyvla", args), _child("steadyvla_parts", args)]
    summary = {}
    for arm in ("naive", "steadyvla"):
        mine = [r for r in rows if r["measure"] == arm]
        summary[arm] = {"load_median_s": statistics.median(r["load_s"] for r in mine),
                        "peak_rss_gib_max": max(r["peak_rss_gib"] for r in mine)}
    print(json.dumps({"summary": summary}), flush=True)
    for name in ("predict", "finetune", "merge"):
        summary[name] = _child(name, args)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("verb", choices=["write", "all", *MEASURES])
    parser.add_argument("--dir", default=None, help="OpenVLA dir to measure")
    parser.add_argument("--out", default=None, help="`write`: directory to create")
    parser.add_argument("--tokenizer", default=None, help="`write`: Llama-2 tokenizer dir")
    parser.add_argument("--repeats", type=int, default=10, help="predict_action calls timed per batch size")
    parser.add_argument("--rounds", type=int, default=3, help="`all`: alternating rounds of the two load arms")
    args = parser.parse_args()
    verbs = {"write": cmd_write, "all": cmd_all, **MEASURES}
    print(json.dumps(verbs[args.verb](args)))


if __name__ == "__main__":
    main()
