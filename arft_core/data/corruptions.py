"""Image degradations of MAT-Coding (spec §5.2). Each draws its parameters from a seeded generator and returns
the degraded image and the parameters used, so every item records how it was made."""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np
from PIL import Image

from arft_core.config import CorruptionRanges
from arft_core.protocol import PROBLEM_LABELS

Corruption = Callable[[Image.Image, np.random.Generator, CorruptionRanges], tuple[Image.Image, dict]]


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return round(float(rng.uniform(*bounds)), 4)


def rotation90(img, rng, ranges):
    # The paper's convention is clockwise; PIL rotates counter-clockwise for positive angles.
    return img.transpose(Image.Transpose.ROTATE_270), {"degrees_clockwise": 90}


def rotation180(img, rng, ranges):
    return img.transpose(Image.Transpose.ROTATE_180), {"degrees_clockwise": 180}


def _scale(img: Image.Image, factor: float) -> Image.Image:
    # Saturating multiply in OpenCV: the same result as clip(x * factor) rounded, several times faster.
    return Image.fromarray(cv2.convertScaleAbs(np.asarray(img), alpha=factor, beta=0))


def dark(img, rng, ranges):
    factor = _uniform(rng, ranges.dark_factor)
    return _scale(img, factor), {"factor": factor}


def overexposure(img, rng, ranges):
    factor = _uniform(rng, ranges.overexposure_factor)
    return _scale(img, factor), {"factor": factor}


def blur(img, rng, ranges):
    radius = _uniform(rng, ranges.blur_radius)  # the Gaussian's standard deviation, in pixels
    return Image.fromarray(cv2.GaussianBlur(np.asarray(img), (0, 0), radius)), {"radius": radius}


def noise(img, rng, ranges):
    std = _uniform(rng, ranges.noise_std)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.standard_normal(size=arr.shape, dtype=np.float32) * np.float32(std)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), {"std": std}


def none(img, rng, ranges):
    return img.copy(), {}


# Every label of the vocabulary but crop (a region question, not a degradation), each by its function of the same
# name (a label without one fails at import).
CORRUPTIONS: dict[str, Corruption] = {label: globals()[label] for label in PROBLEM_LABELS if label != "crop"}


def apply(img: Image.Image, labels: list[str], rng: np.random.Generator, ranges: CorruptionRanges):
    """Apply `labels` in order; returns the image and one parameter dict per label."""
    params = []
    for label in labels:
        if label not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {label!r}; known: {sorted(CORRUPTIONS)}")
        img, p = CORRUPTIONS[label](img, rng, ranges)
        params.append({"label": label, **p})
    return img, params
