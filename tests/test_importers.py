"""Importers: the paper's MAT-Coding demo imports clean, malformed rows are quarantined one by one with readable
messages while the rest import, VQA sets import from JSONL and CSV with a field mapping, and `VqaImport` samples
deterministically. Hostile manifests (paths out of the image folder, colliding file names, near-duplicate ids,
decompression bombs) are quarantined row by row."""

from __future__ import annotations

import csv
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
from PIL import Image, ImageFile

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
    assert reasons[2] == "item 119: field 'id': duplicate id: row 6 (119) and row 5 (119) are the same id"
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
    assert result.quarantined[1]["reason"] == "item 1: field 'qid': duplicate id: row 4 ('1') and row 1 ('1') are the same id"

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

    # `lang` is the scorer's notion of Chinese (protocol.has_cjk): a basic-block ideograph makes an item "zh".
    zh = tmp_path / "zh.jsonl"
    zh.write_text(json.dumps({"id": "z", "image": "red.png", "question": "什么颜色?", "answers": ["红"]}))
    assert VqaImport(zh, vqa_images).sample(np.random.default_rng(0), 0).lang == "zh"
    assert a.lang == "en"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": "none.png", "question": "?", "answers": ["a"]}))
    with pytest.raises(ValueError, match=r"bad.jsonl: no valid row .*item x: field 'image'"):
        VqaImport(bad, vqa_images)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(path: Path, side: int = 13000) -> Path:
    """A valid black 1-bit `side` x `side` PNG of a few KB, written by hand (PIL would allocate side² bytes)."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    pixels = zlib.compress(bytes((1 + (side + 7) // 8) * side), 9)  # each row: filter byte 0, then zero bits
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels)
                     + _png_chunk(b"IEND", b""))
    return path


@pytest.fixture
def hostile_images(tmp_path: Path) -> tuple[Path, Path]:
    """(image folder, a real image outside it): same-named different pictures in a/ and b/, twin.png (the bytes of
    a/same.png), link.png (a symlink to the outside image) and huge.png (13000x13000)."""
    folder, outside = tmp_path / "images", tmp_path / "secret.png"
    for sub, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (folder / sub).mkdir(parents=True)
        Image.new("RGB", (64, 48), colour).save(folder / sub / "same.png")
    shutil.copy(folder / "a" / "same.png", folder / "twin.png")
    Image.new("RGB", (64, 48), (7, 7, 7)).save(outside)
    (folder / "link.png").symlink_to(outside)
    huge_png(folder / "huge.png")
    return folder, outside


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_hostile_coding_manifest(tmp_path: Path, hostile_images: tuple[Path, Path],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder, outside = hostile_images
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda img: decoded.append(img.size) or real_load(img))
    base = {"question": "What colour?", "answers": ["red"], "type": ["none"], "split": "simple"}
    sources = {1: str(outside), 2: "../secret.png", 3: "link.png", 4: "a/same.png", 5: "b/same.png",
               "11": "a/same.png", " 11": "b/same.png", 8: "huge.png", 9: "twin.png", 10: "twin.png"}
    rows = [{**base, "id": item_id, "processed_image_path": path} for item_id, path in sources.items()]
    rows[8]["ori_image_path"] = "../secret.png"  # id 9: even the optional (provenance) image may not escape
    (tmp_path / "c.json").write_text(json.dumps(rows))

    result = import_mat_coding(tmp_path / "c.json", folder, tmp_path / "out")

    field = "processed_image_path"
    assert [(q["item"], q["field"], q["reason"]) for q in result.quarantined] == [
        (1, field, f"item 1: field '{field}': path escapes the image folder: {outside}"),
        (2, field, f"item 2: field '{field}': path escapes the image folder: ../secret.png"),
        (3, field, f"item 3: field '{field}': path escapes the image folder: link.png (resolves to "
                   f"{outside.resolve()})"),
        (" 11", "id", "item  11: field 'id': duplicate id: row 7 (' 11') and row 6 ('11') are the same id "
                      "(ids are compared as text, surrounding whitespace stripped)"),
        (8, field, f"item 8: field '{field}': image size 13000x13000 outside [28, 4096] pixels per side "
                   "(huge.png)"),
        (9, "ori_image_path", "item 9: field 'ori_image_path': path escapes the image folder: ../secret.png"),
    ]
    assert [q["row"] for q in result.quarantined] == [rows[i] for i in (0, 1, 2, 6, 7, 8)]
    assert (64, 48) in decoded and (13000, 13000) not in decoded  # the bomb is refused from its header alone

    # Every valid row is kept; its stored image is a byte-for-byte copy named by content: the two same.png never
    # share a file, the byte-identical twin.png does share one.
    assert [i["id"] for i in result.items] == [4, 5, "11", 10]
    stored = {i["id"]: i[field] for i in result.items}
    for item_id, rel in stored.items():
        assert re.fullmatch(r"images/[0-9a-f]{64}\.png", rel)
        assert (tmp_path / "out" / rel).read_bytes() == (folder / sources[item_id]).read_bytes()
        assert result.items[[i["id"] for i in result.items].index(item_id)]["ori_image_path"] is None
    assert stored[4] == stored["11"] == stored[10] != stored[5]
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == sorted({Path(r).name
                                                                                      for r in stored.values()})


def test_symlink_inside_the_folder_is_followed(tmp_path: Path, hostile_images: tuple[Path, Path]) -> None:
    folder, _ = hostile_images
    (folder / "alias.png").symlink_to(folder / "b" / "same.png")
    row = {"id": 1, "question": "Colour?", "answers": ["blue"], "type": ["none"], "processed_image_path": "alias.png"}
    (tmp_path / "c.json").write_text(json.dumps([row]))
    result = import_mat_coding(tmp_path / "c.json", folder, tmp_path / "out")
    assert result.quarantined == []
    stored = tmp_path / "out" / result.items[0]["processed_image_path"]
    assert stored.read_bytes() == (folder / "b" / "same.png").read_bytes() and not stored.is_symlink()


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_hostile_vqa_set(tmp_path: Path, hostile_images: tuple[Path, Path]) -> None:
    folder, outside = hostile_images
    huge_png(folder / "giant.png", 20000)  # over twice PIL's limit: PIL refuses it in Image.open
    files = [str(outside), "../secret.png", "link.png", "huge.png", "giant.png", "a/same.png", "b/same.png"]
    rows = [{"id": f"q{n}", "image": name, "question": "Colour?", "answers": ["red"]} for n, name in enumerate(files)]
    rows.append({"id": " q5 ", "image": "twin.png", "question": "Colour?", "answers": ["red"]})
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = import_vqa(path, folder)
    assert [(q["item"], q["field"]) for q in result.quarantined] == [
        ("q0", "image"), ("q1", "image"), ("q2", "image"), ("q3", "image"), ("q4", "image"), (" q5 ", "id")]
    reasons = [q["reason"] for q in result.quarantined]
    assert reasons[1] == "item q1: field 'image': path escapes the image folder: ../secret.png"
    assert reasons[3] == (f"item q3: field 'image': image size 13000x13000 is over {Image.MAX_IMAGE_PIXELS} "
                          "pixels (huge.png)")
    assert reasons[4].startswith("item q4: field 'image': image too large to open (giant.png: Image size "
                                 "(400000000 pixels) exceeds limit")
    assert reasons[5] == ("item  q5 : field 'id': duplicate id: row 8 (' q5 ') and row 6 ('q5') are the same id "
                          "(ids are compared as text, surrounding whitespace stripped)")
    assert [(i["id"], i["image"]) for i in result.items] == [("q5", "a/same.png"), ("q6", "b/same.png")]
