"""Files on disk in one place: atomic text/JSON writes and the dataset manifests.

A writer goes through a temporary file in the same folder and renames it, so a reader never sees half a file.
A dataset folder (MAT-Coding or MAT-Search) holds one JSON list per manifest, `<split>.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFESTS = ("train", "test")  # the manifests of a dataset folder, in seed order (`train.json`, `test.json`)


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))


def load_manifest(data_dir: Path, split: str) -> list[dict]:
    return json.loads((data_dir / f"{split}.json").read_text())


def load_image(path: Path, size: int | None):
    """RGB image, resized to `size` x `size` without keeping the aspect ratio (the paper's 720x720), or as is."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        return im.resize((size, size), Image.BICUBIC) if size else im


def input_image_path(item: dict) -> str:
    """A MAT-Coding item's image as the model sees it: the clean one for crop items (a region task), else the
    degraded one."""
    return item["ori_image_path"] if item["type"][0] == "crop" else item["processed_image_path"]
