"""The probe set: N (image, instruction) samples used only for statistics and drift monitoring.

Drawn deterministically (seeded, without replacement) from a dataset — the training dataset, or
`probe_dataset_name` under `data_root_dir` — or read from a JSONL file of
{"image": path, "instruction": text} lines. Never used for gradient updates. Its hash (sample
identities, instructions and image bytes) goes into the ICSM artifacts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from steadyvla.data.transforms import ImageTransform
from steadyvla.model.prompt import PromptBuilder

PROBE_SEED_SALT = 0x9E0B  # keeps the probe draw independent of the training shuffle


@dataclass(frozen=True)
class ProbeSample:
    image: np.ndarray  # [H, W, 3] uint8
    instruction: str


class ProbeSet:
    """A fixed list of probe samples with a stable hash and deterministic batching."""

    def __init__(self, samples: list[ProbeSample], origin: str):
        if not samples:
            raise ValueError(f"probe set from {origin} is empty")
        self.samples = samples
        self.origin = origin

    def __len__(self) -> int:
        return len(self.samples)

    def digest(self) -> str:
        """sha256 over instructions and image bytes, in order."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(s.instruction.encode())
            h.update(np.ascontiguousarray(s.image).tobytes())
        return h.hexdigest()

    def indices_at(self, position: int, batch_size: int) -> list[int]:
        """Sample indices of the batch starting at `position` (cycles through the set)."""
        return [(position + i) % len(self.samples) for i in range(batch_size)]


def probe_from_source(source, size: int, seed: int) -> ProbeSet:
    """`size` frames drawn without replacement from a FrameSource with a seeded generator."""
    count = min(size, len(source))
    picks = np.random.default_rng([seed, PROBE_SEED_SALT]).choice(len(source), size=count, replace=False)
    samples = []
    for index in picks:
        frame = source.frame(int(index))
        samples.append(ProbeSample(frame.image, frame.instruction))
    return ProbeSet(samples, origin=f"{source.name} ({count} of {len(source)} frames, seed {seed})")


def probe_from_jsonl(path: Path, size: int, image_root: Path | None = None) -> ProbeSet:
    """The first `size` lines of a JSONL file of {"image": path, "instruction": text}; relative
    image paths are under `image_root` (the users' `probe_image_root`), else the file's directory."""
    samples = []
    for number, line in enumerate(Path(path).read_text().splitlines()[:size], start=1):
        try:
            row = json.loads(line)
            image_path = Path(row["image"])
            instruction = str(row["instruction"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"probe file {path}, line {number}: expected "
                             '{"image": "<path>", "instruction": "<text>"} ({err})') from err
        if not image_path.is_absolute():
            image_path = (image_root or Path(path).parent) / image_path
        samples.append(ProbeSample(np.asarray(Image.open(image_path).convert("RGB")), instruction))
    return ProbeSet(samples, origin=str(path))


@dataclass
class ProbeBatch:
    """Model inputs for a probe batch plus each sample's instruction span in LLM positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    instruction_mask: torch.Tensor  # [B, L_llm] bool, True on instruction-token positions


def encode_probe_batch(probe: ProbeSet, indices: list[int], prompt_builder: PromptBuilder,
                       transform: ImageTransform, num_patches: int, pad_token_id: int) -> ProbeBatch:
    """Prompt-only inputs (no actions). The instruction span comes from the real tokenization and
    is shifted by `num_patches`, because patch embeddings are inserted right after <BOS>."""
    prompts, spans = zip(*(prompt_builder.encode_prompt(probe.samples[i].instruction) for i in indices))
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(indices), longest), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    instruction_mask = torch.zeros((len(indices), longest + num_patches), dtype=torch.bool)
    for row, (ids, (start, end)) in enumerate(zip(prompts, spans)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        if end > start:
            instruction_mask[row, start + num_patches: end + num_patches] = True
    pixels = torch.stack([transform(probe.samples[i].image, 0, i) for i in indices])
    return ProbeBatch(input_ids, attention, pixels, instruction_mask)
