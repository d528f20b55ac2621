"""Import of human-written MAT-Search items (multimodal multi-hop VQA) into a content-addressed store.

Four export formats are read:

* ``mat-json``: the paper's ``MAT-Search.json``, a JSON list of ``{id, question, answer, image_path}`` objects
  (``answer`` a string, or a list of acceptable answers); optional ``split``, ``queries`` and ``partition``.
* ``jsonl``: one such object per line.
* ``csv``: one such row per line; several answers are joined by ``|`` and several gold queries by ``||``.
* ``label-studio``: a Label Studio JSON export (a list of tasks) made with this labelling config::

      <View>
        <Image name="image" value="$image"/>
        <Text name="question" value="$question"/>
        <TextArea name="answer" toName="image" maxSubmissions="5"/>   <!-- first = gold, rest = alternatives -->
        <TextArea name="queries" toName="image" maxSubmissions="3"/>  <!-- gold search queries, optional -->
        <Choices name="split" toName="image">
          <Choice value="simple"/><Choice value="hard"/>
        </Choices>
        <Choices name="partition" toName="image">                     <!-- optional -->
          <Choice value="train"/><Choice value="test"/>
        </Choices>
      </View>

  Tasks are ``{"id", "data": {"image", "question", "id"?}, "annotations": [{"result": [...]}]}``. The first
  annotation that is not cancelled is used; its results are looked up by ``from_name`` (textarea ``value.text``,
  choices ``value.choices``) and override same-named ``data`` keys. The item id is ``data.id`` when the task data
  carries one (ids written by the annotators survive a re-upload), else Label Studio's task id. Image references
  of the form ``/data/local-files/?d=<path>`` are resolved to ``<path>`` under ``image_dir``.

Every row is checked on its own (see `arft_core.data.importers`): a bad row goes to quarantine with a message
naming the item and the field, the others import. Only an unreadable or unparsable whole file raises.

Items out::

    {"id", "question", "answers": [str, ...], "image_path": "images/<sha256>.<ext>", "image_sha256",
     "split": "simple"|"hard", "partition": "train"|"test", "gold": {"queries": [...], "answer"} | None,
     "source_format"}

Images are copied to ``store_dir/images/<sha256>.<ext>``, so the same picture used by two items is stored once.
Image paths, image sizes and ids follow the rules of `arft_core.data.importers` (paths stay inside ``image_dir``,
sides within the validation bounds, ids compared with surrounding whitespace stripped).
"""

from __future__ import annotations

import csv
import hashlib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arft_core.config import ValidationConfig
from arft_core.data.importers import (
    ImportResult,
    _check_id,
    _check_image,
    _check_question,
    _Invalid,
    _jsonl_rows,
    _load_json,
    _Quarantine,
    _require_dir,
    _usable_id,
    image_sha256,
    store_image,
)

SEARCH_FIELDS = ("id", "question", "answer", "image", "split", "queries", "partition")
FORMATS = ("mat-json", "jsonl", "csv", "label-studio")
CSV_ANSWER_SEPARATOR = "|"
CSV_QUERY_SEPARATOR = "||"
SPLITS = ("simple", "hard")
PARTITIONS = ("train", "test")
LABEL_STUDIO_LOCAL_FILES = "/data/local-files/?d="


def default_fields(fmt: str) -> dict[str, str]:
    """Our field name -> the export's, for a format (Label Studio calls the image `image`, the paper `image_path`)."""
    return {name: name for name in SEARCH_FIELDS} | {"image": "image" if fmt == "label-studio" else "image_path"}


def detect_format(export: Path) -> str:
    """The format of `export`: by suffix (.jsonl, .csv) and, for .json, by content (Label Studio tasks have `data`)."""
    suffix = export.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        rows = _load_json(export)
        first = rows[0] if isinstance(rows, list) and rows else None
        return "label-studio" if isinstance(first, dict) and isinstance(first.get("data"), dict) else "mat-json"
    raise ValueError(f"{export}: cannot tell the format from suffix {suffix!r}; pass one of {', '.join(FORMATS)}")


@dataclass
class _Row:
    """One export record before checking: its values by our field names (None = absent) and what to quarantine."""

    number: int
    values: dict[str, Any]
    raw: Any
    error: str | None = None


def _read_rows(export: Path, fmt: str, fields: dict[str, str]) -> list[_Row]:
    if fmt == "jsonl":
        return [_Row(n, _pick(row, fields), row, err) for n, (row, err) in enumerate(_jsonl_rows(export), start=1)]
    if fmt == "csv":
        return [_Row(n, _csv_values(row, fields), row) for n, row in enumerate(_csv_dicts(export), start=1)]
    data = _load_json(export)
    if not isinstance(data, list):
        raise ValueError(f"{export}: expected a JSON list of {'tasks' if fmt == 'label-studio' else 'items'}, "
                         f"got {type(data).__name__}")
    if fmt == "label-studio":
        return [_label_studio_row(n, task, fields) for n, task in enumerate(data, start=1)]
    return [_Row(n, _pick(row, fields), row) for n, row in enumerate(data, start=1)]


def _pick(row: Any, fields: dict[str, str]) -> dict[str, Any]:
    return {ours: row.get(theirs) for ours, theirs in fields.items()} if isinstance(row, dict) else {}


def _csv_dicts(export: Path) -> list[dict[str, str]]:
    try:
        with export.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot parse {export}: {e}") from e


def _csv_values(row: dict[str, str], fields: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {ours: (row.get(theirs) or None) for ours, theirs in fields.items()}
    if isinstance(values["answer"], str):
        values["answer"] = [a.strip() for a in values["answer"].split(CSV_ANSWER_SEPARATOR)]
    if isinstance(values["queries"], str):
        values["queries"] = [q.strip() for q in values["queries"].split(CSV_QUERY_SEPARATOR)]
    return values


def _label_studio_row(number: int, task: Any, fields: dict[str, str]) -> _Row:
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        return _Row(number, {}, task, "must be a Label Studio task with a `data` object")
    data = task["data"]
    annotation = next((a for a in task.get("annotations") or []
                       if isinstance(a, dict) and not a.get("was_cancelled")), None)
    results: dict[str, Any] = {}
    for result in (annotation or {}).get("result") or []:
        value = result.get("value") if isinstance(result, dict) else None
        if not isinstance(value, dict):
            continue
        name = result.get("from_name")
        if "text" in value:
            texts = value["text"] if isinstance(value["text"], list) else [value["text"]]
            results.setdefault(name, []).extend(texts)
        elif "choices" in value and value["choices"]:
            results[name] = value["choices"][0]
    merged = {**data, **results}
    values = {ours: merged.get(theirs) for ours, theirs in fields.items()}
    if values["id"] is None:
        values["id"] = task.get("id")
    if isinstance(values["image"], str) and values["image"].startswith(LABEL_STUDIO_LOCAL_FILES):
        values["image"] = urllib.parse.unquote(values["image"][len(LABEL_STUDIO_LOCAL_FILES):])
    if isinstance(values["split"], list) and len(values["split"]) == 1:
        values["split"] = values["split"][0]
    if isinstance(values["partition"], list) and len(values["partition"]) == 1:
        values["partition"] = values["partition"][0]
    error = None if annotation is not None else "no annotation that is not cancelled"
    return _Row(number, values, task, error)


def _answers(value: Any, field_name: str) -> list[str]:
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not answers:
        raise _Invalid(field_name, f"missing or empty, got {value!r}")
    if not all(isinstance(a, str) for a in answers):
        raise _Invalid(field_name, f"every answer must be a string, got {answers!r}")
    cleaned = [a.strip() for a in answers]
    if not cleaned[0]:
        raise _Invalid(field_name, "the (first) answer is empty")
    return [a for a in cleaned if a]


def _queries(value: Any, field_name: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise _Invalid(field_name, f"gold queries must be a non-empty list of strings, got {value!r}")
    for i, query in enumerate(value):
        if not isinstance(query, str) or not query.strip():
            raise _Invalid(field_name, f"gold query {i} is empty or not a string: {query!r}")
    return [q.strip() for q in value]


def _choice(value: Any, field_name: str, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.strip().lower() not in allowed:
        raise _Invalid(field_name, f"must be one of {', '.join(allowed)} (any case), got {value!r}")
    return value.strip().lower()


def hash_partition(image_sha256: str, test_fraction: float) -> str:
    """'test' for about `test_fraction` of images, decided by the image's hash alone: stable across re-imports,
    and every question about one image lands on the same side (no train/test image overlap)."""
    bucket = int(hashlib.sha256(f"partition:{image_sha256}".encode()).hexdigest()[:8], 16) / 2**32
    return "test" if bucket < test_fraction else "train"


def _check_row(row: _Row, image_dir: Path, fields: dict[str, str], seen: dict[str, tuple[int, Any]],
               position_split: str, test_fraction: float, bounds: ValidationConfig) -> tuple[dict, Path, bool]:
    """(item without its stored image path, the source image, whether the split came from the export)."""
    if row.error is not None:
        raise _Invalid("(row)", row.error)
    if not isinstance(row.raw, dict):
        raise _Invalid("(row)", f"must be an object, got {type(row.raw).__name__}")
    v = row.values
    question = _check_question(v["question"], fields["question"]).strip()
    answers = _answers(v["answer"], fields["answer"])
    image = _check_image(image_dir, fields["image"], v["image"], bounds)
    queries = _queries(v["queries"], fields["queries"])
    split = _choice(v["split"], fields["split"], SPLITS)
    partition = _choice(v["partition"], fields["partition"], PARTITIONS)
    sha = image_sha256(image)
    raw_id = v["id"]
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        raw_id = "h-" + hashlib.sha256((question + sha).encode()).hexdigest()[:12]
    item_id = str(_check_id(raw_id, seen, row.number, fields["id"]))
    item = {
        "id": item_id,
        "question": question,
        "answers": answers,
        "image_path": None,
        "image_sha256": sha,
        "split": split or position_split,
        "partition": partition or hash_partition(sha, test_fraction),
        "gold": {"queries": queries, "answer": answers[0]} if queries else None,
    }
    return item, image, split is not None


def import_search(export: Path, image_dir: Path, store_dir: Path, fmt: str = "auto",
                  fields: dict[str, str] | None = None, previous: list[dict] | None = None,
                  test_fraction: float = 0.5, bounds: ValidationConfig | None = None) -> ImportResult:
    """Import a MAT-Search annotation export (see the module docstring for the formats).

    `image_dir` is the folder the export's image paths are relative to; images are copied into `store_dir/images/`
    by content hash. `fields` maps our names (id, question, answer, image, split, queries, partition) to the
    export's. Rows without an id get ``h-`` + 12 hex digits of sha256(question + image hash).

    Split: an explicit `split` field wins; otherwise the paper's convention, by position in the file: the first
    half of the rows is Simple, the second half Hard. Partition: an explicit `partition` field wins; otherwise an
    id-hash puts about `test_fraction` of the items in test.

    Image paths must stay inside `image_dir` and images must have sides within `bounds` (default:
    `ValidationConfig()`'s, the bounds the search manifest's validation checks); other rows are quarantined.

    With `previous` (an earlier import's items) the result lists the previous items first, in their order, then
    the export's new items in file order. A previous item the export has again is re-read (edits are taken) but
    keeps its position and, when its split came from the position, its split; one the export lacks is kept as it
    was. Re-importing the same export therefore gives the identical manifest.
    """
    export, image_dir, store_dir = Path(export), Path(image_dir), Path(store_dir)
    if not export.is_file():
        raise FileNotFoundError(f"file not found: {export}")
    fmt = detect_format(export) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    unknown = set(fields or {}) - set(SEARCH_FIELDS)
    if unknown:
        raise ValueError(f"unknown field name(s) {sorted(unknown)} in the mapping; ours are {SEARCH_FIELDS}")
    columns = default_fields(fmt) | dict(fields or {})
    rows = _read_rows(export, fmt, columns)
    _require_dir(image_dir)
    bounds = ValidationConfig() if bounds is None else bounds

    quarantine, seen = _Quarantine(), {}
    fresh: dict[str, dict] = {}
    explicit_split: set[str] = set()
    n_simple = (len(rows) + 1) // 2
    for index, row in enumerate(rows):
        try:
            item, image, explicit = _check_row(row, image_dir, columns, seen, SPLITS[index >= n_simple],
                                               test_fraction, bounds)
        except _Invalid as e:
            label = row.values.get("id")
            quarantine.add(label if _usable_id(label) else f"row {row.number}", e, row.raw)
            continue
        item["image_path"] = store_image(image, item["image_sha256"], store_dir)
        item["source_format"] = fmt
        fresh[item["id"]] = item
        if explicit:
            explicit_split.add(item["id"])

    items: list[dict] = []
    for old in previous or []:
        new = fresh.pop(str(old["id"]), None)
        if new is None:
            items.append(old)
        else:
            if new["id"] not in explicit_split:
                new["split"] = old["split"]
            items.append(new)
    items.extend(fresh.values())
    return ImportResult(items=items, quarantined=quarantine.entries)
