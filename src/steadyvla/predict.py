"""`predict_action`: OpenVLA's inference semantics on a loaded `VLABundle`.

prompt `In: What action should the robot take to {instruction.lower()}?\\nOut:` -> BOS + tokens
-> the separator token appended if absent -> greedy decoding of len(q01) tokens with a KV cache ->
bin centres -> BOUNDS_Q99 un-normalisation where `mask` is true (float64, as upstream).

The separator: OpenVLA appends id 29871, Llama-2's bare "▁" piece, which is what the trailing
space of the training prompt "...Out: " tokenizes to. For any tokenizer steadyvla derives it the
same way (the extra token that tokenizing the prompt plus a space yields): 29871 for Llama-2, the
byte-level space for the tiny tokenizer, and none (nothing appended) for a tokenizer where the
space merges into the previous token.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import LlamaForCausalLM

from steadyvla.config import ConfigError
from steadyvla.data.stats import unnormalize_actions
from steadyvla.model.action_tokenizer import ActionTokenizer
from steadyvla.model.bundle import VLABundle
from steadyvla.model.vla import VLA

INFERENCE_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"

ImageLike = Image.Image | np.ndarray


def action_stats(norm_stats: dict, unnorm_key: str | None) -> dict:
    """The `action` statistics of `unnorm_key` (optional when there is exactly one dataset)."""
    keys = sorted(norm_stats)
    if unnorm_key is None:
        if len(keys) != 1:
            raise ConfigError(f"unnorm_key: required, the model has {len(keys)} datasets in norm_stats: "
                              f"{', '.join(keys) or '(none)'}")
        unnorm_key = keys[0]
    if unnorm_key not in norm_stats:
        raise ConfigError(f"unnorm_key: {unnorm_key!r} is not in the model's norm_stats (valid: {', '.join(keys)})")
    entry = norm_stats[unnorm_key]
    if not isinstance(entry, dict) or "action" not in entry or "q01" not in entry["action"]:
        raise ConfigError(f"norm_stats[{unnorm_key!r}]: expected {{'action': {{'q01', 'q99', 'mask', ...}}}}")
    return entry["action"]


def load_image(path: Path | str) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3]; undecodable files are a ConfigError naming them."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(f"--image: {path}: cannot be decoded as an image ({err}); expected a PNG or JPEG") from err


def _as_rgb(image: ImageLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def separator_id(tokenizer, prompt: str, prompt_ids: list[int]) -> int | None:
    """The token the training prompt's trailing space adds after "Out:" (29871 for Llama-2)."""
    spaced = [prompt_ids[0]] + list(tokenizer(prompt + " ", add_special_tokens=False).input_ids)
    return spaced[-1] if len(spaced) == len(prompt_ids) + 1 and spaced[:-1] == prompt_ids else None


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    """BOS + prompt tokens, with the separator appended if absent (OpenVLA's 29871 rule)."""
    prompt = INFERENCE_PROMPT.format(instruction=instruction.lower())
    # BOS explicitly: whether a tokenizer adds it depends on its files and the Transformers version
    ids = [int(tokenizer.bos_token_id)] + list(tokenizer(prompt, add_special_tokens=False).input_ids)
    sep = separator_id(tokenizer, prompt, ids)
    return ids + [sep] if sep is not None and ids[-1] != sep else ids


# Transformers renamed the KV-cache argument/output from `past_key_values` to `cache` in 5.x.
_CACHE_NAME = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_decode(model: VLA, input_ids: torch.Tensor, pixel_values: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Greedy generation of `n_tokens` after the multimodal prompt (KV cache, like HF generate)."""
    mask = torch.ones_like(input_ids)
    embeds, mask = model.multimodal_embeddings(input_ids, mask, pixel_values)
    out = model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
    tokens = []
    for step in range(n_tokens):
        nxt = out.logits[:, -1].float().argmax(dim=-1)
        tokens.append(nxt)
        if step + 1 < n_tokens:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model.language_model(input_ids=nxt[:, None], attention_mask=mask,
                                       use_cache=True, **{_CACHE_NAME: getattr(out, _CACHE_NAME)})
    return torch.stack(tokens, dim=1)


def predict_action(
    model: VLABundle,
    image: ImageLike | Sequence[ImageLike],
    instruction: str | Sequence[str],
    unnorm_key: str | None = None,
) -> np.ndarray:
    """Predict robot actions like OpenVLA's `predict_action`.

    One image -> float64 array [A]; a list of images -> [B, A] (one instruction for all, or one
    per image; prompts of equal token length run as one batch).
    """
    stats = action_stats(model.norm_stats, unnorm_key)
    n_dims = len(stats["q01"])
    if isinstance(image, np.ndarray) and image.ndim not in (3, 4):
        raise ConfigError(f"image: array of shape {image.shape}; expected RGB [H, W, 3] or a batch [B, H, W, 3]")
    single = isinstance(image, Image.Image) or (isinstance(image, np.ndarray) and image.ndim == 3)
    images = [image] if single else list(image)
    instructions = [instruction] * len(images) if isinstance(instruction, str) else list(instruction)
    if len(instructions) != len(images):
        raise ConfigError(f"instruction: {len(instructions)} instructions for {len(images)} images")
    transform = model.image_transform
    dtype = model.model.projector.fc1.weight.dtype
    pixels = torch.stack([transform(_as_rgb(img), 0, 0) for img in images]).to(model.device, dtype)
    ids = [prompt_ids(model.tokenizer, text) for text in instructions]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, seq in enumerate(ids):
        groups[len(seq)].append(i)
    tokens = np.zeros((len(images), n_dims), dtype=np.int64)
    for members in groups.values():
        batch_ids = torch.tensor([ids[i] for i in members], device=model.device)
        tokens[members] = greedy_decode(model.model, batch_ids, pixels[members], n_dims).cpu().numpy()
    actions = tokens_to_actions(tokens, model.action_tokenizer, stats)
    return actions[0] if single else actions


def tokens_to_actions(tokens: np.ndarray, decoder: ActionTokenizer, stats: dict) -> np.ndarray:
    """Generated ids -> bin centres (index = clip(vocab_end - id - 1, 0, n_bins - 2)) -> robot units
    via `0.5 * (x + 1) * (q99 - q01) + q01` where `mask` is true (float64, as OpenVLA)."""
    index = np.clip(decoder.vocab_end - np.asarray(tokens) - 1, 0, decoder.bin_centers.shape[0] - 1)
    return unnormalize_actions(decoder.bin_centers[index], stats)
