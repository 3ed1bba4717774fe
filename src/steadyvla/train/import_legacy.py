"""`steadyvla ckpt import-legacy`: an old PEFT adapter dir + its `trainer_state.pt` -> a steadyvla
checkpoint in the config's run dir, so that `steadyvla finetune --config ...` resumes from it.

What the old file holds is read with `torch.load(weights_only=True)` only: `global_step`
(required) and, when present, the AdamW `optimizer` state. The old scripts built AdamW over the
trainable parameters in module order while steadyvla orders them by name, so the per-parameter
state is re-keyed through the parameter names and checked shape by shape. The LR schedule is
recomputed from the config at that step; the data position and RNG start fresh (the old scripts
never stored them), which the command says.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch

from steadyvla.checkpoint.layout import CHECKPOINTS_DIR
from steadyvla.checkpoint.legacy import is_legacy_adapter_dir, load_adapter_weights, safe_torch_load
from steadyvla.config import ConfigError, RunConfig
from steadyvla.data.sampler import DataPosition
from steadyvla.model.build import build_vla, load_tokenizer, wrap_lora
from steadyvla.train.checkpointing import TrainerCheckpointer, TrainState
from steadyvla.train.finetune import seed_everything
from steadyvla.train.optim import build_optimizer, build_scheduler
from steadyvla.train.run_dir import record_start, run_dir_for


def _remap_optimizer_state(old: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, source: Path) -> dict:
    """The old AdamW state (params in module order) keyed by steadyvla's param ids (name order)."""
    if not isinstance(old, dict) or "state" not in old:
        raise ConfigError(f"{source}: field `optimizer` is not an optimizer state_dict (no `state`)")
    module_order = [n for n, p in model.named_parameters() if p.requires_grad]
    name_order = sorted(module_order)
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    old_ids = [i for group in old.get("param_groups", []) for i in group.get("params", [])] or sorted(old["state"])
    if len(old_ids) != len(module_order):
        raise ConfigError(f"{source}: field `optimizer` covers {len(old_ids)} parameters, this run trains "
                          f"{len(module_order)} (is lora_rank / lora_target_modules the old run's?)")
    state = {}
    for position, old_id in enumerate(old_ids):
        name = module_order[position]
        entry = old["state"].get(old_id, {})
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shapes[name]:
                raise ConfigError(f"{source}: optimizer state `{key}` of parameter #{old_id} has shape "
                                  f"{list(value.shape)}, expected {list(shapes[name])} for {name}")
        if entry:
            state[name_order.index(name)] = entry
    groups = optimizer.state_dict()["param_groups"]
    return {"state": state, "param_groups": groups}


def import_legacy(cfg: RunConfig, adapter_dir: Path, trainer_state: Path, log: Callable[[str], None] = print) -> Path:
    """Write the converted checkpoint into `cfg`'s run dir and return the run dir."""
    if not is_legacy_adapter_dir(adapter_dir):
        raise ConfigError(f"--adapter: {adapter_dir} is not a PEFT adapter directory (needs adapter_config.json "
                          "and no steadyvla trainer_state.json)")
    if cfg.method_enabled:
        raise ConfigError("config field `method_enabled`: true; a legacy import starts the method's state fresh "
                          "only through a new run: import with method_enabled: false")
    if not trainer_state.is_file():
        raise ConfigError(f"--trainer-state: {trainer_state} does not exist")
    old = safe_torch_load(trainer_state)
    if not isinstance(old, dict) or not isinstance(old.get("global_step"), int) or old["global_step"] < 0:
        raise ConfigError(f"{trainer_state}: field `global_step` missing or not a non-negative int "
                          f"(found keys: {sorted(old) if isinstance(old, dict) else type(old).__name__})")
    run_dir = run_dir_for(cfg)
    if (run_dir / CHECKPOINTS_DIR).exists() and any((run_dir / CHECKPOINTS_DIR).iterdir()):
        raise ConfigError(f"run dir {run_dir} already has checkpoints; import into a new run (run_id_note)")
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    model = wrap_lora(build_vla(cfg, tokenizer, "cpu"), cfg)
    load_adapter_weights(model, adapter_dir, cfg)
    optimizer, scheduler = build_optimizer(model, cfg), None
    if "optimizer" in old:
        optimizer.load_state_dict(_remap_optimizer_state(old["optimizer"], model, optimizer, trainer_state))
    else:
        log(f"{trainer_state} has no `optimizer`: AdamW moments start at zero")
    scheduler = build_scheduler(optimizer, cfg)
    with warnings.catch_warnings():  # stepping the schedule without optimizer steps is intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(old["global_step"]):
            scheduler.step()
    ignored = sorted(set(old) - {"global_step", "optimizer"})
    state = TrainState(model, optimizer, scheduler, DataPosition(), global_step=old["global_step"])
    record_start(run_dir, cfg, resumed_from=str(adapter_dir), resumed_step=old["global_step"], changes={})
    TrainerCheckpointer(run_dir, cfg, log).save(state, blocking=True)
    log(f"imported {adapter_dir} at step {old['global_step']} into {run_dir}: adapter and optimizer restored, "
        f"LR schedule recomputed from the config; data position and RNG start fresh"
        + (f"; not carried over: {', '.join(ignored)}" if ignored else ""))
    return run_dir
