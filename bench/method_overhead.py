"""Step time of the method (ICSM + HSW + Thermostat) vs the LoRA baseline, same process, same batch.

Both arms run the same training step (forward, backward, AdamW) on a fixed random batch; the
method arm adds the HSW hooks on the last 4 LLM layers and a Thermostat probe forward every
`--interval` steps (plus every step of its warmup, which we exclude: it runs once per run).
The arms alternate in windows of `--interval` steps (each method window holds exactly one probe
forward), so machine noise hits both; we report the median over rounds of each window's mean
step time, and the overhead.

    PYTHONPATH=src python bench/method_overhead.py --preset tiny --rounds 3
    PYTHONPATH=src python bench/method_overhead.py --preset openvla-7b --tokenizer-path DIR --rounds 3   # GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from steadyvla.config import build_config
from steadyvla.method.build_icsm import build_icsm
from steadyvla.method.artifacts import read_artifacts
from steadyvla.method.hook import MethodHook
from steadyvla.method.probe import ProbeSample, ProbeSet
from steadyvla.model.build import build_vla, load_tokenizer, wrap_lora
from steadyvla.model.prompt import IGNORE_INDEX, PromptBuilder
from steadyvla.train.optim import build_optimizer

INSTRUCTIONS = ["pick up the red block", "open the top drawer", "push the puck to the goal", "press the button"]


class _ProbeSource:
    """Random images with fixed instructions, as a FrameSource-like object for build_icsm."""

    def __init__(self, n: int, size: int):
        rng = np.random.default_rng(0)
        self.samples = [ProbeSample(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), INSTRUCTIONS[i % 4])
                        for i in range(n)]


def _batch(tok, cfg, vla, device, batch_size: int) -> dict[str, torch.Tensor]:
    builder = PromptBuilder(tok)
    g = torch.Generator().manual_seed(0)
    rows = [builder.build(INSTRUCTIONS[i % 4], torch.randint(tok.vocab_size - 256, tok.vocab_size, (7,), generator=g).numpy())
            for i in range(batch_size)]
    length = max(len(r.input_ids) for r in rows)
    ids = torch.full((batch_size, length), int(tok.pad_token_id))
    labels = torch.full((batch_size, length), IGNORE_INDEX)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)], labels[i, : len(r.labels)] = r.input_ids, r.labels
    size = vla.preset.image_size
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": (ids != tok.pad_token_id).long().to(device),
            "pixel_values": torch.randn(batch_size, 6, size, size, generator=g).to(device, vla.projector.fc1.weight.dtype)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Arm:
    """One model + optimizer (+ method hook) trained on a fixed batch; `run` times a window of steps."""

    def __init__(self, cfg, tok, device, batch_size: int, hook_factory=None):
        self.model = wrap_lora(build_vla(cfg, tok, device), cfg)
        self.optimizer = build_optimizer(self.model, cfg)
        self.hooks = [hook_factory(self.model)] if hook_factory else []
        self.batch = _batch(tok, cfg, self.model.get_base_model(), device, batch_size)
        self.step = 0

    def run(self, steps: int) -> float:
        """Mean seconds per step over `steps` steps."""
        _sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            for h in self.hooks:
                h.on_step_start(self.step)
            self.model(**self.batch).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            for h in self.hooks:
                h.on_step_end(self.step)
        _sync()
        return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "openvla-7b"])
    parser.add_argument("--tokenizer-path", default=None)
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows of --interval steps per arm")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--probe-batch-size", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        warm = 5
        cfg = build_config({
            "model_preset": args.preset, "tokenizer_path": args.tokenizer_path, "lora_rank": 32,
            "dtype": "bfloat16" if device.type == "cuda" else "float32", "run_root_dir": tmp,
            "icms_artifact_dir": str(Path(tmp) / "icsm"), "probe_size": 64, "icsm_rank": 32,
            "icsm_sensitivity_samples": 16, "thermostat_update_interval": args.interval,
            "thermostat_warmup_steps": warm, "probe_batch_size": args.probe_batch_size, "method_enabled": True})
        tok = load_tokenizer(cfg)
        source = _ProbeSource(cfg.probe_size, 224)
        probe = ProbeSet(source.samples, "bench random images")
        t0 = time.perf_counter()
        artifacts_dir = build_icsm(cfg, None, log=lambda m: None, probe=probe)
        icsm_s = time.perf_counter() - t0
        artifacts = read_artifacts(artifacts_dir)
        baseline = Arm(cfg, tok, device, args.batch_size)
        method = Arm(cfg, tok, device, args.batch_size, lambda model: MethodHook(cfg, model, tok, artifacts, probe, device))
        baseline.run(warm)
        method.run(warm)  # the Thermostat's warmup (a probe forward every step) happens once per run
        rounds = [(baseline.run(args.interval), method.run(args.interval)) for _ in range(args.rounds)]
        print("per-round (baseline, method) s/step:", [(round(b, 4), round(m, 4)) for b, m in rounds])
    base_s = float(np.median([b for b, _ in rounds]))
    method_s = float(np.median([m for _, m in rounds]))
    print(json.dumps({
        "preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "batch_size": args.batch_size, "rounds": args.rounds, "steps_per_round": args.interval,
        "thermostat_update_interval": args.interval,
        "probe_batch_size": args.probe_batch_size, "icsm_build_s": round(icsm_s, 2),
        "baseline_step_s_median": round(base_s, 4), "method_step_s_median": round(method_s, 4),
        "overhead_pct": round(100 * (method_s / base_s - 1), 1),
    }, indent=1))


if __name__ == "__main__":
    main()
