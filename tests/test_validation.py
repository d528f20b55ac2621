from pathlib import Path

import pytest

from arft_core.config import DataConfig, ValidationConfig
from arft_core.data.mat_coding import generate, load_manifest
from arft_core.validation import format_report, validate_manifests


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "mat_coding"
    generate(DataConfig(n_train=6, n_test=4), out)
    return out


def _validate(dataset: Path, test_items: list[dict]) -> dict:
    return validate_manifests({"train": load_manifest(dataset, "train"), "test": test_items}, dataset,
                              ValidationConfig())


def test_generated_data_passes(dataset: Path):
    report = _validate(dataset, load_manifest(dataset, "test"))
    assert report["success"], format_report(report)


def test_each_broken_expectation_names_the_item(dataset: Path):
    items = load_manifest(dataset, "test")
    corrupt = dataset / "images" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    items[1]["id"] = items[0]["id"]                     # duplicate id
    items[2]["answers"] = [" "]                         # no non-empty answer
    items[3]["processed_image_path"] = "images/corrupt.png"
    items[3]["type"] = ["rotation45"]
    report = _validate(dataset, items)
    text = format_report(report)
    assert not report["success"] and report["manifests"]["train"]["success"]
    failures = {f["expectation"]: f for f in report["manifests"]["test"]["failures"]}
    assert failures["expect_column_values_to_be_unique"]["item_ids"] == [str(items[0]["id"])] * 1
    assert failures["expect_column_values_to_be_between"]["item_ids"] == [str(items[2]["id"])]
    assert failures["expect_column_values_to_match_regex"]["item_ids"] == [str(items[3]["id"])]
    assert f"item id={items[3]['id']}: bad processed_image" in text and "does not decode" in text
    assert f"item id={items[2]['id']}: no non-empty answer" in text
    assert "duplicate id" in text and "unknown corruption label" in text


def test_missing_file_and_missing_field(dataset: Path):
    items = load_manifest(dataset, "test")[:2]
    del items[0]["answers"]
    items[1]["ori_image_path"] = "images/gone.png"
    text = format_report(_validate(dataset, items))
    assert f"item id={items[0]['id']}: no non-empty answer" in text
    assert f"item id={items[1]['id']}: bad ori_image (ori_image='file not found: images/gone.png')" in text
