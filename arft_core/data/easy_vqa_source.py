"""Source of real image-QA items: the `easy-vqa` package (5,000 shape images, 48k questions, MIT licence)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from arft_core.data.sources import SourceItem


@lru_cache(maxsize=2)
def _load(split: str):
    import easy_vqa

    if split == "train":
        return easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    return easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()


class EasyVqa:
    """Questions about one shape per 64x64 image (shape, colour, yes/no), resized to `image_size`."""

    name = "easy_vqa"

    def __init__(self, split: str = "train", image_size: int = 112):
        self.split, self.image_size = split, image_size

    def sample(self, rng: np.random.Generator, index: int) -> SourceItem:
        (questions, answers, image_ids), images = _load(self.split)
        i = int(rng.integers(len(questions)))
        img = Image.open(images[image_ids[i]]).convert("RGB").resize((self.image_size,) * 2, Image.BICUBIC)
        return SourceItem(image=img, question=questions[i], answers=[answers[i]], source=self.name,
                          source_id=f"{self.split}/{i}")
