"""Sharding and mixed precision for full training (`steadyvla train`).

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every LLM decoder layer and every ViT block as
its own unit, then the root (embeddings, projector, norms, LM head). Parameters stay float32 (the
master weights the optimizer updates); `MixedPrecisionPolicy` gathers them in `dtype` for compute
and reduces gradients in `reduce_dtype`. `hsdp_replicate_degree > 1` shards within groups of
world_size / degree ranks and replicates across them (HSDP over a 2-D device mesh). `strategy: ddp`
keeps the whole model on every rank (DDP, autocast for a bf16 `dtype`). One rank with `strategy:
fsdp` is FSDP2 over a 1-rank group (bf16 gathers once per block instead of autocast's per-op casts,
and the same code path as many GPUs).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from steadyvla.config import ConfigError, RunConfig
from steadyvla.distributed import DistEnv, wrap_data_parallel

MESH_DIMS = ("replicate", "shard")
# VLAOutput's shifted logits are a view; nothing modifies them in place, so FSDP2's warning is noise
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


# ViT parts after the second-to-last block, which the VLA never runs (kept for checkpoint compatibility)
UNUSED_TOWER_PARTS = ("norm", "fc_norm", "attn_pool", "head")


def unused_vision_modules(model: nn.Module) -> list[nn.Module]:
    """The towers' last block, final norm and pooling head: the forward stops at the second-to-last block."""
    modules: list[nn.Module] = []
    backbone = model.vision_backbone
    for tower in (backbone.featurizer, backbone.fused_featurizer):
        if tower is None:
            continue
        modules.extend(tower.blocks[len(tower.blocks) - 1:])
        modules.extend(m for m in (getattr(tower, name, None) for name in UNUSED_TOWER_PARTS)
                       if isinstance(m, nn.Module))
    return modules


def freeze_parts(model: nn.Module, cfg: RunConfig) -> None:
    """`train_vision_backbone` / `train_projector` / `train_llm`: a frozen part gets no gradients. The
    vision parts the forward never runs are frozen too: they would get no gradient and no optimizer
    state, and a resumed optimizer must hold exactly the state of the uninterrupted one."""
    for part, train in (("vision_backbone", cfg.train_vision_backbone), ("projector", cfg.train_projector),
                        ("language_model", cfg.train_llm)):
        for param in getattr(model, part).parameters():
            param.requires_grad_(train)
    for module in unused_vision_modules(model):
        module.requires_grad_(False)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: each ViT block of each tower, each LLM decoder layer."""
    units: list[nn.Module] = []
    backbone = model.vision_backbone
    for tower in (backbone.featurizer, backbone.fused_featurizer):
        if tower is not None:
            units.extend(tower.blocks)
    units.extend(model.language_model.model.layers)
    return units


def device_mesh(cfg: RunConfig, env: DistEnv):
    """1-D mesh over all ranks, or the 2-D (replicate, shard) mesh of HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    degree = cfg.hsdp_replicate_degree
    if env.world_size % degree:
        raise ConfigError(f"config field `hsdp_replicate_degree`: {degree} does not divide the world size "
                          f"{env.world_size}; use a divisor (e.g. the number of nodes)")
    if degree == 1:
        return init_device_mesh(env.device.type, (env.world_size,))
    return init_device_mesh(env.device.type, (degree, env.world_size // degree), mesh_dim_names=MESH_DIMS)


def apply_fsdp(model: nn.Module, cfg: RunConfig, env: DistEnv) -> nn.Module:
    """fully_shard per block, then the root; returns the same (now sharded) module."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh(cfg, env)
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.dtype), reduce_dtype=getattr(torch, cfg.reduce_dtype))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    # the root's parameters are needed again right at the start of backward: keep them gathered
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


class AutocastForward(nn.Module):
    """Runs the model's forward under autocast: float32 master weights, `dtype` compute (DDP, 1 rank)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.module, self.dtype, self.device_type = module, dtype, device_type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


def parallelize(model: nn.Module, cfg: RunConfig, env: DistEnv) -> nn.Module:
    """The module the loop's forward runs through. FSDP2 shards `model` in place (its state_dict keys
    stay the VLA's); DDP and autocast wrap it (the caller keeps `model` for state dicts)."""
    if cfg.strategy == "fsdp" and dist.is_initialized():  # one rank too (train: `one_rank_group`)
        return apply_fsdp(model, cfg, env)
    if env.distributed and cfg.reduce_dtype == "bfloat16":
        train_model = wrap_data_parallel(model, env)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        train_model.register_comm_hook(None, bf16_compress_hook)
    else:
        train_model = wrap_data_parallel(model, env)
    if cfg.dtype != "float32":
        train_model = AutocastForward(train_model, getattr(torch, cfg.dtype), env.device.type)
    return train_model


@contextlib.contextmanager
def gradient_sync(train_model: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward only if `sync` (the last micro-batch of an
    optimizer step): DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`; a no-op otherwise."""
    inner = train_model.module if isinstance(train_model, AutocastForward) else train_model
    if hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(sync)
        yield
    elif not sync and hasattr(inner, "no_sync"):
        with inner.no_sync():
            yield
    else:
        yield
