"""Image degradations of MAT-Coding (spec §5.2). Each draws its parameters from a seeded generator and returns
the degraded image and the parameters used, so every item records how it was made."""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from arft_core.config import CorruptionRanges

Corruption = Callable[[Image.Image, np.random.Generator, CorruptionRanges], tuple[Image.Image, dict]]


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return round(float(rng.uniform(*bounds)), 4)


def rotation90(img, rng, ranges):
    # The paper's convention is clockwise; PIL rotates counter-clockwise for positive angles.
    return img.transpose(Image.Transpose.ROTATE_270), {"degrees_clockwise": 90}


def rotation180(img, rng, ranges):
    return img.transpose(Image.Transpose.ROTATE_180), {"degrees_clockwise": 180}


def _scale(img: Image.Image, factor: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) * factor
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def dark(img, rng, ranges):
    factor = _uniform(rng, ranges.dark_factor)
    return _scale(img, factor), {"factor": factor}


def overexposure(img, rng, ranges):
    factor = _uniform(rng, ranges.overexposure_factor)
    return _scale(img, factor), {"factor": factor}


def blur(img, rng, ranges):
    radius = _uniform(rng, ranges.blur_radius)
    return img.filter(ImageFilter.GaussianBlur(radius)), {"radius": radius}


def noise(img, rng, ranges):
    std = _uniform(rng, ranges.noise_std)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, std, size=np.asarray(img).shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), {"std": std}


def none(img, rng, ranges):
    return img.copy(), {}


CORRUPTIONS: dict[str, Corruption] = {
    f.__name__: f for f in (rotation90, rotation180, dark, overexposure, blur, noise, none)
}


def apply(img: Image.Image, labels: list[str], rng: np.random.Generator, ranges: CorruptionRanges):
    """Apply `labels` in order; returns the image and one parameter dict per label."""
    params = []
    for label in labels:
        if label not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {label!r}; known: {sorted(CORRUPTIONS)}")
        img, p = CORRUPTIONS[label](img, rng, ranges)
        params.append({"label": label, **p})
    return img, params
