"""Blocking time of one LoRA checkpoint save: steadyvla vs the reference loop, same process.

Reference ("baseline"): what the users' OpenVLA fork does at each save — PEFT `save_pretrained`
of the adapter, then `torch.save` of the optimizer state, both on the training thread.
steadyvla: snapshot to (pinned) host memory on the training thread, then write safetensors +
JSON + sha256 manifest atomically on a background thread. We report the time the training thread
is blocked, and the background write time, as medians over --repeats saves.

    PYTHONPATH=src python bench/checkpoint_save.py --preset tiny --lora-rank 32
    PYTHONPATH=src python bench/checkpoint_save.py --preset openvla-7b --lora-rank 32   # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from steadyvla.config import build_config
from steadyvla.data.sampler import DataPosition
from steadyvla.model.build import wrap_lora
from steadyvla.model.presets import get_preset
from steadyvla.model.vla import VLA
from steadyvla.train.checkpointing import TrainerCheckpointer, TrainState
from steadyvla.train.optim import build_optimizer, build_scheduler


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_state(preset: str, rank: int, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = build_config({"model_preset": preset, "lora_rank": rank, "dtype": str(dtype).split(".")[1],
                        "run_root_dir": "unused", "progress_bar": False})
    torch.manual_seed(0)
    with torch.device(device):
        vocab, pad = (32001, 32000) if preset == "openvla-7b" else (706, 705)
        vla = VLA(get_preset(preset), vocab_size=vocab, pad_token_id=pad)
    model = wrap_lora(vla.to(dtype), cfg)
    optimizer = build_optimizer(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # populate exp_avg / exp_avg_sq
    return cfg, TrainState(model, optimizer, build_scheduler(optimizer, cfg), DataPosition(), global_step=1)


def bench(preset: str, rank: int, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, state = build_state(preset, rank, device)
    adapter_bytes = sum(p.numel() * p.element_size() for p in state.model.parameters() if p.requires_grad)
    baseline, blocking, background = [], [], []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for i in range(repeats):
            out = Path(tmp) / f"baseline-{i}"
            _sync()
            t0 = time.perf_counter()
            state.model.save_pretrained(str(out))
            torch.save(state.optimizer.state_dict(), out / "trainer_state.pt")
            baseline.append(time.perf_counter() - t0)

        ckpt = TrainerCheckpointer(Path(tmp) / "run", cfg, log=lambda m: None)
        for i in range(repeats):
            state.global_step = i + 1
            _sync()
            t0 = time.perf_counter()
            ckpt.save(state)  # returns once the snapshot is taken
            t1 = time.perf_counter()
            ckpt.wait()
            blocking.append(t1 - t0)
            background.append(time.perf_counter() - t1)
    med = statistics.median
    return {
        "preset": preset, "lora_rank": rank, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "adapter_MB": round(adapter_bytes / 2**20, 1), "repeats": repeats,
        "baseline_blocking_s": round(med(baseline), 4),
        "steadyvla_blocking_s": round(med(blocking), 4),
        "steadyvla_background_write_s": round(med(background), 4),
        "blocking_ratio_baseline_over_steadyvla": round(med(baseline) / med(blocking), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "openvla-7b"])
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(bench(args.preset, args.lora_rank, args.repeats), indent=1))


if __name__ == "__main__":
    main()
