"""LoRA fine-tuning throughput for one model shape, all arms in one invocation (issue 14).

Arms (run in this order, each guarded: a failing arm records its error and the rest still run;
the JSON is rewritten after every arm):

  ref_eager        OpenVLA-style reference loop (HF + PEFT: full-sequence logits + CE, backward,
                   AdamW, loss.item() per step) on a fixed batch, eager
  ref_compiled     the same, every transformer block torch.compile'd (regional)
  step_fast        steadyvla's per-step code (train/step.py) with the fast-path defaults of the device
                   (on CUDA: compiled blocks replayed as CUDA graphs)
  finetune_e2e     `steadyvla finetune` subprocess on a synthetic LeRobot v3 dataset (num_workers,
                   saves every steps // 2 + at the end), then a resume: time to first step
  step_plain       steadyvla's step with every fast path off
  step_labels_only / step_fused_only / step_compile_only   one fast path on at a time
  step_no_cudagraphs        step_fast with `compile_mode: default` (compiled blocks, no CUDA graphs)
  step_max_autotune         step_fast with `compile_mode: max-autotune` (kernel search; long compile)
  finetune_e2e_no_cudagraphs   finetune_e2e with `compile_mode: default`

`--profile` (default on) adds 3 profiled steps to ref_eager and step_fast and prints the top ops
by self device time (torch.profiler key_averages) and, on CUDA, the device timeline
(bench/timeline.py: busy share, kernel time by kind, idle gaps); both also go into the JSON.
All fixed-batch arms share one base model (LoRA is attached and removed per arm). FLOPs and MFU:
see bench/lora_step_arms.py. GPU (one call; the default budget keeps it under 8 minutes):

    PYTHONPATH=src python bench/lora_throughput.py --tokenizer .gpu/llama2-tokenizer --out $OUT/lora_throughput.json

CPU smoke test:

    PYTHONPATH=src python bench/lora_throughput.py --device cpu --preset tiny --steps 3 --warmup 1 \\
        --arms ref_eager,step_fast,step_plain,finetune_e2e --workers 0 --out /tmp/lt.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_e2e import run_e2e  # noqa: E402
from lora_step_arms import (  # noqa: E402
    fixed_batch, peak_memory, profile_table, reset_memory, run_reference, run_steadyvla_step, step_flops, summarise,
)
from steadyvla.config import build_config  # noqa: E402
from steadyvla.model.build import action_tokenizer_for, build_vla, load_tokenizer, model_spec, wrap_lora  # noqa: E402
from steadyvla.versions import library_versions  # noqa: E402

ALL_ARMS = ("ref_eager", "ref_compiled", "step_fast", "finetune_e2e", "step_plain", "step_lora_dtype_only",
            "step_labels_only", "step_fused_only", "step_compile_only", "step_no_cudagraphs", "finetune_e2e_no_cudagraphs",
            "step_max_autotune")
# the fast-path keys of each steadyvla step arm (None = the device's default)
_OFF = dict(logits_at_labels_only=False, compile_blocks=False, fused_optimizer=False, lora_in_model_dtype=False)
STEP_ARMS = {
    "step_fast": dict(logits_at_labels_only=True, compile_blocks=None, fused_optimizer=None, lora_in_model_dtype=True),
    "step_plain": _OFF,
    "step_lora_dtype_only": {**_OFF, "lora_in_model_dtype": True},
    "step_labels_only": {**_OFF, "logits_at_labels_only": True},
    "step_fused_only": {**_OFF, "fused_optimizer": True},
    "step_compile_only": {**_OFF, "compile_blocks": True},
    "step_no_cudagraphs": dict(logits_at_labels_only=True, compile_blocks=True, compile_mode="default",
                               fused_optimizer=None, lora_in_model_dtype=True),
    "step_max_autotune": dict(logits_at_labels_only=True, compile_blocks=True, compile_mode="max-autotune",
                              fused_optimizer=None, lora_in_model_dtype=True),
}
# steadyvla finetune end to end: the defaults, and without CUDA graphs per block
E2E_ARMS = {"finetune_e2e": {}, "finetune_e2e_no_cudagraphs": {"compile_mode": "default"}}
# rough seconds an arm needs on an H100 for the 7B (compile arms: inductor's cache helps the later ones)
ESTIMATE_S = {"ref_eager": 30, "ref_compiled": 90, "step_fast": 50, "step_plain": 25,
              "finetune_e2e": 150, "step_lora_dtype_only": 25, "step_labels_only": 25, "step_fused_only": 25, "step_compile_only": 45,
              "step_no_cudagraphs": 50, "finetune_e2e_no_cudagraphs": 150, "step_max_autotune": 300}
PROFILED_ARMS = ("ref_eager", "step_fast")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 spec sheets


def _peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class Bench:
    """Holds the shared base model and the results; runs arms one by one."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.started = time.perf_counter()
        self.cfg = build_config({
            "model_preset": args.preset, "tokenizer_path": args.tokenizer, "lora_rank": args.lora_rank,
            "dtype": "bfloat16" if self.device.type == "cuda" else "float32", "batch_size": args.batch_size,
            "learning_rate": 2e-5 if args.preset != "tiny" else 1e-3, "max_steps": 10_000})
        self.tokenizer = load_tokenizer(self.cfg)
        self.action_tokenizer = action_tokenizer_for(self.tokenizer, model_spec(self.cfg, self.tokenizer))
        self.base = None
        self.flops: float | None = None
        self.peak = _peak_tflops(self.device, args.peak_tflops)
        self.out: dict = {"args": vars(args), "versions": library_versions(), "arms": {}, "profiles": {},
                          "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                          "peak_bf16_tflops": self.peak}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.out["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(json.dumps(self.out, indent=1, default=str))

    def base_model(self):
        if self.base is None:
            t0 = time.perf_counter()
            self.base = build_vla(self.cfg, self.tokenizer, self.device)
            self.out.setdefault("build_s", round(time.perf_counter() - t0, 2))
            self.batch = fixed_batch(self.tokenizer, self.action_tokenizer, self.base.spec.image_size, self.args.batch_size)
            self.out["text_len"] = int(self.batch["input_ids"].shape[1])
        return self.base

    def lora(self, cfg=None):
        model = wrap_lora(self.base_model(), cfg or self.cfg)
        if self.flops is None:
            self.flops = step_flops(model, self.args.batch_size, self.out["text_len"])
            self.out["flops_per_step"] = self.flops
            self.out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model

    def drop_lora(self, model) -> None:
        self.base = model.unload()  # the base modules back, without adapters
        self.base.text_logits_only = False
        reset_memory(self.device)

    def free_base(self) -> None:
        self.base = None
        reset_memory(self.device)

    def run_arm(self, name: str) -> None:
        if self.left() < ESTIMATE_S.get(name, 30) * self.args.estimate_scale:
            self.out["arms"][name] = {"skipped": f"budget: {self.left():.0f}s left"}
            print(f"[bench] {name}: skipped (budget)", flush=True)
            return
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        # a hard stop at the budget plus a grace period: an arm that overruns (a slow compile) is
        # cut off and recorded, and the results so far are already on disk
        signal.alarm(max(5, int(self.left() + self.args.grace_s)))
        try:
            kind = "step" if name in STEP_ARMS else "finetune_e2e" if name in E2E_ARMS else name
            result = getattr(self, f"_arm_{kind}")(name)
        except Exception as err:  # noqa: BLE001 - one failing arm must not lose the others
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            signal.alarm(0)
        result["arm_wall_s"] = round(time.perf_counter() - t0, 1)
        self.out["arms"][name] = result
        self.save()
        print(f"[bench] {name}: {json.dumps({k: v for k, v in result.items() if k != 'traceback'})}", flush=True)

    def _profiler(self, name: str):
        """The profile callback for arm `name` (None when not profiled): prints and stores the table."""
        if not self.args.profile or name not in PROFILED_ARMS:
            return None

        def profile(one_step) -> None:
            table, timeline = profile_table(one_step, self.device)
            self.out["profiles"][name] = table
            self.out.setdefault("timelines", {})[name] = timeline
            print(f"[bench] profile of {name} (3 steps, top ops by self device time):\n{table}", flush=True)

        return profile

    def _arm_ref_eager(self, name: str, compiled: bool = False) -> dict:
        model = self.lora()
        reset_memory(self.device)
        try:
            times, first = run_reference(model, self.cfg, self.batch, self.device, compiled=compiled,
                                         warmup=self.args.warmup, steps=self.args.steps, profile=self._profiler(name))
            return {**summarise(times, first, self.args.batch_size, self.flops, self.peak), **peak_memory(self.device)}
        finally:
            self.drop_lora(model)

    def _arm_ref_compiled(self, name: str) -> dict:
        return self._arm_ref_eager(name, compiled=True)

    def _arm_step(self, name: str) -> dict:
        cfg = dataclasses.replace(self.cfg, **STEP_ARMS[name])
        model = self.lora(cfg)
        reset_memory(self.device)
        try:
            times, first = run_steadyvla_step(model, cfg, self.batch, self.device, self.action_tokenizer,
                                              warmup=self.args.warmup, steps=self.args.steps,
                                              profile=self._profiler(name))
            return {"keys": STEP_ARMS[name], **summarise(times, first, self.args.batch_size, self.flops, self.peak),
                    **peak_memory(self.device)}
        finally:
            self.drop_lora(model)

    def _arm_finetune_e2e(self, name: str) -> dict:
        self.base_model()  # the FLOP count needs the model once
        if self.flops is None:
            self.drop_lora(self.lora())
        self.free_base()  # the subprocess needs the GPU memory
        work = Path(self.args.work_dir or tempfile.mkdtemp(prefix="lora_e2e_")) / name
        work.mkdir(parents=True, exist_ok=True)
        timeout = max(60.0, min(self.args.e2e_timeout_s, self.left() - 20))
        return run_e2e(work, self.args.preset, self.args.tokenizer, self.args.batch_size, self.args.workers,
                       self.args.image_size, self.args.warmup, self.args.steps, timeout, self.peak, self.flops,
                       extra=E2E_ARMS[name])


class BudgetExceeded(Exception):
    """Raised by SIGALRM when an arm runs past the budget's grace period."""


def _on_alarm(_signum, _frame) -> None:
    raise BudgetExceeded("the arm ran past --budget-s + --grace-s and was stopped")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="openvla-7b", choices=["tiny", "openvla-7b"])
    p.add_argument("--tokenizer", default=None, help="Llama-2 tokenizer dir (required except for --preset tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arms", default=",".join(ALL_ARMS), help=f"comma-separated, run in this order: {','.join(ALL_ARMS)}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="measured steps per arm (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per arm (the first one compiles)")
    p.add_argument("--workers", type=int, default=8, help="num_workers of the end-to-end run")
    p.add_argument("--image-size", type=int, default=224, help="frame size of the end-to-end run's dataset")
    p.add_argument("--budget-s", type=float, default=420.0, help="arms that would not fit in what is left are skipped")
    p.add_argument("--grace-s", type=float, default=40.0, help="an arm still running this long after the budget is stopped")
    p.add_argument("--estimate-scale", type=float, default=1.0, help="scale of the per-arm time estimates (0 = run all)")
    p.add_argument("--e2e-timeout-s", type=float, default=260.0)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--work-dir", default=None, help="end-to-end run's data and run dir (default: a temp dir)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="profile 3 extra steps of ref_eager and step_fast (top ops table)")
    p.add_argument("--out", default="lora_throughput.json")
    args = p.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ALL_ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; valid: {', '.join(ALL_ARMS)}")
    if args.preset != "tiny" and not args.tokenizer:
        p.error("--tokenizer: required for --preset openvla-7b (a Llama-2 tokenizer dir)")
    if args.tokenizer:  # absolute: the end-to-end run starts in its own work dir
        args.tokenizer = str(Path(args.tokenizer).resolve())
        if not Path(args.tokenizer).is_dir():
            p.error(f"--tokenizer: {args.tokenizer} is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGALRM, _on_alarm)
    bench = Bench(args)
    bench.save()
    for name in args.arms.split(","):
        bench.run_arm(name)
    bench.save()
    summary = {name: {k: r.get(k) for k in ("s_per_step_median", "samples_per_s", "mfu", "peak_alloc_gib",
                                            "first_step_s", "gpu_peak_alloc_gib", "ckpt_blocking_s",
                                            "resume_time_to_first_step_line_s", "error", "skipped") if k in r}
               for name, r in bench.out["arms"].items()}
    print("[bench] summary:", json.dumps(summary, indent=1), flush=True)
    print(f"[bench] full results: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
