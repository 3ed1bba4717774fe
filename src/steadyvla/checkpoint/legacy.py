"""Artifacts of the users' old PEFT scripts: adapter directories and `trainer_state.pt` files.

An old adapter dir (adapter_config.json + adapter_model.safetensors, or adapter_model.bin) has
LoRA weights under the same module names as steadyvla's VLA, so it can seed a run's adapter.
`.bin` and `.pt` files are read with `torch.load(weights_only=True)` only: anything that needs
arbitrary unpickling is refused and reported, never executed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from steadyvla.checkpoint.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINTS_DIR, TRAINER_STATE_JSON
from steadyvla.config import ConfigError, RunConfig

LEGACY_ADAPTER_BIN = "adapter_model.bin"
LEGACY_TRAINER_STATE = "trainer_state.pt"


def is_legacy_adapter_dir(path: Path) -> bool:
    """A PEFT adapter dir that is not a steadyvla checkpoint (no trainer_state.json) or run dir."""
    return ((path / ADAPTER_CONFIG).is_file() and not (path / TRAINER_STATE_JSON).exists()
            and not (path / CHECKPOINTS_DIR).exists())


def safe_torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`; content it refuses becomes a ConfigError naming the file and
    what was refused (the file is never unpickled in full)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise ConfigError(f"{path}: unreadable as a torch file ({err})") from err
    except Exception as err:  # noqa: BLE001 - the weights-only loader's UnpicklingError, matched by name so
        # that no pickle module is imported on any load path
        if type(err).__name__ != "UnpicklingError":
            raise
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        refused = f"a {found.group(1)} object" if found else "content the safe loader does not accept"
        raise ConfigError(f"{path}: refused {refused}: only tensors and plain containers are read "
                          "(torch.load weights_only=True); nothing was unpickled beyond that") from err


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """LoRA tensors of a PEFT adapter dir (safetensors preferred, .bin through the safe loader)."""
    st, binary = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / LEGACY_ADAPTER_BIN
    if st.is_file():
        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{st}: unreadable safetensors file ({err})") from err
    if binary.is_file():
        weights = safe_torch_load(binary)
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise ConfigError(f"{binary}: expected a dict of tensors")
        return weights
    raise ConfigError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} or {LEGACY_ADAPTER_BIN}")


def check_adapter_config(adapter_dir: Path, cfg: RunConfig) -> None:
    """The adapter's rank and alpha must be the run's: otherwise the weights mean something else."""
    stored = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    for key, field, want in (("r", "lora_rank", cfg.lora_rank), ("lora_alpha", "lora_alpha", cfg.effective_lora_alpha)):
        if key in stored and stored[key] != want:
            raise ConfigError(f"config field `{field}`: {want}, but {adapter_dir / ADAPTER_CONFIG} has {key}={stored[key]}; "
                              f"set `{field}: {stored[key]}` to continue from that adapter")


def load_adapter_weights(model: PeftModel, adapter_dir: Path, cfg: RunConfig) -> int:
    """Put an old adapter's LoRA weights into `model`; every LoRA parameter must be covered.
    Returns how many tensors were loaded."""
    check_adapter_config(adapter_dir, cfg)
    weights = read_adapter_weights(adapter_dir)
    result = set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ConfigError(f"config field `resume_adapter_dir`: {adapter_dir}: keys this model has no LoRA "
                          f"parameter for: {unexpected[:5]}")
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(n for n in getattr(result, "missing_keys", []) or [] if n in lora)
    if missing:
        raise ConfigError(f"config field `resume_adapter_dir`: {adapter_dir}: LoRA parameters missing from the "
                          f"adapter: {missing[:5]}")
    return len(weights)
