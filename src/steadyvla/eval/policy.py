"""What `steadyvla eval` evaluates: a LoRA checkpoint applied to the base its run was trained
from (a random-init preset rebuilt from its seed, or `vla_path`), or a plain OpenVLA directory;
and the action source that feeds it camera frames through `predict_action`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from steadyvla.checkpoint.layout import TRAINER_STATE_JSON
from steadyvla.config import ConfigError
from steadyvla.eval.inputs import resolve_checkpoint, run_statistics
from steadyvla.eval.rollout import ActionSource
from steadyvla.model.base_init import base_init_device
from steadyvla.model.bundle import VLABundle, load_vla
from steadyvla.predict import action_stats, predict_action


@dataclass
class EvalTarget:
    """A loaded model plus where it came from (for the results file and its default path)."""

    bundle: VLABundle
    unnorm_key: str
    checkpoint: Path | None = None
    run_dir: Path | None = None
    global_step: int | None = None
    demo_image_size: int | None = None  # the run's demo image size, when it came from a run


def _load_adapted(ckpt: Path, vla_path: Path | None, device: str) -> tuple[VLABundle, object]:
    from peft import PeftModel

    from steadyvla.model.build import build_vla, load_tokenizer, model_spec
    from steadyvla.model.merge import checkpoint_config

    cfg = checkpoint_config(ckpt)
    if vla_path is not None:
        if not cfg.vla_path:
            raise ConfigError(f"--vla_path: {str(vla_path)!r} given, but {ckpt} adapts the random-init "
                              f"`{cfg.model_preset}` preset (rebuilt from its seed); leave --vla_path out")
        cfg = dataclasses.replace(cfg, vla_path=str(vla_path))
    tokenizer = load_tokenizer(cfg)
    state = json.loads((ckpt / TRAINER_STATE_JSON).read_text())
    init = None if cfg.vla_path else base_init_device(state, ckpt)
    base = build_vla(cfg, tokenizer, device, init_device=init)
    with torch.no_grad():
        model = PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload().eval()
    # the spec carries where the run's action bins end (a preset's tokenizer differs from OpenVLA's rule)
    return VLABundle(model, tokenizer, model_spec(cfg, tokenizer), {}), cfg


def load_openvla_target(vla_path: Path, unnorm_key: str | None, device: str = "cpu") -> EvalTarget:
    """A plain OpenVLA directory (`--vla_path` alone); `unnorm_key` picks its statistics."""
    try:
        bundle = load_vla(vla_path, device=device)
    except ConfigError as err:
        raise ConfigError(f"--vla_path: {err}") from err
    action_stats(bundle.norm_stats, unnorm_key)  # checks the key before any rollout
    return EvalTarget(bundle, unnorm_key or next(iter(bundle.norm_stats)))


def load_checkpoint_target(checkpoint: Path, vla_path: Path | None, unnorm_key: str | None,
                           device: str = "cpu") -> EvalTarget:
    """A LoRA checkpoint (or a run dir's newest) merged into the base its run trained from;
    actions are un-normalised with the run's statistics (default key: its `dataset_name`)."""
    ckpt = resolve_checkpoint(checkpoint)
    run_dir, stats = run_statistics(ckpt)
    bundle, cfg = _load_adapted(ckpt, vla_path, device)
    bundle.norm_stats = stats
    key = unnorm_key or (cfg.dataset_name if cfg.dataset_name in stats else None)
    action_stats(stats, key)
    step = json.loads((ckpt / TRAINER_STATE_JSON).read_text())["global_step"]
    return EvalTarget(bundle, key or next(iter(stats)), ckpt, run_dir, int(step), cfg.demo_image_size)


def check_action_dims(target: EvalTarget, dims: int) -> None:
    """The model's actions must have the simulator's dimensionality."""
    got = len(action_stats(target.bundle.norm_stats, target.unnorm_key)["q01"])
    if got != dims:
        raise ConfigError(f"unnorm_key {target.unnorm_key!r}: its statistics have {got} action dimensions; "
                          f"MetaWorld needs {dims} (dx, dy, dz, gripper): evaluate a model trained on "
                          "MetaWorld data")


def vla_action_source(target: EvalTarget) -> ActionSource:
    """One batched `predict_action` call per step for all live environments."""

    def act(images: Sequence[np.ndarray], instructions: Sequence[str],
            states: Sequence[np.ndarray]) -> np.ndarray:
        return predict_action(target.bundle, list(images), list(instructions), target.unnorm_key)

    return act
