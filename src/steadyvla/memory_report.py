"""Memory preflight: will this run fit? The table, the verdict, and the knobs that would make it fit.

Run by `finetune` before anything is written, by `steadyvla doctor`, and alone as
`steadyvla memory --config ...`. A run that will not fit stops with exit status 2 unless
`force: true`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from steadyvla.config import ConfigError, RunConfig
from steadyvla.memory_estimate import GIB, MemoryEstimate, ModelShape, estimate_memory, model_shape, with_changes
from steadyvla.memory_runtime import HostMemory, device_free, host_memory, host_rss

FORCE_HINT = "`--force true` starts anyway"


class MemoryWillNotFit(ConfigError):
    """The preflight estimate exceeds what the device or the host has; the message has the numbers."""


def measure_baseline() -> int:
    """Resident bytes of this process once the training stack is imported: the interpreter, torch,
    transformers, timm, peft, TensorBoard (all imported by a run anyway, so this costs nothing)."""
    import peft  # noqa: F401
    import timm  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers  # noqa: F401

    import steadyvla.train.finetune  # noqa: F401
    return host_rss(include_children=False)


@dataclass
class Preflight:
    """The estimate, what the machine has, and the verdict."""

    estimate: MemoryEstimate
    host: HostMemory
    host_resident: int  # already resident in this process (part of the estimate's baseline)
    gpu: tuple[int, int] | None  # (free, total) of the device
    problems: list[str] = field(default_factory=list)
    knobs: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: the estimated peaks against what is available."""
        gpu = (f"GPU {self.estimate.device_total / GIB:.2f} of {self.gpu[0] / GIB:.1f} GiB free, "
               if self.gpu is not None else "")
        return f"{gpu}host {self.estimate.host_total / GIB:.2f} GiB estimated peak, {self.host.describe()}"

    def table(self) -> str:
        """Per-component estimate and the totals against what is available."""
        lines = []
        for title, parts, total in (("GPU (per rank)", self.estimate.device, self.estimate.device_total),
                                    ("host", self.estimate.host, self.estimate.host_total)):
            if not parts:
                continue
            lines.append(f"{title}:")
            lines += [f"  {name:<42} {value / GIB:9.3f} GiB" for name, value in parts.items() if value]
            lines.append(f"  {'estimated peak':<42} {total / GIB:9.3f} GiB")
        if self.gpu is not None:
            lines.append(f"GPU: {self.gpu[0] / GIB:.1f} GiB free of {self.gpu[1] / GIB:.1f} GiB")
        lines.append(f"host: {self.host.describe()}; {self.host_resident / GIB:.2f} GiB already resident")
        return "\n".join(lines)


def _problems(est: MemoryEstimate, host: HostMemory, resident: int, gpu: tuple[int, int] | None) -> list[str]:
    problems = []
    if gpu is not None and est.device_total > gpu[0]:
        problems.append(f"GPU: needs {est.device_total / GIB:.1f} GiB per rank, {gpu[0] / GIB:.1f} GiB free")
    if est.host_total - resident > host.available:
        problems.append(f"host: needs {est.host_total / GIB:.1f} GiB, {resident / GIB:.1f} GiB resident + "
                        f"{host.describe()}")
    return problems


def _knobs(cfg: RunConfig, fits: Callable[[RunConfig], bool]) -> list[str]:
    """Single changes that make the run fit, the global batch kept where the batch changes."""
    knobs = []
    global_micro = cfg.batch_size * cfg.grad_accumulation_steps
    for smaller in range(cfg.batch_size - 1, 0, -1):
        if cfg.batch_size % smaller:
            continue
        accum = global_micro // smaller
        if fits(with_changes(cfg, batch_size=smaller, grad_accumulation_steps=accum)):
            knobs.append(f"--batch_size {smaller} --grad_accumulation_steps {accum} (same global batch "
                         f"{global_micro}; a new run: both are resume-critical)")
            break
    if not cfg.activation_checkpointing and fits(with_changes(cfg, activation_checkpointing=True)):
        knobs.append("--activation_checkpointing true (recomputes LLM activations in backward, ~30% slower steps)")
    if cfg.num_workers:
        for workers in range(cfg.num_workers - 1, -1, -1):
            if fits(with_changes(cfg, num_workers=workers)):
                knobs.append(f"--num_workers {workers}")
                break
    if cfg.method_enabled:
        for probe in range(cfg.probe_batch_size - 1, 0, -1):
            if fits(with_changes(cfg, probe_batch_size=probe)):
                knobs.append(f"--probe_batch_size {probe} (a new run: resume-critical)")
                break
    if not knobs and fits(with_changes(cfg, batch_size=1, grad_accumulation_steps=global_micro,
                                       activation_checkpointing=True, num_workers=0, probe_batch_size=1)):
        knobs.append(f"--batch_size 1 --grad_accumulation_steps {global_micro} --activation_checkpointing true "
                     "--num_workers 0 --probe_batch_size 1 together")
    return knobs or ["none of batch_size, activation_checkpointing, num_workers, probe_batch_size is enough: "
                     "use a device/host with more memory"]


def run_preflight(cfg: RunConfig, device: torch.device, *, world_size: int = 1, shape: ModelShape | None = None,
                  icsm_built: bool = True) -> Preflight:
    """Estimate, compare with the device and host, and find the knobs when it does not fit."""
    shape = shape or model_shape(cfg)
    on_gpu = device.type == "cuda"
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    baseline = measure_baseline()
    host, gpu = host_memory(), device_free(device)

    def estimate(c: RunConfig) -> MemoryEstimate:
        fsdp = not c.use_lora and c.strategy == "fsdp"  # full training shards model state over its ranks
        return estimate_memory(c, shape, on_gpu=on_gpu, baseline_bytes=baseline, world_size=local_ranks, fsdp=fsdp,
                               shards=max(1, world_size // max(1, c.hsdp_replicate_degree)), icsm_built=icsm_built)

    est = estimate(cfg)
    resident = host_rss(include_children=False)
    report = Preflight(est, host, resident, gpu, _problems(est, host, resident, gpu))
    if not report.fits:
        report.knobs = _knobs(cfg, lambda c: not _problems(estimate(c), host, resident, gpu))
    return report


def enforce(report: Preflight, cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Stop before training (MemoryWillNotFit: exit 2) when the run will not fit, unless `force`."""
    if report.fits:
        log(f"memory preflight: fits: {report.summary()}")
        return
    text = (f"memory preflight: this run will not fit: {'; '.join(report.problems)}\n{report.table()}\n"
            "would fit (each alone):\n" + "\n".join(f"  {k}" for k in report.knobs))
    if cfg.force:
        log(f"{text}\nforce: true: starting anyway")
        return
    raise MemoryWillNotFit(f"{text}\n{FORCE_HINT}")


def device_for_preflight() -> torch.device:
    """The device a run started now would train on (this rank's GPU under torchrun, else GPU 0)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def preflight_for(cfg: RunConfig, device: torch.device | None = None, world_size: int | None = None) -> Preflight:
    """The preflight of `cfg` on this machine: inside a run (its device and world size) or outside
    one (`steadyvla memory`, doctor: the device a start would use)."""
    icsm_built = True
    if cfg.method_enabled:  # building the artifacts on first use holds a teacher model too
        from steadyvla.method.build_icsm import artifact_dir

        icsm_built = artifact_dir(cfg).exists()
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    return run_preflight(cfg, device or device_for_preflight(), world_size=world_size, icsm_built=icsm_built)


def print_preflight(cfg: RunConfig) -> int:
    """`steadyvla memory`: print the table and the verdict; exit status 2 when it will not fit."""
    report = preflight_for(cfg)
    print(report.table())
    if report.fits:
        print("fits")
        return 0
    print("will NOT fit: " + "; ".join(report.problems))
    print("would fit (each alone):\n" + "\n".join(f"  {k}" for k in report.knobs))
    print(FORCE_HINT if not cfg.force else "force: true: a start would go ahead anyway")
    return 2
