"""OpenVLA checkpoint I/O at the real shape: load time + peak host RSS, predict latency, merge.

    PYTHONPATH=src python bench/openvla_io.py write --out /tmp/ov7b --tokenizer ../shared/reference/llama2-tokenizer
    PYTHONPATH=src python bench/openvla_io.py all --dir /tmp/ov7b            # GPU machine

`write` builds openvla-7b with random weights directly on the GPU and writes it in the exact
upstream layout (bf16, three shards). Every measurement then runs in a fresh child process so its
peak RSS (getrusage maxrss) is its own:

- `steadyvla`: `load_vla(dir, device="cuda")` (meta init, shards streamed onto the GPU);
- `naive`: the reference, what `from_pretrained` on the CPU then `.to("cuda")` does: the whole
  state dict read into host memory, the model materialised on the CPU, then moved;
- `predict`: median `predict_action` latency over --repeats calls (after one warm-up);
- `merge`: a random rank-32 LoRA adapter on every linear layer merged into the base on the CPU and
  the result written as an OpenVLA dir (what `steadyvla merge` does after reading the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


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
    return {"load_s": time.perf_counter() - start, "peak_rss_gib": _rss_gib()}


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
    return {"load_s": time.perf_counter() - start, "peak_rss_gib": _rss_gib()}


def cmd_predict(args: argparse.Namespace) -> dict:
    from steadyvla import load_vla, predict_action

    vla = load_vla(args.dir, device="cuda")
    image = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    predict_action(vla, image, "put the eggplant in the pot")
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        predict_action(vla, image, "put the eggplant in the pot")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"predict_median_s": statistics.median(times), "repeats": args.repeats}


def cmd_merge(args: argparse.Namespace) -> dict:
    from peft import get_peft_model

    from steadyvla.config import build_config
    from steadyvla.model.build import lora_config
    from steadyvla.model.openvla_load import load_weights, read_openvla_dir
    from steadyvla.model.openvla_save import write_openvla_dir

    start = time.perf_counter()
    src = read_openvla_dir(args.dir)
    base = load_weights(src, "cpu")
    model = get_peft_model(base, lora_config(build_config({"lora_rank": 32})))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    merged = model.merge_and_unload()
    with tempfile.TemporaryDirectory(dir=Path(args.dir).parent) as tmp:
        write_openvla_dir(Path(tmp) / "merged", src.spec, merged.state_dict(), None, src.norm_stats, dtype=None,
                          copy_from=[p for p in src.path.iterdir() if p.is_file() and "safetensors" not in p.name
                                     and p.name != "config.json"], config=src.config)
    return {"merge_s": time.perf_counter() - start, "peak_rss_gib": _rss_gib()}


MEASURES = {"steadyvla": cmd_steadyvla, "naive": cmd_naive, "predict": cmd_predict, "merge": cmd_merge}


def cmd_all(args: argparse.Namespace) -> dict:
    results = {}
    for name in MEASURES:
        out = subprocess.run([sys.executable, __file__, name, "--dir", args.dir, "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("verb", choices=["write", "all", *MEASURES])
    parser.add_argument("--dir", default=None, help="OpenVLA dir to measure")
    parser.add_argument("--out", default=None, help="`write`: directory to create")
    parser.add_argument("--tokenizer", default=None, help="`write`: Llama-2 tokenizer dir")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    verbs = {"write": cmd_write, "all": cmd_all, **MEASURES}
    print(json.dumps(verbs[args.verb](args)))


if __name__ == "__main__":
    main()
