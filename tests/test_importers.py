"""Importers: the paper's MAT-Coding demo imports clean, malformed rows are quarantined one by one with readable
messages while the rest import, VQA sets import from JSONL and CSV with a field mapping, and `VqaImport` samples
deterministically."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
from PIL import Image

from arft_core.data.importers import VqaImport, import_mat_coding, import_vqa, parse_box_norm

DEMO = SHARED / "mat-coding-demo"


def _evaluated_image(item: dict) -> str:
    return item["ori_image_path"] if item["type"][0] == "crop" else item["processed_image_path"]


def test_demo_imports_clean() -> None:
    result = import_mat_coding(DEMO / "coding_case.json", DEMO)
    assert result.quarantined == []
    assert [i["id"] for i in result.items] == [12, 22, 63, 71, 119, 124]
    assert {i["id"]: i["split"] for i in result.items} == {
        12: "simple", 22: "simple", 63: "simple", 71: "hard", 119: "hard", 124: "hard"}
    by_id = {i["id"]: i for i in result.items}
    assert by_id[119]["box_norm"] == [366, 723, 506, 851]
    assert by_id[124]["box_norm"] == [489, 155, 595, 259]
    assert by_id[124]["answers"] == ["Spaghetti\nGOEMON"]
    # The demo folder holds only the evaluated image; the other one is recorded as missing.
    assert by_id[119]["ori_image_path"] == "crop_8_ori.png" and by_id[119]["processed_image_path"] is None
    assert by_id[12]["processed_image_path"] == "rotation180_1_proc.png" and by_id[12]["ori_image_path"] is None
    assert "box_norm" not in by_id[12]


def test_split_derived_when_absent(tmp_path: Path) -> None:
    rows = json.loads((DEMO / "coding_case.json").read_text())
    for row in rows:
        del row["split"]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    result = import_mat_coding(tmp_path / "c.json", DEMO)
    assert [i["split"] for i in result.items] == ["simple", "simple", "simple", "hard", "hard", "hard"]


def test_malformed_rows_are_quarantined(tmp_path: Path) -> None:
    rows = json.loads((DEMO / "coding_case.json").read_text())
    for row in rows:
        shutil.copy(DEMO / _evaluated_image(row), tmp_path / _evaluated_image(row))
    (tmp_path / "broken_proc.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    del rows[0]["answers"]                                # id 12
    rows[3]["processed_image_path"] = "broken_proc.png"   # id 71
    rows[5]["id"] = rows[4]["id"]                         # second 119 (was 124)
    (tmp_path / "coding.json").write_text(json.dumps(rows, ensure_ascii=False))

    result = import_mat_coding(tmp_path / "coding.json", tmp_path)

    assert [i["id"] for i in result.items] == [22, 63, 119]
    assert result.items[2]["answers"] == ["SINCE 1994"]   # the first 119 stays
    assert [(q["item"], q["field"]) for q in result.quarantined] == [
        (12, "answers"), (71, "processed_image_path"), (119, "id")]
    reasons = [q["reason"] for q in result.quarantined]
    assert reasons[0] == "item 12: field 'answers': missing"
    assert reasons[1] == ("item 71: field 'processed_image_path': image does not decode "
                          "(broken_proc.png: UnidentifiedImageError)")
    assert reasons[2] == "item 119: field 'id': duplicate id (first used by row 5)"
    assert result.quarantined[2]["row"]["answers"] == ["Spaghetti\nGOEMON"]

    out = tmp_path / "out" / "quarantine.json"
    result.write_quarantine(out)
    assert json.loads(out.read_text()) == result.quarantined
    assert not out.with_name(out.name + ".tmp").exists()


@pytest.mark.parametrize(("change", "field", "fragment"), [
    ({"question": "  "}, "question", "missing or empty"),
    ({"answers": []}, "answers", "non-empty list"),
    ({"type": ["rotation45"]}, "type", "unknown label"),
    ({"type": []}, "type", "non-empty list"),
    ({"split": "medium"}, "split", "'simple' or 'hard'"),
    ({"processed_image_path": "absent.png"}, "processed_image_path", "image not found"),
    ({"id": None}, "id", "integer or a non-empty string"),
])
def test_each_field_is_checked(tmp_path: Path, change: dict, field: str, fragment: str) -> None:
    row = json.loads((DEMO / "coding_case.json").read_text())[0] | change
    (tmp_path / "c.json").write_text(json.dumps([row]))
    result = import_mat_coding(tmp_path / "c.json", DEMO)
    assert result.items == []
    assert len(result.quarantined) == 1 and result.quarantined[0]["field"] == field
    assert fragment in result.quarantined[0]["reason"]


def test_crop_without_box_and_plain_string_answer(tmp_path: Path) -> None:
    rows = json.loads((DEMO / "coding_case.json").read_text())
    rows[4]["question"] = "Recognize the text in the highlighted area."
    rows[0]["answers"] = "1 Can (473ml)"
    (tmp_path / "c.json").write_text(json.dumps(rows))
    result = import_mat_coding(tmp_path / "c.json", DEMO)
    assert [(q["item"], q["field"]) for q in result.quarantined] == [(119, "question")]
    assert result.items[0]["answers"] == ["1 Can (473ml)"]
    assert parse_box_norm("within the [0, 10.5, 1000, 20] of") == [0, 10.5, 1000, 20]
    assert parse_box_norm("within the [5, 5, 2000, 20] of") is None


def test_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        import_mat_coding(tmp_path / "nope.json", DEMO)
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="bad.json"):
        import_mat_coding(bad, DEMO)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        import_vqa(tmp_path / "nope.jsonl", DEMO)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="x.txt"):
        import_vqa(tmp_path / "x.txt", DEMO)


@pytest.fixture
def vqa_images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255)), ("green.jpg", (0, 255, 0))):
        Image.new("RGB", (32, 24), colour).save(folder / name)
    return folder


FIELDS = {"id": "qid", "image": "file", "question": "q", "answers": "a"}


def test_jsonl_import(tmp_path: Path, vqa_images: Path) -> None:
    rows = [
        {"qid": "r1", "file": "red.png", "q": "What colour is it?", "a": ["red", "Red"], "note": "kept"},
        {"file": "blue.png", "q": "What colour is it?", "a": "blue"},
        {"qid": "g1", "file": "missing.png", "q": "What colour?", "a": ["green"]},
        {"qid": "g2", "file": "green.jpg", "q": "What colour?", "a": ["", " "]},
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\nnot json\n")
    result = import_vqa(path, vqa_images, FIELDS)
    assert result.items == [
        {"note": "kept", "id": "r1", "image": "red.png", "question": "What colour is it?", "answers": ["red", "Red"]},
        {"id": "row-2", "image": "blue.png", "question": "What colour is it?", "answers": ["blue"]},
    ]
    assert [(q["item"], q["field"]) for q in result.quarantined] == [("g1", "file"), ("g2", "a"), ("row 5", "(row)")]
    assert result.quarantined[0]["reason"].startswith("item g1: field 'file': image not found (missing.png")
    assert "not valid JSON" in result.quarantined[2]["reason"]


def test_csv_import(tmp_path: Path, vqa_images: Path) -> None:
    path = tmp_path / "set.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["qid", "file", "q", "a"])
        writer.writerow(["1", "red.png", "What colour is it?", "red | Red|crimson"])
        writer.writerow(["", "green.jpg", "Which colour?", "green"])
        writer.writerow(["3", "gone.png", "Which colour?", "blue"])
        writer.writerow(["1", "blue.png", "Which colour?", "blue"])
        writer.writerow(["5", "blue.png", "", "blue"])
    result = import_vqa(path, vqa_images, FIELDS)
    assert [(i["id"], i["answers"]) for i in result.items] == [("1", ["red", "Red", "crimson"]),
                                                               ("row-2", ["green"])]
    assert [(q["item"], q["field"]) for q in result.quarantined] == [("3", "file"), ("1", "qid"), ("5", "q")]
    assert result.quarantined[1]["reason"] == "item 1: field 'qid': duplicate id (first used by row 1)"

    default_names = tmp_path / "plain.csv"
    default_names.write_text("image,question,answers\nred.png,Colour?,red|rouge\n")
    assert import_vqa(default_names, vqa_images).items[0]["answers"] == ["red", "rouge"]
    with pytest.raises(ValueError, match="missing column"):
        import_vqa(default_names, vqa_images, FIELDS)


def test_vqa_import_source(tmp_path: Path, vqa_images: Path) -> None:
    path = tmp_path / "set.jsonl"
    rows = [{"id": f"q{i}", "image": name, "question": "Colour?", "answers": [name.split(".")[0]]}
            for i, name in enumerate(["red.png", "blue.png", "green.jpg"] * 3)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    source = VqaImport(path, vqa_images)
    assert source.name == "vqa-import"
    a = source.sample(np.random.default_rng(3), 0)
    b = VqaImport(path, vqa_images).sample(np.random.default_rng(3), 0)
    assert (a.source_id, a.question, a.answers) == (b.source_id, b.question, b.answers)
    assert a.image.tobytes() == b.image.tobytes() and a.image.mode == "RGB"
    assert a.source == "vqa-import" and a.source_id in {r["id"] for r in rows}
    assert a.answers == [rows[int(a.source_id[1:])]["answers"][0]]
    assert len({source.sample(np.random.default_rng(s), s).source_id for s in range(50)}) == len(rows)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": "none.png", "question": "?", "answers": ["a"]}))
    with pytest.raises(ValueError, match=r"bad.jsonl: no valid row .*item x: field 'image'"):
        VqaImport(bad, vqa_images)
