"""Training-thread cost of a LoRA save's snapshot at a preset's tensor count: per-tensor copies vs
the reserved flat buffers (checkpoint/flat_staging.py), same process, same state.

What a save blocks for is mostly per-tensor work: the 7B's adapter is 431 LoRA layers, i.e. 862
matrices plus AdamW's step, exp_avg and exp_avg_sq each. This bench builds the preset on the meta
device only to count its LoRA layers, then trains a stand-in with that many small LoRA layers (so
the bytes are negligible and the per-tensor overhead is what is timed) for one AdamW step, and
times `take_snapshot` both ways. On CPU the copies are synchronous memcpys; on a GPU they are
asynchronous launches, so this is the host-side part of `ckpt_blocking_s`.

    PYTHONPATH=src python bench/snapshot_overhead.py --preset openvla-7b --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from steadyvla.config import build_config
from steadyvla.data.sampler import DataPosition
from steadyvla.memory_estimate import model_spec_for
from steadyvla.model.build import lora_config
from steadyvla.model.vla import VLA
from steadyvla.train.checkpointing import TrainState, adapter_views, snapshot_staging, take_snapshot
from steadyvla.train.optim import build_optimizer, build_scheduler


def lora_layer_count(preset: str, rank: int) -> int:
    """How many LoRA layers `preset` gets (counted on the meta device: no memory)."""
    cfg = build_config({"model_preset": preset, "lora_rank": rank})
    with torch.device("meta"):
        model = get_peft_model(VLA(model_spec_for(cfg)), lora_config(cfg))
    return sum(1 for m in model.modules() if isinstance(m, LoraLayer))


def stand_in_state(layers: int, device: torch.device) -> tuple[TrainState, object]:
    """A model of `layers` small LoRA'd linear layers after one AdamW step (fused on CUDA)."""
    body = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(layers)]).to(device)
    model = get_peft_model(body, LoraConfig(r=8, target_modules=[str(i) for i in range(layers)]))
    cfg = build_config({"model_preset": "tiny", "progress_bar": False, "fused_optimizer": device.type == "cuda"})
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    return TrainState(model, optimizer, build_scheduler(optimizer, cfg), DataPosition(), global_step=1), cfg


def timed_snapshots(state: TrainState, cfg, repeats: int, **kwargs) -> list[float]:
    """Seconds `take_snapshot` holds the calling thread, per call (the copies are waited for after
    the timing, as the writer thread would)."""
    times = []
    for i in range(repeats + 3):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        snapshot = take_snapshot(state, cfg, **kwargs)
        elapsed = time.perf_counter() - t0
        if snapshot.copies is not None:
            snapshot.copies.wait()
        if i >= 3:  # the first calls allocate the per-tensor path's pinned buffers
            times.append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="openvla-7b", choices=["tiny", "openvla-7b", "vla-1b"])
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    layers = lora_layer_count(args.preset, args.lora_rank)
    state, cfg = stand_in_state(layers, torch.device(args.device))
    view = adapter_views(state.model)
    per_tensor = timed_snapshots(state, cfg, args.repeats, adapter_view=view)
    staged = timed_snapshots(state, cfg, args.repeats, adapter_view=view, staging=snapshot_staging(state, view))
    med = statistics.median
    print(json.dumps({
        "preset": args.preset, "lora_layers": layers, "tensors_copied": 4 * 2 * layers, "device": args.device,
        "repeats": args.repeats, "per_tensor_ms": round(1000 * med(per_tensor), 2),
        "flat_staging_ms": round(1000 * med(staged), 2), "ratio": round(med(per_tensor) / med(staged), 2),
    }, indent=1))


if __name__ == "__main__":
    main()
