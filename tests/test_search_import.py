"""MAT-Search import (4 formats, quarantine, idempotence, image store, hostile exports), multi-hop loaders, the
embedded sample."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import ImageFile
from test_importers import hostile_images, huge_png  # noqa: F401,F811  (hostile_images is a fixture)

from arft_core.data.multihop import load_fanoutqa_dev, load_flashrag
from arft_core.data.search_import import detect_format, import_search
from arft_core.data.search_sample import SAMPLE_FORMATS, SAMPLE_ITEMS, check_sample_answers, write_sample


def _comparable(items: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in item.items() if k != "source_format"} for item in items),
                  key=lambda item: item["id"])


def _jsonl_export(tmp_path: Path) -> tuple[Path, list[dict]]:
    """The sample as JSONL, plus its rows (to edit into bad exports)."""
    path = write_sample(tmp_path, "jsonl")
    return path, [json.loads(line) for line in path.read_text().splitlines()]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_all_formats_give_the_same_manifest(tmp_path: Path) -> None:
    manifests = {}
    for fmt in SAMPLE_FORMATS:
        export = write_sample(tmp_path / fmt, fmt)
        assert detect_format(export) == fmt
        result = import_search(export, tmp_path / fmt, tmp_path / "store")
        assert result.quarantined == []
        assert {item["source_format"] for item in result.items} == {fmt}
        manifests[fmt] = _comparable(result.items)
    first = manifests["mat-json"]
    assert len(first) == len(SAMPLE_ITEMS) >= 30
    for fmt in SAMPLE_FORMATS[1:]:
        assert manifests[fmt] == first, fmt
    by_id = {item["id"]: item for item in first}
    scream = by_id["ms-018"]
    assert scream["split"] == "hard" and scream["answers"] == ["Oslo"]
    assert scream["gold"] == {"queries": ["The Scream artist", "Edvard Munch nationality", "capital of Norway"],
                              "answer": "Oslo"}
    assert by_id["ms-007"]["answers"] == ["Uffizi Gallery", "Uffizi"]
    for item in first:
        assert (tmp_path / "store" / item["image_path"]).is_file()
        assert item["image_path"] == f"images/{item['image_sha256']}.png"


def test_corrupted_export_quarantines_exactly_the_bad_rows(tmp_path: Path) -> None:
    path, rows = _jsonl_export(tmp_path)
    (tmp_path / rows[1]["image_path"]).unlink()                 # ms-002: missing image
    rows[2] = {**rows[2], "answer": ""}                          # ms-003: empty answer
    rows[4] = {**rows[4], "id": rows[3]["id"]}                   # row 5 reuses ms-004's id
    rows[5] = '{"id": "ms-006", "question": "broken'            # ms-006: not JSON
    rows[6] = {**rows[6], "queries": ["ok", ""]}                 # ms-007: an empty gold query
    rows[7] = {**rows[7], "question": "  "}                      # ms-008: empty question
    result = import_search(_write_jsonl(path, rows), tmp_path, tmp_path / "store")

    bad = {(q["item"], q["field"]) for q in result.quarantined}
    assert bad == {("ms-002", "image_path"), ("ms-003", "answer"), ("ms-004", "id"), ("row 6", "(row)"),
                   ("ms-007", "queries"), ("ms-008", "question")}
    reasons = {q["item"]: q["reason"] for q in result.quarantined}
    assert reasons["ms-002"].startswith("item ms-002: field 'image_path': image not found")
    assert reasons["ms-004"] == ("item ms-004: field 'id': duplicate id: row 5 ('ms-004') and row 4 ('ms-004') "
                                 "are the same id")
    assert "line 6 is not valid JSON" in reasons["row 6"]
    assert len(result.items) == len(SAMPLE_ITEMS) - 6
    assert [i["id"] for i in result.items][:3] == ["ms-001", "ms-004", "ms-009"]


def test_undecodable_image_and_bad_split_are_quarantined(tmp_path: Path) -> None:
    path, rows = _jsonl_export(tmp_path)
    (tmp_path / rows[0]["image_path"]).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows[1] = {**rows[1], "split": "medium"}
    rows[2] = {**rows[2], "queries": "a single string"}
    result = import_search(_write_jsonl(path, rows), tmp_path, tmp_path / "store")
    assert {(q["item"], q["field"]) for q in result.quarantined} == {
        ("ms-001", "image_path"), ("ms-002", "split"), ("ms-003", "queries")}
    assert "does not decode" in result.quarantined[0]["reason"]


def test_whole_file_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        import_search(tmp_path / "nope.json", tmp_path, tmp_path / "store")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="broken.json"):
        import_search(broken, tmp_path, tmp_path / "store")


def test_reimport_is_idempotent_and_extra_items_are_appended(tmp_path: Path) -> None:
    path, rows = _jsonl_export(tmp_path)
    first = import_search(_write_jsonl(path, rows[:-2]), tmp_path, tmp_path / "store").items
    again = import_search(path, tmp_path, tmp_path / "store", previous=first).items
    assert json.dumps(again) == json.dumps(first)

    grown = import_search(_write_jsonl(path, rows), tmp_path, tmp_path / "store", previous=first).items
    assert grown[:len(first)] == first
    assert [i["id"] for i in grown[len(first):]] == [rows[-2]["id"], rows[-1]["id"]]


def test_missing_ids_split_by_position_and_hashed_partition(tmp_path: Path) -> None:
    path, rows = _jsonl_export(tmp_path)
    plain = [{"question": r["question"], "answer": r["answer"][0], "image_path": r["image_path"]} for r in rows[:10]]
    result = import_search(_write_jsonl(path, plain), tmp_path, tmp_path / "store", test_fraction=0.3)
    assert result.quarantined == []
    ids = [i["id"] for i in result.items]
    assert all(i.startswith("h-") and len(i) == 14 for i in ids) and len(set(ids)) == 10
    assert [i["split"] for i in result.items] == ["simple"] * 5 + ["hard"] * 5
    assert all(i["gold"] is None for i in result.items)
    again = import_search(path, tmp_path, tmp_path / "store", test_fraction=0.3)
    assert again.items == result.items
    # The split of an item stays what it was when the file grows (positions shift).
    grown = import_search(_write_jsonl(path, plain + [{**plain[0], "question": "Another question?"}]),
                          tmp_path, tmp_path / "store", previous=result.items, test_fraction=0.3)
    assert grown.items[:10] == result.items and len(grown.items) == 11
    sample = import_search(write_sample(tmp_path / "s", "csv"), tmp_path / "s", tmp_path / "store",
                           fields={"partition": "no-such-column"}, test_fraction=0.5).items
    n_test = sum(i["partition"] == "test" for i in sample)
    assert 0 < n_test < len(sample)


def test_same_image_is_stored_once(tmp_path: Path) -> None:
    path, rows = _jsonl_export(tmp_path)
    twins = [rows[0], {**rows[1], "image_path": rows[0]["image_path"]}]
    result = import_search(_write_jsonl(path, twins), tmp_path, tmp_path / "store")
    assert result.items[0]["image_path"] == result.items[1]["image_path"]
    assert len(list((tmp_path / "store" / "images").iterdir())) == 1
    # The sample itself draws a few pictures twice (same book cover, two questions).
    sample = import_search(write_sample(tmp_path / "s", "mat-json"), tmp_path / "s", tmp_path / "store2").items
    stored = list((tmp_path / "store2" / "images").iterdir())
    assert len(stored) == len({i["image_sha256"] for i in sample}) < len(sample)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_hostile_export(tmp_path: Path, hostile_images: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, outside = hostile_images
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda img: decoded.append(img.size) or real_load(img))
    sources = {"ms-1": str(outside), "ms-2": "../secret.png", "ms-3": "link.png", "ms-4": "a/same.png",
               "ms-5": "b/same.png", "11": "a/same.png", " 11": "b/same.png", "ms-8": "huge.png", "ms-9": "twin.png"}
    rows = [{"id": item_id, "question": "Which colour?", "answer": "red", "image_path": path}
            for item_id, path in sources.items()]
    rows.append({"id": 12, "question": "Which colour?", "answer": "red",
                 "image_path": "/data/local-files/?d=../secret.png"})  # as Label Studio writes it, not resolved
    export = _write_jsonl(tmp_path / "export.jsonl", rows)

    result = import_search(export, folder, tmp_path / "store")

    assert [(q["item"], q["field"], q["reason"]) for q in result.quarantined] == [
        ("ms-1", "image_path", f"item ms-1: field 'image_path': path escapes the image folder: {outside}"),
        ("ms-2", "image_path", "item ms-2: field 'image_path': path escapes the image folder: ../secret.png"),
        ("ms-3", "image_path", f"item ms-3: field 'image_path': path escapes the image folder: link.png "
                               f"(resolves to {outside.resolve()})"),
        (" 11", "id", "item  11: field 'id': duplicate id: row 7 (' 11') and row 6 ('11') are the same id "
                      "(ids are compared as text, surrounding whitespace stripped)"),
        ("ms-8", "image_path", "item ms-8: field 'image_path': image size 13000x13000 outside [28, 4096] pixels "
                               "per side (huge.png)"),
        (12, "image_path", "item 12: field 'image_path': path escapes the image folder: "
                           "/data/local-files/?d=../secret.png"),
    ]
    assert [q["row"] for q in result.quarantined] == [rows[i] for i in (0, 1, 2, 6, 7, 9)]
    assert (64, 48) in decoded and (13000, 13000) not in decoded  # the bomb is refused from its header alone

    assert [i["id"] for i in result.items] == ["ms-4", "ms-5", "11", "ms-9"]
    stored = {i["id"]: i["image_path"] for i in result.items}
    for item_id, rel in stored.items():
        assert re.fullmatch(r"images/[0-9a-f]{64}\.png", rel)
        assert (tmp_path / "store" / rel).read_bytes() == (folder / sources[item_id]).read_bytes()
    assert stored["ms-4"] == stored["11"] == stored["ms-9"] != stored["ms-5"]
    assert sorted(p.name for p in (tmp_path / "store" / "images").iterdir()) == sorted({Path(r).name
                                                                                        for r in stored.values()})


def test_label_studio_local_files_stay_inside(tmp_path: Path, hostile_images: tuple[Path, Path]) -> None:
    folder, _ = hostile_images
    tasks = [{"id": n, "data": {"image": f"/data/local-files/?d={ref}", "question": "Which colour?"},
              "annotations": [{"result": [{"from_name": "answer", "value": {"text": ["blue"]}}]}]}
             for n, ref in ((1, "b%2Fsame.png"), (2, "..%2Fsecret.png"), (3, "%2Fetc%2Fpasswd"))]
    export = tmp_path / "tasks.json"
    export.write_text(json.dumps(tasks))
    result = import_search(export, folder, tmp_path / "store")
    assert [i["id"] for i in result.items] == ["1"]
    assert [q["reason"] for q in result.quarantined] == [
        "item 2: field 'image': path escapes the image folder: ../secret.png",
        "item 3: field 'image': path escapes the image folder: /etc/passwd"]
    assert (tmp_path / "store" / result.items[0]["image_path"]).read_bytes() == (folder / "b/same.png").read_bytes()


def test_field_mapping(tmp_path: Path) -> None:
    path, rows = _jsonl_export(tmp_path)
    renamed = [{"qid": r["id"], "q": r["question"], "gold_answer": r["answer"], "img": r["image_path"]}
               for r in rows[:4]]
    result = import_search(_write_jsonl(path, renamed), tmp_path, tmp_path / "store",
                           fields={"id": "qid", "question": "q", "answer": "gold_answer", "image": "img"})
    assert [i["id"] for i in result.items] == ["ms-001", "ms-002", "ms-003", "ms-004"]
    with pytest.raises(ValueError, match="unknown field"):
        import_search(path, tmp_path, tmp_path / "store", fields={"picture": "img"})


def test_flashrag_loader(tmp_path: Path) -> None:
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps({"id": "test_0", "question": "Who wrote Hamlet?", "golden_answers": ["Shakespeare",
                                "William Shakespeare"], "metadata": {"type": "bridge"}}) + "\n\n"
                    + json.dumps({"id": 7, "question": "Year?", "golden_answers": [1813]}) + "\n")
    assert load_flashrag(path) == [
        {"id": "test_0", "question": "Who wrote Hamlet?", "answers": ["Shakespeare", "William Shakespeare"]},
        {"id": "7", "question": "Year?", "answers": ["1813"]}]
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"dev.jsonl:4: not valid JSON"):
        load_flashrag(path)


def test_fanoutqa_dev_loads_offline() -> None:
    items = load_fanoutqa_dev()
    assert len(items) == 310
    assert len({i["id"] for i in items}) == 310
    for item in items:
        assert item["question"] and item["answers"] and all(isinstance(a, str) and a for a in item["answers"])
        assert isinstance(item["decomposition"], list)
    assert any(item["decomposition"] for item in items)


def test_sample_answers_are_in_the_wiki_corpus() -> None:
    assert check_sample_answers() == []
    assert len(SAMPLE_ITEMS) >= 30
    n_hard = sum(i["split"] == "hard" for i in SAMPLE_ITEMS)
    assert abs(n_hard - len(SAMPLE_ITEMS) / 2) <= 2
    assert all(len(i["queries"]) >= 2 for i in SAMPLE_ITEMS if i["split"] == "hard")
    assert 0.15 <= sum(i["partition"] == "test" for i in SAMPLE_ITEMS) / len(SAMPLE_ITEMS) <= 0.3
    assert check_sample_answers([{**SAMPLE_ITEMS[0], "answers": ["Louvre"]}]) != []


def test_sample_images_are_deterministic(tmp_path: Path) -> None:
    a = write_sample(tmp_path / "a", "csv").parent / "images"
    b = write_sample(tmp_path / "b", "csv").parent / "images"
    assert all((a / f.name).read_bytes() == f.read_bytes() for f in b.iterdir())
