"""Model presets: `tiny` for CPU tests and the demo, `openvla-7b` for the real shape, `vla-1b` (OpenVLA's
towers and projector with a ~1B Llama) for full training on one GPU."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from steadyvla.model.spec import TowerSpec, VLASpec, padded_vocab_size

# Per-tower image normalisation (OpenVLA's DINOv2 values are the bf16-rounded ImageNet stats).
DINOV2_MEAN = (0.484375, 0.455078125, 0.40625)
DINOV2_STD = (0.228515625, 0.2236328125, 0.224609375)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class VLAPreset:
    """Everything needed to build a VLA of one shape with random weights."""

    name: str
    image_size: int
    towers: tuple[TowerSpec, ...]  # 1 = single tower, 2 = fused (DINOv2 + SigLIP)
    llm: dict  # LlamaConfig kwargs (vocab_size is set from the tokenizer)
    pad_to_multiple_of: int = 64

    def spec(self, vocab_size: int, pad_token_id: int, action_vocab_end: int | None = None) -> VLASpec:
        """The build spec for a tokenizer of `vocab_size` ids (padded to `pad_to_multiple_of`) whose
        action bins end at `action_vocab_end` (the tokenizer's own vocab_size; None = OpenVLA's rule)."""
        padded = padded_vocab_size(vocab_size, self.pad_to_multiple_of)
        llm = dict(self.llm, vocab_size=padded, pad_token_id=pad_token_id)
        own_end = None if action_vocab_end in (None, padded - self.pad_to_multiple_of) else action_vocab_end
        return VLASpec(self.image_size, self.towers, llm, self.pad_to_multiple_of, action_bins_end=own_end)


def tiny_tokenizer_dir() -> Path:
    """Directory of the tokenizer shipped for the tiny preset."""
    return Path(str(resources.files("steadyvla") / "assets" / "tiny-tokenizer"))


_TINY_VIT = dict(img_size=56, depth=3, embed_dim=48, num_heads=2, mlp_ratio=2.0)

# OpenVLA's two towers at 224 px (DINOv2 ViT-L/14 + SigLIP SO400M/14), shared by openvla-7b and vla-1b
OPENVLA_TOWERS = (
    TowerSpec("vit_large_patch14_reg4_dinov2.lvd142m", DINOV2_MEAN, DINOV2_STD, dict(img_size=224)),
    TowerSpec("vit_so400m_patch14_siglip_224", SIGLIP_MEAN, SIGLIP_STD, dict(img_size=224)),
)

PRESETS: dict[str, VLAPreset] = {
    "tiny": VLAPreset(
        name="tiny",
        image_size=56,
        towers=(
            TowerSpec("vit_small_patch14_reg4_dinov2", DINOV2_MEAN, DINOV2_STD, _TINY_VIT),
            TowerSpec("vit_so400m_patch14_siglip_224", SIGLIP_MEAN, SIGLIP_STD, _TINY_VIT),
        ),
        llm=dict(
            hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
            # larger than Llama's 0.02: the LM head is frozen under LoRA and, after RMSNorm, a 0.02 head
            # caps logits near +-2, too flat for the loss to fall in a short demo
            initializer_range=0.1,
        ),
    ),
    "openvla-7b": VLAPreset(
        name="openvla-7b",
        image_size=224,
        towers=OPENVLA_TOWERS,
        llm=dict(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
        ),
    ),
    # OpenVLA's vision towers and fused projector with a ~1B Llama (hidden 2048, 18 layers, 16 heads of 128,
    # MLP 5632): full training with float32 master weights and AdamW (16 bytes per parameter) fits one
    # 80 GB GPU, where openvla-7b's 7.5B (~120 GB of state) does not. With the Llama-2 tokenizer (32064
    # padded ids): 1,828,138,432 parameters = towers 730,911,680 + projector 40,972,800 + Llama 1,056,253,952
    # (tests/test_presets.py counts them on the meta device).
    "vla-1b": VLAPreset(
        name="vla-1b",
        image_size=224,
        towers=OPENVLA_TOWERS,
        llm=dict(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
        ),
    ),
}


def get_preset(name: str) -> VLAPreset:
    """Look a preset up by name; unknown names are an error listing the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"model_preset {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]
