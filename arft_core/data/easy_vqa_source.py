"""Source of real image-QA items: the `easy-vqa` package (5,000 shape images, 48k questions, MIT licence)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SourceItem:
    image_path: Path
    question: str
    answers: list[str]
    source_id: str


def sample_easy_vqa(n: int, rng: np.random.Generator, split: str) -> list[SourceItem]:
    """`n` distinct questions, each on a distinct image, from easy-vqa's `split` ('train' or 'test')."""
    import easy_vqa

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        images = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        images = easy_vqa.get_test_image_paths()
    order = rng.permutation(len(questions))
    items, used_images = [], set()
    for i in order:
        if image_ids[i] in used_images:
            continue
        used_images.add(image_ids[i])
        items.append(SourceItem(Path(images[image_ids[i]]), questions[i], [answers[i]], f"easy-vqa/{split}/{i}"))
        if len(items) == n:
            return items
    raise ValueError(f"easy-vqa {split} has only {len(items)} distinct images; asked for {n}")
