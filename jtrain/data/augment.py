"""Per-example image augmentation on the host: random crop with padding, horizontal flip,
colour jitter (the CIFAR-style recipe timm and the Flax examples use for small images).

An `ImageAugment` is the `augment` of training `ArrayExamples`: Grain calls it with a
generator seeded by the run's seed and the row's position in the stream, so a resumed run
augments every step exactly as the uninterrupted one did. It is a plain object of settings,
so it pickles into Grain worker processes.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageAugment:
    """Settings (`config.augment.*`); a setting of 0 / False turns its transform off."""

    crop_padding: int = 0  # pad each side by this many pixels (edge values), crop back randomly
    flip: bool = False  # mirror left-right with probability 1/2 (not for digits or text)
    color_jitter: float = 0.0  # scale brightness, contrast and saturation by 1 +- this

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip or self.color_jitter)

    def __call__(self, row: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        image = row["image"]
        if self.crop_padding:
            image = _random_crop(image, self.crop_padding, rng)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        if self.color_jitter:
            image = _jitter(image, self.color_jitter, rng)
        return {**row, "image": np.ascontiguousarray(image, dtype=np.float32)}


def _random_crop(image_HxWxC: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    # Edge padding, not zeros: a black border would be a feature no test image has.
    padded = np.pad(image_HxWxC, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    height, width = image_HxWxC.shape[:2]
    return padded[top : top + height, left : left + width]


def _jitter(image_HxWxC: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
    image = image_HxWxC * brightness
    image = (image - image.mean()) * contrast + image.mean()
    if image.shape[-1] == 3:  # saturation only means something for colour images
        gray = image.mean(axis=-1, keepdims=True)
        image = (image - gray) * saturation + gray
    return np.clip(image, 0.0, 1.0)
