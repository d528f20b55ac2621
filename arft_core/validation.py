"""Great Expectations suite over the MAT-Coding manifests.

Each item becomes one row of checkable facts (image status strings, answer counts, label strings), so that a
failed expectation lists the offending item ids and values, and the report names the item and the expectation.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from PIL import Image

from arft_core.config import ValidationConfig


class ValidationFailed(RuntimeError):
    """The manifests broke expectations; the message is the readable report."""


def _image_status(data_dir: Path, rel: object) -> str:
    if not isinstance(rel, str) or not rel:
        return "missing path"
    path = data_dir / rel
    if not path.is_file():
        return f"file not found: {rel}"
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # any decoder error means the image is unusable
        return f"does not decode: {rel} ({type(exc).__name__})"
    return "ok"


def manifest_frame(items: list[dict], data_dir: Path) -> pd.DataFrame:
    """One row per item with the facts the suite checks."""
    rows = []
    for pos, item in enumerate(items):
        answers = item.get("answers")
        answers = answers if isinstance(answers, list) else []
        types = item.get("type")
        rows.append({
            "id": item.get("id", f"<missing id at position {pos}>"),
            "question": str(item.get("question") or ""),
            "n_answers": sum(isinstance(a, str) and a.strip() != "" for a in answers),
            "type": "+".join(types) if isinstance(types, list) and types else "",
            "split": item.get("split"),
            "processed_image": _image_status(data_dir, item.get("processed_image_path")),
            "ori_image": _image_status(data_dir, item.get("ori_image_path")),
        })
    df = pd.DataFrame(rows)
    df["id"] = df["id"].astype(str)
    return df


def build_suite(cfg: ValidationConfig):
    import great_expectations as gx

    labels = "|".join(re.escape(label) for label in cfg.known_labels)
    suite = gx.ExpectationSuite(name="mat_coding_manifest")
    for exp in (
        gx.expectations.ExpectColumnValuesToBeUnique(column="id"),
        gx.expectations.ExpectColumnValueLengthsToBeBetween(column="question", min_value=1),
        gx.expectations.ExpectColumnValuesToBeBetween(column="n_answers", min_value=1),
        gx.expectations.ExpectColumnValuesToMatchRegex(column="type", regex=rf"^(?:{labels})(?:\+(?:{labels}))*$"),
        gx.expectations.ExpectColumnValuesToBeInSet(column="split", value_set=["simple", "hard"]),
        gx.expectations.ExpectColumnValuesToBeInSet(column="processed_image", value_set=["ok"]),
        gx.expectations.ExpectColumnValuesToBeInSet(column="ori_image", value_set=["ok"]),
    ):
        suite.add_expectation(exp)
    return suite


def _explain(exp_type: str, column: str, df: pd.DataFrame, ids: list[str]) -> list[str]:
    """One line per failing item: its id, the value found, and what was expected."""
    what = {
        "expect_column_values_to_be_unique": "duplicate id",
        "expect_column_value_lengths_to_be_between": "empty question",
        "expect_column_values_to_be_between": "no non-empty answer",
        "expect_column_values_to_match_regex": "unknown corruption label in type",
        "expect_column_values_to_be_in_set": f"bad {column}",
    }.get(exp_type, exp_type)
    lines = []
    for item_id in dict.fromkeys(ids):
        value = df.loc[df["id"] == item_id, column].iloc[0]
        value = value.item() if hasattr(value, "item") else value  # numpy scalar -> plain value
        lines.append(f"item id={item_id}: {what} ({column}={value!r}) [{exp_type}]")
    return lines


def validate_manifests(manifests: dict[str, list[dict]], data_dir: Path, cfg: ValidationConfig) -> dict:
    """Run the suite on each manifest; returns the report (`success`, per-manifest failures with item ids)."""
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("manifests")
    suite = context.suites.add(build_suite(cfg))
    report: dict = {"success": True, "manifests": {}}
    for name, items in manifests.items():
        df = manifest_frame(items, data_dir)
        asset = source.add_dataframe_asset(name)
        batch_def = asset.add_batch_definition_whole_dataframe(f"{name}_batch")
        vd = context.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch_def,
                                                                        suite=suite))
        result = vd.run(batch_parameters={"dataframe": df},
                        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]})
        failures = []
        for r in result.results:
            if r.success:
                continue
            cfg_kwargs = r.expectation_config.kwargs
            column = cfg_kwargs.get("column")
            idx = r.result.get("unexpected_index_list") or []
            ids = [str(x["id"]) if isinstance(x, dict) else str(x) for x in idx]
            failures.append({
                "expectation": r.expectation_config.type,
                "column": column,
                "item_ids": list(dict.fromkeys(ids)),
                "messages": _explain(r.expectation_config.type, column, df, ids),
            })
        report["manifests"][name] = {"n_items": len(items), "success": bool(result.success), "failures": failures}
        report["success"] &= bool(result.success)
    return report


def format_report(report: dict) -> str:
    if report["success"]:
        n = sum(m["n_items"] for m in report["manifests"].values())
        return f"validation passed: {n} items in {len(report['manifests'])} manifests meet every expectation"
    lines = ["validation failed:"]
    for name, m in report["manifests"].items():
        for f in m["failures"]:
            lines += [f"  [{name}] {msg}" for msg in f["messages"]]
    return "\n".join(lines)
