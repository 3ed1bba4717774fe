"""Where a random-init preset's base weights were drawn, so that merge and eval rebuild the same base.

A LoRA checkpoint of a preset holds only the adapter; the frozen base is rebuilt from the run's
seed. The CPU and CUDA generators draw different numbers from the same seed, so a base initialised
on the GPU (where `finetune` builds it) and rebuilt on the CPU (where `merge` works) is another
network, and the adapter, applied to it, no longer computes what training learned. Training records
the device type in the checkpoint's run inputs; rebuilding draws on that device type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from steadyvla.config import ConfigError

BASE_INIT_KEY = "base_init_device"  # key in trainer_state.json's "inputs": "cpu" or "cuda"


def base_init_device(state: dict[str, Any], ckpt: Path, flag: str = "--checkpoint") -> str:
    """The device type to rebuild checkpoint `ckpt`'s preset base on (from its trainer state
    `state`); "cpu" for checkpoints that predate the record. A device type this machine lacks is
    a ConfigError naming `flag`, the checkpoint and what to do."""
    device = state.get("inputs", {}).get(BASE_INIT_KEY, "cpu")
    available = device == "cpu" or (device == "cuda" and torch.cuda.is_available())
    if not available:
        raise ConfigError(
            f"{flag}: {ckpt} adapts a random-init preset whose base was drawn on {device!r} from the run's "
            f"seed; it can only be rebuilt on a {device!r} device (CPU and {device} generators draw different "
            f"numbers from one seed), and this machine has none. Run this on a machine with {device}")
    return device
