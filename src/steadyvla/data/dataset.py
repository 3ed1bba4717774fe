"""The PyTorch Dataset that feeds the trainer: frames -> (input_ids, labels, pixel_values).

Items are addressed by sample keys from `ResumableBatchSampler` (epoch and index packed in one
int), so the Dataset itself is stateless and identical in every DataLoader worker.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from steadyvla.data.frames import FrameSource
from steadyvla.data.sampler import decode_sample_key
from steadyvla.data.stats import normalize_actions
from steadyvla.data.transforms import ImageTransform
from steadyvla.model.action_tokenizer import ActionTokenizer
from steadyvla.model.prompt import IGNORE_INDEX, PromptBuilder


class VLADataset(Dataset):
    """Tokenized, normalized training samples over any `FrameSource`."""

    def __init__(self, source: FrameSource, prompt_builder: PromptBuilder, action_tokenizer: ActionTokenizer,
                 action_stats: dict, image_transform: ImageTransform):
        self.source = source
        self.prompt_builder = prompt_builder
        self.action_tokenizer = action_tokenizer
        self.action_stats = action_stats
        self.image_transform = image_transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int) -> dict[str, Any]:
        epoch, index = decode_sample_key(key)
        frame = self.source.frame(index)
        normalized = normalize_actions(frame.action[None, :], self.action_stats)[0]
        sample = self.prompt_builder.build(frame.instruction, self.action_tokenizer.encode(normalized))
        return {
            "input_ids": sample.input_ids,
            "labels": sample.labels,
            "pixel_values": self.image_transform(frame.image, epoch, index),
            "sample_key": torch.tensor(key, dtype=torch.long),
        }


class PaddedCollator:
    """Right-pads token sequences; stacks images."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        batch = len(items)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[row, :n] = it["input_ids"]
            labels[row, :n] = it["labels"]
            attention_mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "sample_key": torch.stack([it["sample_key"] for it in items]),
        }

