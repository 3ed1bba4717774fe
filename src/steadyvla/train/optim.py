"""AdamW over the trainable parameters and the learning-rate schedule (none | cosine + warmup)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from steadyvla.config import RunConfig


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW over parameters with requires_grad, in a fixed (named) order so state keys are stable."""
    params = [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]) if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (is use_lora false and the model frozen?)")
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
