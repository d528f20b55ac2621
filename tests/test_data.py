"""MAT-Coding data engine: corruptions, sandbox-verified teacher fixes, determinism, quotas, teacher turns."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arft_core.config import CorruptionRanges, DataConfig
from arft_core.data import corruptions, teacher
from arft_core.data.contact_sheet import contact_sheet
from arft_core.agent.steps import teacher_turns
from arft_core.data.mat_coding import _quota, generate, level_types
from arft_core.io import load_manifest
from arft_core.protocol import PHOTOMETRIC, PROBLEM_LABELS
from arft_core.sandbox import SandboxPool
from conftest import SHARED

PAPER_FIELDS = {"id", "question", "answers", "ori_image_path", "processed_image_path", "type", "split"}
SMALL = DataConfig(n_train=8, n_test=7, workers=2)


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


@pytest.fixture(scope="module")
def pool():
    with SandboxPool() as p:
        yield p


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    return Image.open(SHARED / "mat-coding-demo" / "none_2_proc.png").convert("RGB")


TYPES = [["rotation90"], ["rotation180"], ["dark"], ["overexposure"], ["blur"], ["noise"], ["rotation90", "dark"],
         ["rotation180", "noise"], ["blur", "noise"], ["rotation90", "overexposure"], ["dark", "noise"]]


def test_corruptions_and_teacher_cover_the_label_vocabulary():
    assert list(corruptions.CORRUPTIONS) == [label for label in PROBLEM_LABELS if label != "crop"]
    assert set(teacher.DESCRIPTIONS) == set(PROBLEM_LABELS)


@pytest.mark.parametrize("labels", TYPES, ids=["+".join(t) for t in TYPES])
def test_teacher_fix_restores_the_clean_image(pool, scene, tmp_path, labels):
    rng = np.random.default_rng(3)
    degraded, params = corruptions.apply(scene, labels, rng, CorruptionRanges())
    degraded.save(tmp_path / "in.png")
    result = pool.run(teacher.fix_code(labels, params), [tmp_path / "in.png"], tmp_path / "out")
    assert result.ok, result.error
    clean, corrupted = np.asarray(scene), np.asarray(degraded)
    fixed = np.asarray(Image.open(result.images[0]).convert("RGB"))
    kept, reason, metrics = teacher.check_fix(labels, clean, corrupted, fixed, DataConfig().teacher.min_psnr_gain_db)
    assert kept, reason
    if any(label in PHOTOMETRIC for label in labels):
        assert metrics["psnr_gain_db"] > 0.2  # measurably closer to the clean image than the corrupted one
    else:
        assert np.array_equal(fixed, clean)


def test_teacher_crop_gives_the_region(pool, scene, tmp_path):
    scene.save(tmp_path / "in.png")
    box = [100, 200, 650, 480]
    result = pool.run(teacher.fix_code(["crop"], [], box), [tmp_path / "in.png"], tmp_path / "out")
    fixed = np.asarray(Image.open(result.images[0]).convert("RGB"))
    kept, reason, _ = teacher.check_fix(["crop"], np.asarray(scene), np.asarray(scene), fixed, {}, box)
    assert kept, reason
    x1, y1, x2, y2 = teacher.crop_box_pixels(box, scene.width, scene.height)
    assert fixed.shape == (y2 - y1, x2 - x1, 3)


def test_a_bad_fix_is_rejected(scene):
    clean = np.asarray(scene)
    kept, reason, _ = teacher.check_fix(["rotation90"], clean, clean, np.rot90(clean, 2).copy(), {})
    assert not kept and "shape" in reason or "rotation" in reason
    darker = (clean * 0.5).astype(np.uint8)
    kept, reason, _ = teacher.check_fix(["dark"], clean, darker, darker, {"dark": 3.0})
    assert not kept and "PSNR gain" in reason


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    report = generate(SMALL, root / "a", root)
    return root, report


def test_same_params_give_byte_identical_data(built):
    root, _ = built
    generate(SMALL.model_copy(update={"workers": 1}), root / "b", root)  # even with another worker count
    assert _tree_digest(root / "a") == _tree_digest(root / "b")


def test_another_seed_gives_another_set(built, tmp_path):
    root, _ = built
    generate(SMALL.model_copy(update={"seed": 99}), tmp_path / "c", tmp_path)
    a = {i["ori_sha256"] for i in load_manifest(root / "a", "train")}
    c = {i["ori_sha256"] for i in load_manifest(tmp_path / "c", "train")}
    assert not a & c


def test_manifests_follow_the_paper_format_and_quotas(built):
    root, report = built
    train, test = load_manifest(root / "a", "train"), load_manifest(root / "a", "test")
    assert [i["id"] for i in train] == list(range(1, 9)) and [i["id"] for i in test] == list(range(1, 8))
    assert report["manifests"]["test"]["simple"] == 2 and report["manifests"]["test"]["hard"] == 5
    for item in train + test:
        assert PAPER_FIELDS <= set(item)
        assert item["split"] == ("simple" if item["type"] in [[t] for t in SMALL.simple] else "hard")
        assert item["verification"]["kept"] is True
        seen = item["ori_image_path"] if item["type"] == ["crop"] else item["processed_image_path"]
        assert (root / "a" / seen).is_file()
        if item["type"] == ["crop"]:
            assert item["question"].startswith("Recognize the text within the [")
            assert item["box_norm"] and (root / "a" / item["fixed_image_path"]).is_file()
    splits = [i["split"] for i in train]
    assert splits == sorted(splits, key=lambda s: s == "hard")  # Simple first, as in the paper's files
    assert report["candidates"] >= 15 and 0 <= report["reject_rate"] < 1


def test_paper_shape_is_one_setting_away():
    paper = DataConfig(n_test=200)
    assert _quota(paper, "test") == {"simple": 70, "hard": 130}
    types = level_types(paper, "simple")
    shares = [70 // len(types) + (t < 70 % len(types)) for t in range(len(types))]
    assert shares == [10] * 7  # 7 single degradations x 10, as the paper


def test_manifests_hold_the_teacher_turns(built):
    """No step file: training replays each item's teacher turns through the agent loop (agent.steps). The turns are
    the diagnosis, the fix (none for 'none' items) and the answer."""
    root, _ = built
    train = load_manifest(root / "a", "train")
    assert not (root / "a" / "train_steps.json").exists()
    turns = [teacher_turns(i, "coding") for i in train]
    assert [len(t) for t in turns] == [3 if i["type"] != ["none"] else 2 for i in train]
    for item, (problem, *middle, answer) in zip(train, turns, strict=True):
        assert problem.startswith("<think>") and "<problem>" in problem and "<code>" not in problem
        assert all("<code>" in c and "```python" in c for c in middle)
        assert answer.startswith("<think>") and answer.endswith("</answer>") and item["answers"][0] in answer


def test_contact_sheet(built, tmp_path):
    root, _ = built
    items = load_manifest(root / "a", "train") + load_manifest(root / "a", "test")
    out = contact_sheet(items, root / "a", tmp_path / "sheet.png")
    n_types = len({"+".join(i["type"]) for i in items})
    assert Image.open(out).height >= n_types * 200


def test_impossible_teacher_threshold_reports_the_rejects(tmp_path):
    cfg = DataConfig(n_train=1, n_test=1, hard_fraction=0.0, simple=["dark"],
                     teacher={"min_psnr_gain_db": {"dark": 99.0}, "max_candidates_factor": 1.0})
    with pytest.raises(RuntimeError, match=r"train/simple/dark: only 0 of 1 items passed .*PSNR gain"):
        generate(cfg, tmp_path / "x", tmp_path)
