"""Tiny random OpenVLA checkpoints in the exact Hugging Face layout, for the I/O tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from steadyvla.config import build_config
from steadyvla.model.build import build_vla, load_tokenizer
from steadyvla.model.openvla_save import write_openvla_dir

NORM_STATS = {
    "bridge_orig": {
        "action": {
            "mask": [True, True, True, True, True, True, False],
            "q01": [-0.5, -1.0, 0.0, -2.0, 1.0, -0.25, 0.0],
            "q99": [0.5, 1.0, 4.0, 2.0, 3.0, 0.75, 1.0],
            "mean": [0.0] * 7, "std": [1.0] * 7, "min": [-1.0] * 7, "max": [1.0] * 7,
        },
        "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
        "num_transitions": 100,
        "num_trajectories": 4,
    }
}
SMALL_SHARD_BYTES = 400_000  # forces several shards for the tiny model


def cast_like_loaded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters and persistent buffers (what a checkpoint holds), not the rotary buffers."""
    model.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, assign=True)
    return model


def tiny_model(seed: int = 0):
    cfg = build_config({"seed": seed})
    tok = load_tokenizer(cfg)
    return build_vla(cfg, tok).eval(), tok


def write_tiny_openvla(out: Path, seed: int = 0, norm_stats: dict | None = None,
                       max_shard_bytes: int = SMALL_SHARD_BYTES,
                       dtype: torch.dtype | None = torch.bfloat16) -> tuple[Path, torch.nn.Module]:
    """A tiny random VLA written as an OpenVLA dir (bf16 shards unless `dtype` None = float32);
    returns the dir and the model cast to what the checkpoint holds."""
    model, tok = tiny_model(seed)
    upstream = dataclasses.replace(model.spec, action_bins_end=None)  # OpenVLA's own decoding rule
    write_openvla_dir(out, upstream, model.state_dict(), tok, norm_stats or NORM_STATS, dtype=dtype,
                      max_shard_bytes=max_shard_bytes)
    return out, cast_like_loaded(model, dtype) if dtype is not None else model


def random_inputs(tok, batch: int = 2, length: int = 12, image_size: int = 56, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (batch, length), generator=g)
    ids[:, 0] = tok.bos_token_id
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(batch, 6, image_size, image_size, generator=g))
