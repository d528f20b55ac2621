"""Builds MAT-Coding items in the paper's JSON format (`id, question, answers, ori_image_path,
processed_image_path, type, split`) plus provenance fields (source, seed, corruption parameters, image hashes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from arft_core.config import DataConfig
from arft_core.data import corruptions
from arft_core.data.easy_vqa_source import sample_easy_vqa

MANIFESTS = ("train", "test")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def _draw_types(cfg: DataConfig, n: int, rng: np.random.Generator) -> list[tuple[list[str], str]]:
    n_hard = round(n * cfg.hard_fraction) if cfg.hard else 0
    types = [(list(cfg.hard[rng.integers(len(cfg.hard))]), "hard") for _ in range(n_hard)]
    types += [([cfg.simple[rng.integers(len(cfg.simple))]], "simple") for _ in range(n - n_hard)]
    # The paper's files list Simple items first, then Hard.
    return sorted(types, key=lambda t: t[1] == "hard")


def build_manifest(cfg: DataConfig, split: str, out_dir: Path, first_id: int,
                   progress: Callable[[int], None] = lambda _: None) -> list[dict]:
    """Make `cfg.n_<split>` items: resize source images, corrupt them, save `{type}_{k}_{ori|proc}.png`."""
    n = cfg.n_train if split == "train" else cfg.n_test
    rng = np.random.default_rng([cfg.seed, MANIFESTS.index(split)])
    sources = sample_easy_vqa(n, rng, split)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    counters: dict[str, int] = {}
    items = []
    for offset, (src, (labels, level)) in enumerate(zip(sources, _draw_types(cfg, n, rng), strict=True)):
        type_name = "+".join(labels)
        k = counters[type_name] = counters.get(type_name, -1) + 1
        stem = f"{split}_{type_name}_{k}"
        clean = Image.open(src.image_path).convert("RGB").resize((cfg.image_size, cfg.image_size), Image.BICUBIC)
        degraded, params = corruptions.apply(clean, labels, rng, cfg.ranges)
        ori, proc = image_dir / f"{stem}_ori.png", image_dir / f"{stem}_proc.png"
        clean.save(ori)
        degraded.save(proc)
        items.append({
            "id": first_id + offset,
            "question": src.question,
            "answers": src.answers,
            "ori_image_path": f"images/{ori.name}",
            "processed_image_path": f"images/{proc.name}",
            "type": labels,
            "split": level,
            "source": src.source_id,
            "seed": cfg.seed,
            "corruption_params": params,
            "ori_sha256": _sha256(ori),
            "processed_sha256": _sha256(proc),
        })
        progress(1)
    return items


def generate(cfg: DataConfig, out_dir: Path, progress: Callable[[int], None] = lambda _: None) -> dict:
    """Write `train.json` and `test.json` (image paths relative to `out_dir`) and return counts per type."""
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a stage output is rebuilt whole, never patched
    summary = {}
    first_id = 1
    for split in MANIFESTS:
        items = build_manifest(cfg, split, out_dir, first_id, progress)
        first_id += len(items)
        write_json_atomic(out_dir / f"{split}.json", items)
        summary[split] = {"n": len(items), "simple": sum(i["split"] == "simple" for i in items),
                          "hard": sum(i["split"] == "hard" for i in items)}
    return summary


def load_manifest(data_dir: Path, split: str) -> list[dict]:
    return json.loads((data_dir / f"{split}.json").read_text())
