import json
from pathlib import Path

import numpy as np
from PIL import Image

from arft_core.config import CorruptionRanges, DataConfig
from arft_core.data import corruptions
from arft_core.data.mat_coding import generate, load_manifest

PAPER_FIELDS = {"id", "question", "answers", "ori_image_path", "processed_image_path", "type", "split"}


def _gradient() -> Image.Image:
    arr = np.zeros((4, 6, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(6)[None, :] * 40
    arr[..., 1] = np.arange(4)[:, None] * 60
    return Image.fromarray(arr)


def test_rotation90_is_clockwise():
    img = _gradient()
    out, params = corruptions.rotation90(img, np.random.default_rng(0), CorruptionRanges())
    src, dst = np.asarray(img), np.asarray(out)
    assert dst.shape == (6, 4, 3) and params == {"degrees_clockwise": 90}
    # Clockwise: the source's bottom-left pixel becomes the top-left one.
    assert (dst[0, 0] == src[-1, 0]).all() and (dst[0, -1] == src[0, 0]).all()


def test_photometric_corruptions_move_brightness_the_right_way():
    img = Image.fromarray(np.full((16, 16, 3), 120, dtype=np.uint8))
    rng, ranges = np.random.default_rng(0), CorruptionRanges()
    dark, p = corruptions.dark(img, rng, ranges)
    bright, q = corruptions.overexposure(img, rng, ranges)
    assert np.asarray(dark).mean() < 120 * ranges.dark_factor[1] + 1 and 0.15 <= p["factor"] <= 0.35
    assert np.asarray(bright).mean() > 200 and q["factor"] >= 2.0
    noisy, _ = corruptions.noise(img, rng, ranges)
    assert np.asarray(noisy).std() > 10


def test_generation_is_seeded_and_in_paper_format(tmp_path: Path):
    cfg = DataConfig(n_train=10, n_test=5)
    summary = generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    assert summary["train"]["n"] == 10 and summary["test"]["n"] == 5
    a, b = (json.loads((tmp_path / d / "train.json").read_text()) for d in "ab")
    assert a == b  # same seed: same items, parameters and image hashes
    test = load_manifest(tmp_path / "a", "test")
    assert [i["id"] for i in a + test] == list(range(1, 16))
    labels = set()
    for item in a + test:
        assert PAPER_FIELDS <= set(item)
        assert item["split"] == ("hard" if len(item["type"]) > 1 else "simple")
        assert Image.open(tmp_path / "a" / item["processed_image_path"]).size[0] in (cfg.image_size,)
        labels.update(item["type"])
    assert len(labels) >= 2
    # Items list Simple first, then Hard, as the paper's files do.
    splits = [i["split"] for i in a]
    assert splits == sorted(splits, key=lambda s: s == "hard")


def test_different_seed_changes_items(tmp_path: Path):
    generate(DataConfig(n_train=6, n_test=2), tmp_path / "a")
    generate(DataConfig(n_train=6, n_test=2, seed=7), tmp_path / "b")
    assert load_manifest(tmp_path / "a", "train") != load_manifest(tmp_path / "b", "train")
