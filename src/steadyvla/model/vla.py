"""The OpenVLA-style VLA: timm vision tower(s) -> GELU MLP projector -> HF causal LM.

Attribute names match the OpenVLA HF checkpoint (`vision_backbone.featurizer`,
`vision_backbone.fused_featurizer`, `projector.fc1/fc2/fc3`, `language_model`) so weights and
LoRA adapters map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from steadyvla.model.spec import TowerSpec, VLASpec
from steadyvla.model.prompt import IGNORE_INDEX


def _make_tower(spec: TowerSpec) -> nn.Module:
    return timm.create_model(spec.timm_id, pretrained=False, num_classes=0, **spec.overrides)


class VisionBackbone(nn.Module):
    """One or two ViTs; patch features from the second-to-last block, prefix tokens dropped."""

    def __init__(self, towers: tuple[TowerSpec, ...]):
        super().__init__()
        if len(towers) not in (1, 2):
            raise ValueError(f"expected 1 or 2 vision towers, got {len(towers)}")
        self.featurizer = _make_tower(towers[0])
        self.fused_featurizer = _make_tower(towers[1]) if len(towers) == 2 else None
        self.embed_dim = sum(t.embed_dim for t in self._towers())
        self.num_patches = self.featurizer.patch_embed.num_patches

    def _towers(self) -> list[nn.Module]:
        return [t for t in (self.featurizer, self.fused_featurizer) if t is not None]

    @staticmethod
    def _patch_features(tower: nn.Module, images: torch.Tensor) -> torch.Tensor:
        # stop_early: the last block's output is never used, so it is never computed
        (features,) = tower.forward_intermediates(images, indices=[len(tower.blocks) - 2], stop_early=True,
                                                  output_fmt="NLC", intermediates_only=True)
        return features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3 or 6, H, W] -> [B, num_patches, embed_dim] (towers concatenated on features)."""
        if self.fused_featurizer is None:
            return self._patch_features(self.featurizer, pixel_values)
        first, second = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat(
            [self._patch_features(self.featurizer, first), self._patch_features(self.fused_featurizer, second)],
            dim=2,
        )


class Projector(nn.Module):
    """OpenVLA projector: fused -> fc1/fc2/fc3 (3-layer GELU MLP), single -> fc1/fc2."""

    def __init__(self, vision_dim: int, llm_dim: int, fused: bool):
        super().__init__()
        self.fused = fused
        if fused:
            hidden = 4 * vision_dim
            self.fc1, self.fc2, self.fc3 = nn.Linear(vision_dim, hidden), nn.Linear(hidden, llm_dim), nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1, self.fc2 = nn.Linear(vision_dim, llm_dim), nn.Linear(llm_dim, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(features)))
        return self.fc3(F.gelu(x)) if self.fused else x


@dataclass
class VLAOutput:
    """Loss (mean CE over label positions) and the logits/labels aligned for metrics."""

    loss: torch.Tensor | None
    # with labels: [B, L-1, V] shifted to align with `labels` (text_logits_only: [B, T-1, V], the text
    # positions only); without labels: [B, L, V]
    logits: torch.Tensor
    labels: torch.Tensor | None  # targets aligned with `logits`
    hidden_states: tuple[torch.Tensor, ...] | None = None


class VLA(nn.Module):
    """Vision backbone + projector + language model; patches inserted right after <BOS>."""

    def __init__(self, spec: VLASpec):
        super().__init__()
        self.spec = spec
        self.vision_backbone = VisionBackbone(spec.towers)
        llm_config = spec.llm_config()
        self.projector = Projector(self.vision_backbone.embed_dim, llm_config.hidden_size, fused=spec.fused)
        self.language_model = LlamaForCausalLM(llm_config)
        # Training with labels: the vocabulary head runs only at the text positions (never at the
        # patches, ~90% of the sequence). Same loss and metrics; off = OpenVLA's full-sequence head.
        self.text_logits_only = False

    @property
    def num_patches(self) -> int:
        return self.vision_backbone.num_patches

    def multimodal_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM input embeddings with the projected patches inserted right after <BOS>, and the
        matching attention mask."""
        patches = self.projector(self.vision_backbone(pixel_values.to(self.projector.fc1.weight.dtype)))
        tokens = self.language_model.get_input_embeddings()(input_ids)
        embeds = torch.cat([tokens[:, :1], patches.to(tokens.dtype), tokens[:, 1:]], dim=1)
        ones = attention_mask.new_ones(patches.shape[:2])
        return embeds, torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> VLAOutput:
        """Multimodal forward; loss is next-token CE on labels != IGNORE_INDEX (actions + EOS)."""
        embeds, mask = self.multimodal_embeddings(input_ids, attention_mask, pixel_values)
        if labels is not None and self.text_logits_only:
            return self._text_positions_forward(embeds, mask, labels, output_hidden_states)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=mask, output_hidden_states=output_hidden_states, use_cache=False
        )
        if labels is None:  # inference / probing: logits at every position, unshifted
            return VLAOutput(None, out.logits, None, out.hidden_states)
        logits = out.logits[:, :-1]
        ignore = labels.new_full((labels.shape[0], self.num_patches), IGNORE_INDEX)
        targets = torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)[:, 1:]
        return VLAOutput(_token_loss(logits, targets), logits, targets, out.hidden_states)

    def _text_positions_forward(
        self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, output_hidden_states: bool
    ) -> VLAOutput:
        """The labelled forward with the LM head only where a label can be: the positions that predict
        text tokens 1.. (after the patches). The target of every patch position (and of <BOS>, which
        predicts the first patch) is IGNORE_INDEX, so dropping them changes neither the loss (mean CE
        over the same positions) nor the metrics. A static slice, so no host synchronisation."""
        out = self.language_model.model(
            inputs_embeds=embeds, attention_mask=mask, output_hidden_states=output_hidden_states, use_cache=False
        )
        hidden = out.last_hidden_state[:, self.num_patches:-1]  # position P + j predicts text token j + 1
        logits = self.language_model.lm_head(hidden)
        targets = labels[:, 1:]
        return VLAOutput(_token_loss(logits, targets), logits, targets, out.hidden_states)


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over targets != IGNORE_INDEX."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
