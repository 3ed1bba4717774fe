"""Parameter names: steadyvla/timm module names <-> OpenVLA checkpoint keys, and the weight files.

The only renaming is timm's LayerScale: OpenVLA stores `ls1.gamma` / `ls2.gamma` of its vision
towers as `ls1.scale_factor` / `ls2.scale_factor` (HF loaders used to rewrite any `gamma` key).
"""

from __future__ import annotations

import re

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SHARD_PATTERN = "model-{index:05d}-of-{total:05d}.safetensors"
SAFETENSORS_METADATA = {"format": "pt"}

_VISION_PREFIX = "vision_backbone."
_TIMM_LS = re.compile(r"\.ls([12])\.gamma$")
_OPENVLA_LS = re.compile(r"\.ls([12])\.scale_factor$")


def to_openvla_key(name: str) -> str:
    """Module state-dict name -> checkpoint key."""
    return _TIMM_LS.sub(r".ls\1.scale_factor", name) if name.startswith(_VISION_PREFIX) else name


def from_openvla_key(key: str) -> str:
    """Checkpoint key -> module state-dict name."""
    return _OPENVLA_LS.sub(r".ls\1.gamma", key) if key.startswith(_VISION_PREFIX) else key


def shard_name(index: int, total: int) -> str:
    """`model-0000i-of-0000n.safetensors` (1-based, as Hugging Face names shards)."""
    return SHARD_PATTERN.format(index=index, total=total)
