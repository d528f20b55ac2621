import copy
from pathlib import Path

import pytest

from arft_core.config import DataConfig, ValidationConfig
from arft_core.data.mat_coding import generate
from arft_core.io import load_manifest
from arft_core.validation import format_report, validate_manifests

CFG = ValidationConfig()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate(DataConfig(n_train=6, n_test=7), root / "mat_coding", root)
    return root / "mat_coding"


def _validate(dataset: Path, test_items: list[dict], cfg=CFG, **kw) -> dict:
    return validate_manifests({"train": load_manifest(dataset, "train"), "test": test_items}, dataset, cfg, **kw)


def test_generated_data_passes_and_writes_data_docs(dataset, tmp_path):
    expected = {"train": {"n": 6, "hard": 4}, "test": {"n": 7, "hard": 5}}
    report = _validate(dataset, load_manifest(dataset, "test"), expected=expected, docs_dir=tmp_path / "docs")
    assert report["success"], format_report(report)
    index = (tmp_path / "docs" / "index.html").read_text()
    assert "test_manifest" in index or "test_validation" in index


def test_each_broken_expectation_names_the_item(dataset):
    items = copy.deepcopy(load_manifest(dataset, "test"))
    (dataset / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    items[1]["id"] = items[0]["id"]                      # duplicate id
    items[2]["answers"] = [" "]                          # no non-empty answer
    items[3]["processed_image_path"] = "images/corrupt.png"
    items[3]["type"] = ["rotation45"]
    items[4]["teacher"]["answer"] = "the answer, untagged"
    report = _validate(dataset, items)
    text = format_report(report)
    assert not report["success"] and report["manifests"]["train"]["success"]
    failures = {f["expectation"] + ":" + f["column"]: f for f in report["manifests"]["test"]["failures"]}
    assert failures["expect_column_values_to_be_unique:id"]["item_ids"] == [str(items[0]["id"])]
    assert failures["expect_column_values_to_be_between:n_answers"]["item_ids"] == [str(items[2]["id"])]
    assert failures["expect_column_values_to_match_regex:type"]["item_ids"] == [str(items[3]["id"])]
    assert f"item id={items[3]['id']}: bad image" in text and "does not decode" in text
    assert f"item id={items[2]['id']}: no non-empty answer" in text
    assert f"item id={items[4]['id']}: bad teacher (teacher='malformed answer step')" in text
    assert set(report["quarantined"]["test"]) == {str(items[i]["id"]) for i in (0, 2, 3, 4)}


def test_quarantine_within_the_allowed_share_passes(dataset):
    items = copy.deepcopy(load_manifest(dataset, "test"))
    del items[0]["answers"]
    report = _validate(dataset, items, ValidationConfig(max_quarantined_fraction=0.2))
    assert report["success"] and list(report["quarantined"]["test"]) == [str(items[0]["id"])]
    assert "validation passed with quarantined items" in format_report(report)


def test_split_counts_and_image_sizes(dataset):
    items = load_manifest(dataset, "test")
    report = _validate(dataset, items, expected={"test": {"n": 7, "hard": 2}})
    assert not report["success"]
    assert "expect_column_mean_to_be_between" in format_report(report)
    small = _validate(dataset, items, ValidationConfig(max_side=100))
    assert "size 512x384 outside [28, 100]" in format_report(small)


def test_train_test_image_overlap_is_caught(dataset):
    items = copy.deepcopy(load_manifest(dataset, "test"))
    items[0]["phash"] = load_manifest(dataset, "train")[0]["phash"]
    report = _validate(dataset, items)
    assert f"item id={items[0]['id']}: image also in the other split" in format_report(report)


def test_real_mat_coding_items_import_and_pass_validation(tmp_path):
    from arft_core.data.importers import import_mat_coding
    from conftest import SHARED

    demo = SHARED / "mat-coding-demo"
    result = import_mat_coding(demo / "coding_case.json", demo)
    assert len(result.items) == 6 and result.quarantined == []
    report = validate_manifests({"test": result.items}, demo, CFG)
    assert report["success"], format_report(report)


def test_import_cli_quarantines_the_malformed_and_keeps_the_rest(tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    from conftest import SHARED

    demo = SHARED / "mat-coding-demo"
    src = tmp_path / "src"
    shutil.copytree(demo, src)
    items = json.loads((src / "coding_case.json").read_text())
    del items[0]["answers"]                                   # missing field
    (src / "broken.png").write_bytes(b"not an image")
    items[1]["processed_image_path"] = "broken.png"           # unreadable image
    items[2]["id"] = items[3]["id"]                           # duplicate id (the later one is quarantined)
    (src / "coding_case.json").write_text(json.dumps(items, ensure_ascii=False))
    proc = subprocess.run([sys.executable, "-m", "arft_core.cli", "data", "import-coding", "coding_case.json",
                           "--images", ".", "--out", str(tmp_path / "out")], cwd=src, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"item {items[0]['id']}: field 'answers'" in proc.stderr
    assert f"item {items[1]['id']}: field 'processed_image_path'" in proc.stderr and "does not decode" in proc.stderr
    assert "field 'id'" in proc.stderr
    kept = json.loads((tmp_path / "out" / "test.json").read_text())
    assert len(kept) == 3 and "validation passed" in proc.stdout
    assert len(json.loads((tmp_path / "out" / "quarantine.json").read_text())) == 3
