"""Image preprocessing (OpenVLA's resize + per-tower normalisation) and seeded augmentation.

Augmentation follows OpenVLA's RLDS recipe (random resized crop at 90% area with square aspect,
then brightness ±0.2, contrast and saturation ×[0.8, 1.2], hue ±0.05). Its randomness comes from
(seed, epoch, sample index) only, so a sample looks the same whichever worker or resumed run
produces it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from steadyvla.model.presets import VLAPreset
from steadyvla.model.spec import VLASpec

CROP_AREA = 0.9
BRIGHTNESS_DELTA = 0.2
CONTRAST_RANGE = (0.8, 1.2)
SATURATION_RANGE = (0.8, 1.2)
HUE_DELTA = 0.05


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> float [3, size, size] in [0, 1]; bicubic, aspect not kept (OpenVLA)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    resized = Image.fromarray(image).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div_(255.0)


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the mean grey level (as torchvision), but with the mean reduced by NumPy in
    float64: torch splits large reductions across threads, so the result would depend on how many
    threads the process has (a DataLoader worker has one) and augmentation would not be
    reproducible bit for bit."""
    mean = float(np.mean(TF.rgb_to_grayscale(image).numpy(), dtype=np.float64))
    return (factor * image + (1.0 - factor) * mean).clamp_(0.0, 1.0)


def augment(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """OpenVLA-style augmentation of a float [3, S, S] image with parameters drawn from `rng`."""
    size = image.shape[-1]
    side = int(round(math.sqrt(CROP_AREA) * size))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    image = TF.resized_crop(image, top, left, side, side, [size, size], antialias=True)
    image = (image + float(rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))).clamp_(0.0, 1.0)
    image = adjust_contrast(image, float(rng.uniform(*CONTRAST_RANGE)))
    image = TF.adjust_saturation(image, float(rng.uniform(*SATURATION_RANGE)))
    image = TF.adjust_hue(image, float(rng.uniform(-HUE_DELTA, HUE_DELTA)))
    return image.clamp_(0.0, 1.0)


class ImageTransform:
    """Resize, optionally augment, normalise per tower and stack (6 channels for fused towers)."""

    def __init__(self, preset: VLASpec | VLAPreset, image_aug: bool, seed: int):
        self.size = preset.image_size
        self.image_aug = image_aug
        self.seed = seed
        self.stats = [(torch.tensor(t.mean).view(3, 1, 1), torch.tensor(t.std).view(3, 1, 1)) for t in preset.towers]

    def __call__(self, image: np.ndarray, epoch: int, index: int) -> torch.Tensor:
        x = resize_image(image, self.size)
        if self.image_aug:
            x = augment(x, np.random.default_rng([self.seed, epoch, index]))
        return torch.cat([(x - mean) / std for mean, std in self.stats], dim=0)
