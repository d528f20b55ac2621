"""Importers for outside data: the paper's MAT-Coding JSON and a user's VQA set (JSONL or CSV).

An importer never drops valid data because of invalid data: each row is checked on its own, a bad row goes to
quarantine with a message naming the item and the field, and the good rows go on. Only a whole file that is
missing or cannot be parsed raises. Rows are numbered from 1 in file order ("row 3" is the third record).

Rules shared with `arft_core.data.search_import`:

* Image paths are relative to the declared image folder and must stay inside it: an absolute path, a `..`
  component or a symlink that resolves outside the folder quarantines the row.
* Image sizes are read from the file header before any pixel is decoded; an image outside the validation bounds
  (`validation.min_side`/`max_side`, the ones the Great Expectations suite checks) quarantines its row.
* Ids are compared as text with surrounding whitespace stripped (string ids are stored stripped): `11`, `"11"`
  and `" 11"` are one id, and every repeat after the first is quarantined with a reason naming both rows.
* Stored images are content-addressed (`images/<sha256>.<ext>`, a byte-for-byte copy): two different pictures
  never share a file, the same picture used twice is stored once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from arft_core.config import ValidationConfig
from arft_core.data.sources import SourceItem
from arft_core.io import write_json_atomic
from arft_core.protocol import PROBLEM_LABELS, has_cjk

MAT_SPLITS = frozenset({"simple", "hard"})
VQA_FIELDS = ("id", "image", "question", "answers")
CSV_ANSWER_SEPARATOR = "|"

_NUMBER = r"\s*(\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")
# PIL format name -> file extension in the store; other formats fall back to the source file's suffix.
_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class ImportResult:
    items: list[dict] = field(default_factory=list)          # valid rows, normalised
    quarantined: list[dict] = field(default_factory=list)    # {"item", "field", "reason", "row"}

    def write_quarantine(self, path: Path) -> None:
        """Write the quarantined rows as JSON, atomically (a reader never sees half a file)."""
        write_json_atomic(Path(path), self.quarantined)


class _Invalid(Exception):
    """One field of one row is unusable; `reason` says why in words."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field_name
        self.reason = reason


class _Quarantine:
    """Collects quarantined rows with messages of the form "item 71: field 'question': is empty"."""

    def __init__(self) -> None:
        self.entries: list[dict] = []

    def add(self, item: Any, error: _Invalid, row: Any) -> None:
        self.entries.append({"item": item, "field": error.field,
                             "reason": f"{_item_label(item)}: field '{error.field}': {error.reason}", "row": row})


def _item_label(item: Any) -> str:
    return item if isinstance(item, str) and item.startswith("row ") else f"item {item}"


class _Escapes(_Invalid):
    """An image path that leaves the image folder: never tolerated, not even for an optional image."""


def resolve_inside(image_dir: Path, value: str) -> Path:
    """`value` as a path under `image_dir` with symlinks resolved; `ValueError` when it is absolute, has a `..`
    component or resolves outside the folder (a symlink pointing out), so a manifest cannot read other files."""
    if "\x00" in value:
        raise ValueError(f"path has a NUL byte: {value!r}")
    rel = Path(value)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"path escapes the image folder: {value}")
    try:
        root, path = image_dir.resolve(), (image_dir / rel).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ValueError(f"path cannot be resolved: {value} ({type(e).__name__})") from e
    if not path.is_relative_to(root):
        raise ValueError(f"path escapes the image folder: {value} (resolves to {path})")
    return path


def _check_image(image_dir: Path, field_name: str, value: Any, bounds: ValidationConfig | None) -> Path:
    """The image's resolved path inside `image_dir`, once it is known to exist, to have a size within `bounds`
    (read from the header, before decoding) and to decode fully. Without `bounds` only PIL's decompression-bomb
    limit (`Image.MAX_IMAGE_PIXELS`) applies."""
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(field_name, "missing or not a file name")
    try:
        path = resolve_inside(image_dir, value)
    except ValueError as e:
        raise _Escapes(field_name, str(e)) from e
    if not path.is_file():
        raise _Invalid(field_name, f"image not found ({value} under {image_dir})")
    try:
        # Image.open reads only the header; the size check below runs before any pixel is decoded. PIL warns
        # (and above twice its limit raises) for huge images: the size check is the answer to that warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            if bounds is not None and not (bounds.min_side <= min(w, h) and max(w, h) <= bounds.max_side):
                raise _Invalid(field_name, f"image size {w}x{h} outside [{bounds.min_side}, {bounds.max_side}] "
                                           f"pixels per side ({value})")
            if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
                raise _Invalid(field_name, f"image size {w}x{h} is over {Image.MAX_IMAGE_PIXELS} pixels ({value})")
            img.load()  # a full decode: `verify()` misses truncated pixel data
    except _Invalid:
        raise
    except Image.DecompressionBombError as e:  # over twice PIL's limit: refused before the size is returned
        raise _Invalid(field_name, f"image too large to open ({value}: {e})") from e
    except Exception as e:  # PIL raises many types for bad files; each one means "unusable image"
        raise _Invalid(field_name, f"image does not decode ({value}: {type(e).__name__})") from e
    return path


def image_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_extension(path: Path) -> str:
    """The store's extension for an image: from its decoded format, else its suffix."""
    with Image.open(path) as img:
        fmt = img.format or ""
    return _EXTENSIONS.get(fmt, path.suffix.lower().lstrip(".") or "bin")


def store_image(source: Path, sha: str, store_dir: Path) -> str:
    """Copy `source` byte for byte to `store_dir/images/<sha>.<ext>` unless it is there already; returns the
    relative path. Named by content, so different pictures never share a file whatever their source names."""
    rel = f"images/{sha}.{image_extension(source)}"
    dest = store_dir / rel
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{sha}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(source.read_bytes())
            os.replace(tmp, dest)  # same folder, so the rename is atomic: readers see all of the file or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return rel


def _usable_id(value: Any) -> bool:
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, str) and bool(value.strip())))


def _check_id(value: Any, seen: dict[str, tuple[int, Any]], row_number: int, field_name: str = "id") -> int | str:
    """The id, stripped if a string; a repeat of an earlier row's id (compared as stripped text) is invalid."""
    if not _usable_id(value):
        raise _Invalid(field_name, f"must be an integer or a non-empty string, got {value!r}")
    key = str(value).strip()  # 12, "12" and " 12" would name the same item in outputs
    if key in seen:
        first_row, first_value = seen[key]
        how = "" if repr(first_value) == repr(value) else " (ids are compared as text, surrounding whitespace stripped)"
        raise _Invalid(field_name, f"duplicate id: row {row_number} ({value!r}) and row {first_row} "
                                   f"({first_value!r}) are the same id{how}")
    seen[key] = (row_number, value)
    return value.strip() if isinstance(value, str) else value


def _check_question(value: Any, field_name: str = "question") -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(field_name, "missing or empty")
    return value


def _check_answers(value: Any, field_name: str = "answers") -> list[str]:
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not answers:
        raise _Invalid(field_name, f"must be a non-empty list of strings, got {value!r}")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise _Invalid(field_name, f"answer {i} is empty or not a string: {answer!r}")
    return answers


def _check_types(value: Any) -> list[str]:
    # The paper writes a list; a single "rotation90+dark" string (its file-name spelling) is accepted too.
    labels = value.split("+") if isinstance(value, str) else value
    if not isinstance(labels, list) or not labels:
        raise _Invalid("type", f"must be a non-empty list of labels, got {value!r}")
    unknown = [label for label in labels if label not in PROBLEM_LABELS]
    if unknown:
        raise _Invalid("type", f"unknown label(s) {unknown}; known: {', '.join(sorted(PROBLEM_LABELS))}")
    if len(set(labels)) != len(labels):
        raise _Invalid("type", f"repeated label in {labels}")
    if "none" in labels and len(labels) > 1:
        raise _Invalid("type", f"'none' cannot be combined with other labels: {labels}")
    return list(labels)


def _check_split(value: Any, labels: list[str]) -> str:
    if value is None:
        return "simple" if len(labels) == 1 and labels[0] != "crop" else "hard"
    if value not in MAT_SPLITS:
        raise _Invalid("split", f"must be 'simple' or 'hard', got {value!r}")
    return value


def parse_box_norm(question: str) -> list[int | float] | None:
    """The first `[x1, y1, x2, y2]` box in the question, normalised to 0-1000, or None when there is none."""
    for match in _BOX.finditer(question):
        numbers = [float(g) for g in match.groups()]
        x1, y1, x2, y2 = numbers
        if all(0 <= n <= 1000 for n in numbers) and x1 < x2 and y1 < y2:
            return [int(n) if n.is_integer() else n for n in numbers]
    return None


def _mat_item(row: Any, image_dir: Path, seen: dict[str, tuple[int, Any]], row_number: int,
              bounds: ValidationConfig) -> dict:
    if not isinstance(row, dict):
        raise _Invalid("(row)", f"must be a JSON object, got {type(row).__name__}")
    if "id" not in row:
        raise _Invalid("id", "missing")
    item_id = _check_id(row["id"], seen, row_number)
    question = _check_question(row.get("question"))
    if "answers" not in row:
        raise _Invalid("answers", "missing")
    answers = _check_answers(row["answers"])
    labels = _check_types(row.get("type"))
    split = _check_split(row.get("split"), labels)
    # The image the model sees must be good; the other one is only provenance, and the paper's demo lacks it.
    evaluated, other = (("ori_image_path", "processed_image_path") if labels[0] == "crop"
                        else ("processed_image_path", "ori_image_path"))
    _check_image(image_dir, evaluated, row.get(evaluated), bounds)
    try:
        _check_image(image_dir, other, row.get(other), bounds)
        other_path = row[other]
    except _Escapes:
        raise
    except _Invalid:
        other_path = None
    item = {**row, "id": item_id, "question": question, "answers": answers, "type": labels, "split": split,
            evaluated: row[evaluated], other: other_path}
    if labels[0] == "crop":
        box = parse_box_norm(question)
        if box is None:
            raise _Invalid("question", "crop item has no [x1, y1, x2, y2] box (0-1000, x1 < x2, y1 < y2)")
        item["box_norm"] = box
    return item


def _row_label(row: Any, row_number: int, id_field: str = "id") -> Any:
    """How a quarantine entry names a row: its id when it has a usable one, else its position."""
    value = row.get(id_field) if isinstance(row, dict) else None
    return value if _usable_id(value) else f"row {row_number}"


def import_mat_coding(json_path: Path, image_dir: Path, store_dir: Path | None = None,
                      bounds: ValidationConfig | None = None) -> ImportResult:
    """Import the paper's MAT-Coding JSON (`id, question, answers, ori_image_path, processed_image_path, type,
    split`); image paths are relative to `image_dir`. Crop items gain `box_norm` parsed from the question.

    Images must have sides within `bounds` (default: `ValidationConfig()`'s). With `store_dir`, each valid item's
    images are copied to `store_dir/images/<sha256>.<ext>` and its paths rewritten to those."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    bounds = ValidationConfig() if bounds is None else bounds
    rows = _load_json(json_path)
    if not isinstance(rows, list):
        raise ValueError(f"{json_path}: expected a JSON list of items, got {type(rows).__name__}")
    _require_dir(image_dir)
    result, quarantine, seen = ImportResult(), _Quarantine(), {}
    for row_number, row in enumerate(rows, start=1):
        try:
            result.items.append(_mat_item(row, image_dir, seen, row_number, bounds))
        except _Invalid as e:
            quarantine.add(_row_label(row, row_number), e, row)
    result.quarantined = quarantine.entries
    if store_dir is not None:
        for item in result.items:
            for key in ("ori_image_path", "processed_image_path"):
                if item[key] is not None:
                    source = resolve_inside(image_dir, item[key])
                    item[key] = store_image(source, image_sha256(source), Path(store_dir))
    return result


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse {path}: {e}") from e


def _require_dir(image_dir: Path) -> None:
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")


def _jsonl_rows(path: Path) -> list[tuple[Any, str | None]]:
    """(row, parse error) per non-blank line: a bad line is one bad row, not a bad file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot parse {path}: {e}") from e
    rows: list[tuple[Any, str | None]] = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line), None))
        except json.JSONDecodeError as e:
            rows.append((line, f"line {line_number} is not valid JSON ({e.msg})"))
    return rows


def _csv_rows(path: Path, columns: dict[str, str]) -> list[tuple[Any, str | None]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [columns[name] for name in ("image", "question", "answers") if columns[name] not in header]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
            return [(row, None) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot parse {path}: {e}") from e


def _vqa_item(row: Any, image_dir: Path, columns: dict[str, str], csv_answers: bool,
              seen: dict[str, tuple[int, Any]], row_number: int) -> dict:
    if not isinstance(row, dict):
        raise _Invalid("(row)", f"must be a JSON object, got {type(row).__name__}")
    raw_id = row.get(columns["id"])
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        raw_id = f"row-{row_number}"
    item_id = str(_check_id(raw_id, seen, row_number, columns["id"]))
    # No side bounds: a VQA image is a source the generator resizes, not a validated output (bombs are refused).
    _check_image(image_dir, columns["image"], row.get(columns["image"]), None)
    question = _check_question(row.get(columns["question"]), columns["question"]).strip()
    answers_value = row.get(columns["answers"])
    if csv_answers and isinstance(answers_value, str):
        answers_value = answers_value.split(CSV_ANSWER_SEPARATOR)
    if isinstance(answers_value, str):
        answers_value = [answers_value]
    if not isinstance(answers_value, list):
        raise _Invalid(columns["answers"], f"must be a string or a list of strings, got {answers_value!r}")
    if not all(isinstance(a, str) for a in answers_value):
        raise _Invalid(columns["answers"], f"every answer must be a string, got {answers_value!r}")
    answers = [a.strip() for a in answers_value if a.strip()]
    if not answers:
        raise _Invalid(columns["answers"], "no non-empty answer")
    extra = {k: v for k, v in row.items() if k not in columns.values()}
    return {**extra, "id": item_id, "image": row[columns["image"]], "question": question, "answers": answers}


def import_vqa(path: Path, image_dir: Path, fields: dict[str, str] | None = None) -> ImportResult:
    """Import a VQA set, one item per row, from `.jsonl` or `.csv`. `fields` maps our names (id, image, question,
    answers) to the file's; in CSV several answers are joined by `|`. Rows without an id get `row-N`."""
    path, image_dir = Path(path), Path(image_dir)
    unknown = set(fields or {}) - set(VQA_FIELDS)
    if unknown:
        raise ValueError(f"unknown field name(s) {sorted(unknown)} in the mapping; ours are {VQA_FIELDS}")
    columns = {name: name for name in VQA_FIELDS} | dict(fields or {})
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".csv":
        rows = _csv_rows(path, columns)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .jsonl or .csv")
    _require_dir(image_dir)
    result, quarantine, seen = ImportResult(), _Quarantine(), {}
    for row_number, (row, parse_error) in enumerate(rows, start=1):
        try:
            if parse_error is not None:
                raise _Invalid("(row)", parse_error)
            result.items.append(_vqa_item(row, image_dir, columns, suffix == ".csv", seen, row_number))
        except _Invalid as e:
            quarantine.add(_row_label(row, row_number, columns["id"]), e, row)
    result.quarantined = quarantine.entries
    return result


class VqaImport:
    """An imported VQA set as a `Source`: each sample is one valid row, chosen with the generator."""

    name = "vqa-import"

    def __init__(self, path: Path, image_dir: Path, fields: dict[str, str] | None = None) -> None:
        self.path, self.image_dir = Path(path), Path(image_dir)
        self.result = import_vqa(self.path, self.image_dir, fields)
        if not self.result.items:
            first = self.result.quarantined[0]["reason"] if self.result.quarantined else "the file has no rows"
            raise ValueError(f"{self.path}: no valid row ({len(self.result.quarantined)} quarantined; {first})")

    def sample(self, rng: np.random.Generator, index: int) -> SourceItem:
        item = self.result.items[int(rng.integers(len(self.result.items)))]
        with Image.open(self.image_dir / item["image"]) as img:
            image = img.convert("RGB")
        text = item["question"] + "".join(item["answers"])
        return SourceItem(image=image, question=item["question"], answers=list(item["answers"]), source=self.name,
                          source_id=item["id"], lang="zh" if has_cjk(text) else "en")
