"""AdamW over the trainable parameters and the learning-rate schedule (none | cosine + warmup)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from steadyvla.config import RunConfig


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over parameters with requires_grad, in a fixed (named) order so state keys are stable.
    `fused`: one fused kernel over all parameters (`fused_optimizer`), else the per-parameter loop."""
    params = [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]) if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (is use_lora false and the model frozen?)")
    if fused:
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=False)


def lr_multiplier(step: int, cfg: RunConfig) -> float:
    """Factor on `learning_rate` for optimizer step `step` (0-based): linear warmup, then
    constant (`none`) or cosine decay to `min_learning_rate` at `max_steps`."""
    if cfg.lr_warmup_steps > 0 and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_scheduler == "none":
        return 1.0
    span = max(1, cfg.max_steps - cfg.lr_warmup_steps)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
    floor = cfg.min_learning_rate / cfg.learning_rate
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> LambdaLR:
    """LambdaLR over `lr_multiplier`; its state_dict is plain JSON (the lambda is not stored)."""
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))


def _current_lrs(base_lrs: list[float], step: int, cfg: RunConfig) -> list[float]:
    # the same expression LambdaLR evaluates, so an unchanged schedule yields the same floats
    return [base * lr_multiplier(step, cfg) for base in base_lrs]


def schedule_change(stored_scheduler: dict[str, Any], stored_max_steps: int | None, cfg: RunConfig) -> dict | None:
    """How the restored schedule's next learning rate changes under this config (a new `max_steps`
    under cosine), for starts.jsonl; None when the checkpoint's schedule already gives the same lr."""
    step = int(stored_scheduler["last_epoch"])
    was = list(stored_scheduler["_last_lr"])
    now = _current_lrs(stored_scheduler["base_lrs"], step, cfg)
    if was == now:
        return None
    return {"max_steps": {"checkpoint": stored_max_steps, "now": cfg.max_steps}, "at_step": step,
            "next_lr": {"checkpoint": was[0], "now": now[0]}}


def rebuild_scheduler(scheduler: LambdaLR, cfg: RunConfig) -> None:
    """After loading a checkpoint: re-derive the lr of the next step from `cfg`, so a changed
    `max_steps` applies from the first resumed step (the restored lr was computed for the old
    horizon and LambdaLR would use it for one more step). A no-op when nothing changed."""
    lrs = _current_lrs(scheduler.base_lrs, scheduler.last_epoch, cfg)
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


# Parameter names that take no weight decay besides biases and 1-D tensors (norm weights).
NO_DECAY_NAME_PARTS = ("embed_tokens", "pos_embed", "cls_token", "reg_token", "norm")


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Weight decay on matrices only: not on biases, norms or embeddings."""
    return param.ndim >= 2 and not name.endswith(".bias") and not any(part in name for part in NO_DECAY_NAME_PARTS)


def build_full_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (call after sharding: FSDP2 replaces them) in two groups:
    `weight_decay` for matrices, none for biases, norms and embeddings; named order, stable state keys."""
    named = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda kv: kv[0])
    if not named:
        raise ValueError("model has no trainable parameters (train_vision_backbone/projector/llm all false?)")
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, foreach=False)
