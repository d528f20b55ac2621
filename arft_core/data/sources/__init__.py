"""Sources of image-QA items for MAT-Coding. Each plug-in turns a seeded generator into `SourceItem`s.

A source is any object with `name: str` and `sample(rng, index) -> SourceItem`. It must be deterministic: the
same generator state and index give the same item (the engine derives one generator per item from the seed).
Sources with regions (text boxes with their exact text) can also serve crop questions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Region:
    """A text region of the image: pixel box (x_min, y_min, x_max, y_max) and the exact text inside it."""

    box: tuple[int, int, int, int]
    text: str


@dataclass
class SourceItem:
    image: Image.Image            # RGB, the clean image
    question: str
    answers: list[str]            # exact ground truth; several accepted forms allowed
    source: str                   # plug-in name, e.g. "synthetic"
    source_id: str                # stable id inside the source, e.g. "receipt/en/17"
    regions: list[Region] = field(default_factory=list)
    lang: str = "en"              # "en" or "zh"


class Source(Protocol):
    name: str

    def sample(self, rng: np.random.Generator, index: int) -> SourceItem: ...
