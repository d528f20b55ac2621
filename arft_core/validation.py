"""Great Expectations suite over the MAT-Coding manifests.

Each item becomes one row of checkable facts (image status strings, answer counts, label strings, teacher
status), so that a failed expectation lists the offending item ids and values, and the report names the item
and the expectation. Rows that break a row-level expectation are quarantined with their reasons; table-level
expectations (row count, split counts) fail the manifest as a whole.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from PIL import Image

from arft_core.config import ValidationConfig

TEACHER_STEP = re.compile(r"^<think>.*?</think>\s*<(problem|code|answer)>.*</\1>$", re.DOTALL)


class ValidationFailed(RuntimeError):
    """The manifests broke expectations; the message is the readable report."""


def _image_status(data_dir: Path, rel: object, cfg: ValidationConfig | None = None) -> str:
    if not isinstance(rel, str) or not rel:
        return "missing path"
    path = data_dir / rel
    if not path.is_file():
        return f"file not found: {rel}"
    try:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
    except Exception as exc:  # any decoder error means the image is unusable
        return f"does not decode: {rel} ({type(exc).__name__})"
    if cfg is not None and not (cfg.min_side <= min(w, h) and max(w, h) <= cfg.max_side):
        return f"size {w}x{h} outside [{cfg.min_side}, {cfg.max_side}]: {rel}"
    return "ok"


def _teacher_status(item: dict) -> str:
    """'ok', 'absent' (imported benchmark items) or what is wrong with the trajectory."""
    t = item.get("teacher")
    if t is None:
        return "absent"
    steps = [("problem", t.get("problem")), ("answer", t.get("answer"))]
    if item.get("type") != ["none"]:
        steps.insert(1, ("code_step", t.get("code_step")))
    for name, text in steps:
        if not isinstance(text, str) or not TEACHER_STEP.match(text.strip()):
            return f"malformed {name} step"
    if t.get("code_step") and "```python" not in t["code_step"]:
        return "code step without a python block"
    verification = item.get("verification") or {}
    if verification and not verification.get("kept"):
        return f"teacher fix not verified: {verification.get('reason')}"
    return "ok"


def seen_image(item: dict) -> object:
    """The image the model is evaluated on (spec §5.2): the clean one for crop items, else the processed one."""
    types = item.get("type")
    crop = isinstance(types, list) and types[:1] == ["crop"]
    return item.get("ori_image_path") if crop else item.get("processed_image_path")


def manifest_frame(items: list[dict], data_dir: Path, cfg: ValidationConfig | None = None,
                   other_phashes: set[str] | None = None) -> pd.DataFrame:
    """One row per item with the facts the suite checks."""
    rows = []
    for pos, item in enumerate(items):
        answers = item.get("answers")
        answers = answers if isinstance(answers, list) else []
        types = item.get("type")
        ori = item.get("ori_image_path")
        rows.append({
            "id": item.get("id", f"<missing id at position {pos}>"),
            "question": str(item.get("question") or ""),
            "n_answers": sum(isinstance(a, str) and a.strip() != "" for a in answers),
            "type": "+".join(types) if isinstance(types, list) and types else "",
            "split": item.get("split"),
            "is_hard": int(item.get("split") == "hard"),
            "image": _image_status(data_dir, seen_image(item), cfg),
            # The other image may be absent in imported benchmark items (the paper ships only the one used).
            "ori_image": "ok" if ori is None and "teacher" not in item else _image_status(data_dir, ori, cfg),
            "teacher": _teacher_status(item),
            "in_other_split": bool(other_phashes) and item.get("phash") in other_phashes,
        })
    df = pd.DataFrame(rows)
    if not df.empty:
        df["id"] = df["id"].astype(str)
    return df


ROW_WHAT = {
    ("expect_column_values_to_be_unique", "id"): "duplicate id",
    ("expect_column_value_lengths_to_be_between", "question"): "empty question",
    ("expect_column_values_to_be_between", "n_answers"): "no non-empty answer",
    ("expect_column_values_to_match_regex", "type"): "unknown corruption label in type",
    ("expect_column_values_to_be_in_set", "in_other_split"): "image also in the other split",
}


def build_suite(cfg: ValidationConfig, expected: dict | None = None, name: str = "mat_coding_manifest"):
    """Row-level expectations, plus table-level ones when the expected size and Hard share are given."""
    import great_expectations as gx

    labels = "|".join(re.escape(label) for label in cfg.known_labels)
    suite = gx.ExpectationSuite(name=name)
    for exp in (
        gx.expectations.ExpectColumnValuesToBeUnique(column="id"),
        gx.expectations.ExpectColumnValueLengthsToBeBetween(column="question", min_value=1),
        gx.expectations.ExpectColumnValuesToBeBetween(column="n_answers", min_value=1),
        gx.expectations.ExpectColumnValuesToMatchRegex(column="type", regex=rf"^(?:{labels})(?:\+(?:{labels}))*$"),
        gx.expectations.ExpectColumnValuesToBeInSet(column="split", value_set=["simple", "hard"]),
        gx.expectations.ExpectColumnValuesToBeInSet(column="image", value_set=["ok"]),
        gx.expectations.ExpectColumnValuesToBeInSet(column="ori_image", value_set=["ok"]),
        gx.expectations.ExpectColumnValuesToBeInSet(column="teacher", value_set=["ok", "absent"]),
        gx.expectations.ExpectColumnValuesToBeInSet(column="in_other_split", value_set=[False]),
    ):
        suite.add_expectation(exp)
    if expected:
        n, hard = expected["n"], expected["hard"]
        suite.add_expectation(gx.expectations.ExpectTableRowCountToEqual(value=n))
        # Exactly `hard` Hard items: the mean of a 0/1 column pins the count.
        suite.add_expectation(gx.expectations.ExpectColumnMeanToBeBetween(column="is_hard", min_value=hard / n,
                                                                          max_value=hard / n))
    return suite


def _context(docs_dir: Path | None):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(site_name="arft", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    return context


def search_frame(items: list[dict], data_dir: Path, cfg: ValidationConfig | None = None,
                 other_hashes: set[str] | None = None) -> pd.DataFrame:
    """One row per MAT-Search item with the facts the search suite checks."""
    rows = []
    for pos, item in enumerate(items):
        answers = item.get("answers") if isinstance(item.get("answers"), list) else []
        gold = item.get("gold")
        queries = gold.get("queries") if isinstance(gold, dict) else None
        if gold is None:
            gold_status = "absent"
        elif isinstance(queries, list) and queries and all(isinstance(q, str) and q.strip() for q in queries):
            gold_status = "ok"
        else:
            gold_status = "malformed queries"
        rows.append({
            "id": item.get("id", f"<missing id at position {pos}>"),
            "question": str(item.get("question") or ""),
            "n_answers": sum(isinstance(a, str) and a.strip() != "" for a in answers),
            "split": item.get("split"),
            "is_hard": int(item.get("split") == "hard"),
            "image": _image_status(data_dir, item.get("image_path"), cfg),
            "gold": gold_status,
            "in_other_split": bool(other_hashes) and item.get("image_sha256") in other_hashes,
        })
    df = pd.DataFrame(rows)
    if not df.empty:
        df["id"] = df["id"].astype(str)
    return df


def build_search_suite(cfg: ValidationConfig, expected: dict | None = None, name: str = "mat_search_manifest"):
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=name)
    for exp in (
        gx.expectations.ExpectColumnValuesToBeUnique(column="id"),
        gx.expectations.ExpectColumnValueLengthsToBeBetween(column="question", min_value=1),
        gx.expectations.ExpectColumnValuesToBeBetween(column="n_answers", min_value=1),
        gx.expectations.ExpectColumnValuesToBeInSet(column="split", value_set=["simple", "hard"]),
        gx.expectations.ExpectColumnValuesToBeInSet(column="image", value_set=["ok"]),
        gx.expectations.ExpectColumnValuesToBeInSet(column="gold", value_set=["ok", "absent"]),
        gx.expectations.ExpectColumnValuesToBeInSet(column="in_other_split", value_set=[False]),
    ):
        suite.add_expectation(exp)
    return suite


# Each dataset kind: (frame builder, suite builder, the item field holding the image identity for overlap checks).
KINDS = {
    "coding": (manifest_frame, build_suite, "phash"),
    "search": (search_frame, build_search_suite, "image_sha256"),
}


def validate_manifests(manifests: dict[str, list[dict]], data_dir: Path, cfg: ValidationConfig,
                       expected: dict[str, dict] | None = None, docs_dir: Path | None = None,
                       kind: str = "coding", context=None) -> dict:
    """Run the suite of `kind` on each manifest. Returns the report: `success`, per-manifest failures with item
    ids, and `quarantined` (item id -> reasons) for rows that broke row-level expectations. With `docs_dir`, Data
    Docs (HTML) are written there. Pass `context` to validate several kinds into one Data Docs site."""
    import great_expectations as gx

    frame_fn, suite_fn, image_key = KINDS[kind]
    own_context = context is None
    context = context or _context(docs_dir)
    source = context.data_sources.add_pandas(f"{kind}_manifests")
    hashes = {name: {i.get(image_key) for i in items if i.get(image_key)} for name, items in manifests.items()}
    report: dict = {"success": True, "manifests": {}, "quarantined": {}}
    for name, items in manifests.items():
        others = set().union(*(h for other, h in hashes.items() if other != name))
        df = frame_fn(items, data_dir, cfg, others)
        suite = context.suites.add(suite_fn(cfg, (expected or {}).get(name), name=f"{kind}_{name}_manifest"))
        batch_def = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(f"{kind}_{name}_batch")
        vd = context.validation_definitions.add(gx.ValidationDefinition(name=f"{kind}_{name}_validation",
                                                                        data=batch_def, suite=suite))
        result = vd.run(batch_parameters={"dataframe": df},
                        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]})
        failures, quarantined = [], {}
        for r in result.results:
            if r.success:
                continue
            exp_type, column = r.expectation_config.type, r.expectation_config.kwargs.get("column")
            idx = r.result.get("unexpected_index_list") or []
            ids = list(dict.fromkeys(str(x["id"]) if isinstance(x, dict) else str(x) for x in idx))
            messages = _explain(exp_type, column, df, ids) if ids else [_explain_table(exp_type, r.result, r)]
            failures.append({"expectation": exp_type, "column": column, "item_ids": ids, "messages": messages})
            if ids:  # row-level: these items are quarantined; a table-level failure has none
                for item_id, message in zip(ids, messages, strict=True):
                    quarantined.setdefault(item_id, []).append(message)
        report["manifests"][name] = {"n_items": len(items), "success": bool(result.success), "failures": failures,
                                     "quarantined": len(quarantined)}
        report["quarantined"][name] = quarantined
        table_failed = any(not f["item_ids"] for f in failures)
        share = len(quarantined) / max(len(items), 1)
        report["success"] &= not table_failed and share <= cfg.max_quarantined_fraction
    if docs_dir is not None and own_context:
        context.build_data_docs(site_names=["arft"])
        report["data_docs"] = str(docs_dir / "index.html")
    return report


def new_context(docs_dir: Path | None = None):
    """A GX context shared by several `validate_manifests` calls (one Data Docs site for all)."""
    return _context(docs_dir)


def _explain(exp_type: str, column: str, df: pd.DataFrame, ids: list[str]) -> list[str]:
    """One line per failing item: its id, the field, the value found, and the expectation."""
    what = ROW_WHAT.get((exp_type, column), f"bad {column}")
    lines = []
    for item_id in ids:
        value = df.loc[df["id"] == item_id, column].iloc[0]
        value = value.item() if hasattr(value, "item") else value  # numpy scalar -> plain value
        lines.append(f"item id={item_id}: {what} ({column}={value!r}) [{exp_type}]")
    return lines


def _explain_table(exp_type: str, result: dict, r) -> str:
    observed = result.get("observed_value")
    kwargs = {k: v for k, v in r.expectation_config.kwargs.items() if k not in ("batch_id",)}
    return f"manifest: {exp_type} {kwargs} observed {observed!r}"


def format_report(report: dict) -> str:
    if report["success"] and not any(report.get("quarantined", {}).values()):
        n = sum(m["n_items"] for m in report["manifests"].values())
        return f"validation passed: {n} items in {len(report['manifests'])} manifests meet every expectation"
    lines = ["validation passed with quarantined items:" if report["success"] else "validation failed:"]
    for name, m in report["manifests"].items():
        for f in m["failures"]:
            lines += [f"  [{name}] {msg}" for msg in f["messages"]]
    return "\n".join(lines)


def merge_reports(reports: dict[str, dict]) -> dict:
    """One report over several kinds: manifests and quarantines are keyed `<kind>/<manifest>`."""
    merged: dict = {"success": all(r["success"] for r in reports.values()), "manifests": {}, "quarantined": {}}
    for kind, r in reports.items():
        for name, m in r["manifests"].items():
            merged["manifests"][f"{kind}/{name}"] = m
        for name, q in r["quarantined"].items():
            merged["quarantined"][f"{kind}/{name}"] = q
    return merged
