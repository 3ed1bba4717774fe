"""Preflight GPU estimate vs measured peak: openvla-7b shape (random init, bf16) at several micro-batches,
with and without activation checkpointing, with and without the method's probe forward.

Per case: reset the CUDA peak counters, run two LoRA steps (forward, backward, AdamW) on synthetic
inputs of the estimate's sequence length (num_patches + PROMPT_TOKENS), with the probe forward
(no grad, every hidden state) before each step for the method; report max_memory_allocated /
max_memory_reserved against `estimate_memory` (its device total includes the allocator reserve).

    PYTHONPATH=src python bench/memory_estimate.py --preset openvla-7b --batch-sizes 4 8 16   # GPU
    PYTHONPATH=src python bench/memory_estimate.py --preset tiny --batch-sizes 2 8            # smoke test
"""

from __future__ import annotations

import argparse
import json

import torch

from steadyvla.config import build_config
from steadyvla.memory_estimate import GIB, PROMPT_TOKENS, estimate_memory, model_shape, model_spec_for
from steadyvla.model.build import wrap_lora
from steadyvla.model.vla import VLA
from steadyvla.train.finetune import enable_activation_checkpointing
from steadyvla.train.optim import build_optimizer

ACTION_TOKENS = 8  # 7 actions + EOS carry labels


def _inputs(batch: int, vocab: int, image_size: int, device: torch.device, labels: bool = True) -> dict:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab - 300, (batch, PROMPT_TOKENS), generator=g)
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
               pixel_values=torch.randn(batch, 6, image_size, image_size, generator=g))
    if labels:
        targets = torch.full_like(ids, -100)
        targets[:, -ACTION_TOKENS:] = ids[:, -ACTION_TOKENS:]
        out["labels"] = targets
    return {k: v.to(device) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="openvla-7b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--probe-batch-size", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=32)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    base = dict(model_preset=args.preset, dtype=dtype, lora_rank=args.lora_rank, probe_batch_size=args.probe_batch_size,
                run_root_dir="unused", progress_bar=False)
    cfg = build_config(base)
    shape = model_shape(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        vla = VLA(model_spec_for(cfg))
    model = wrap_lora(vla.to(getattr(torch, dtype)), cfg)
    optimizer = build_optimizer(model, cfg)
    llm = model.get_base_model().language_model
    print("| micro-batch | act. ckpt | method | measured alloc GiB | measured reserved GiB | estimate GiB |")
    print("|---|---|---|---|---|---|")
    for checkpointing in (False, True):
        if checkpointing:
            enable_activation_checkpointing(llm)
        for method in (False, True):
            for batch in args.batch_sizes:
                case = build_config({**base, "batch_size": batch, "activation_checkpointing": checkpointing,
                                     "method_enabled": method})
                est = estimate_memory(case, shape, on_gpu=device.type == "cuda", baseline_bytes=0)
                try:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    for _ in range(2):
                        if method:
                            with torch.no_grad():
                                model.eval()
                                model(**_inputs(args.probe_batch_size, shape.vocab, shape.image_size, device,
                                                labels=False), output_hidden_states=True)
                                model.train()
                        model(**_inputs(batch, shape.vocab, shape.image_size, device)).loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    peaks = ((torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))
                             if device.type == "cuda" else (float("nan"), float("nan")))
                    measured = f"{peaks[0] / GIB:.1f} | {peaks[1] / GIB:.1f}"
                except torch.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    measured = "OOM | OOM"
                total = est.device_total if est.on_gpu else est.host_total
                print(f"| {batch} | {checkpointing} | {method} | {measured} | {total / GIB:.1f} |", flush=True)
                parts = {k: round(v / GIB, 3) for k, v in (est.device or est.host).items()}
                print(json.dumps({"batch": batch, "checkpointing": checkpointing, "method": method,
                                  "estimate": parts}), flush=True)


if __name__ == "__main__":
    main()
