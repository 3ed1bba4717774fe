"""The one description a VLA is built from: towers, image size, projector and LLM config.

A preset (`presets.py`, random init) and an OpenVLA `config.json` (`openvla_config.py`, loaded
weights) both produce a `VLASpec`; `VLA(spec)` is the only construction code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import LlamaConfig


@dataclass(frozen=True)
class TowerSpec:
    """One timm vision tower: model id, constructor overrides and its image normalisation."""

    timm_id: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VLASpec:
    """Everything needed to build a VLA of one shape (weights random or loaded afterwards).

    `llm` holds LlamaConfig kwargs including the padded `vocab_size` and `pad_token_id`.
    """

    image_size: int
    towers: tuple[TowerSpec, ...]  # 1 = single tower, 2 = fused (DINOv2 + SigLIP)
    llm: dict
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    # where the action bins end when it is not OpenVLA's rule below: a preset trains on its tokenizer's
    # own vocab_size, which equals the rule for Llama-2 (32000) but not for the tiny tokenizer
    action_bins_end: int | None = None

    @property
    def fused(self) -> bool:
        """Two towers concatenated on features, with the 3-layer projector."""
        return len(self.towers) == 2

    def llm_config(self) -> LlamaConfig:
        """The language model's config."""
        return LlamaConfig(**self.llm)

    @property
    def action_vocab_end(self) -> int:
        """OpenVLA's `vocab_size` for action decoding: the padded vocabulary minus the padding
        multiple (32064 - 64 = 32000 for openvla-7b), as its modeling code computes it — or
        `action_bins_end` where a preset's tokenizer ends its bins elsewhere."""
        if self.action_bins_end is not None:
            return self.action_bins_end
        return int(self.llm["vocab_size"]) - self.pad_to_multiple_of


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (OpenVLA pads 32001 -> 32064)."""
    return ((vocab_size + multiple - 1) // multiple) * multiple
