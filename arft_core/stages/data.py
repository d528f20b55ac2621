"""The data stages: the base model, MAT-Coding generation, the search index, the MAT-Search import, validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from arft_core.config import Config
from arft_core.io import MANIFESTS, load_manifest, write_json_atomic
from arft_core.progress import progress_bar

IMPORT_RECORD = "import.json"  # what the last MAT-Search import read (in paths.mat_search)


def model_stage(cfg: Config) -> dict:
    """Build the embedded base model (or check and reference the checkpoint in model.name_or_path)."""
    from arft_core.model.embedded import prepare_base_model

    return prepare_base_model(cfg.model, cfg.path("base_model"))


def data_stage(cfg: Config) -> dict:
    """Generate MAT-Coding train/test items with sandbox-verified teacher trajectories."""
    import mlflow

    from arft_core.data.contact_sheet import contact_sheet
    from arft_core.data.mat_coding import generate

    with progress_bar("generating MAT-Coding items", cfg.data.n_train + cfg.data.n_test) as advance:
        if cfg.data.executor == "dask":  # Prefect tasks on a Dask cluster (the orchestration layer's)
            from flows.cluster import generate_on_dask

            report = generate_on_dask(cfg, advance)
        else:
            report = generate(cfg.data, cfg.path("mat_coding"), cfg.root, cfg.sandbox, advance)
    write_json_atomic(cfg.path("data_report"), report)
    data_dir = cfg.path("mat_coding")
    sheet = contact_sheet(load_manifest(data_dir, "train") + load_manifest(data_dir, "test"), data_dir,
                          cfg.path("contact_sheet"))
    for artifact in (cfg.path("data_report"), sheet):
        mlflow.log_artifact(str(artifact))
    print(f"{sum(m['n'] for m in report['manifests'].values())} items from {report['candidates']} candidates "
          f"(reject rate {report['reject_rate']:.1%}), {report['items_per_second']} items/s; "
          f"contact sheet: {sheet}")
    return {"items": sum(m["n"] for m in report["manifests"].values()), "candidates": report["candidates"],
            "reject_rate": report["reject_rate"], "items_per_second": report["items_per_second"]}


def search_index_stage(cfg: Config) -> dict:
    """Build the local search index (BM25) over search.corpus_path or the embedded Wikipedia summaries."""
    import time

    from arft_core.search.local import build_index, build_wiki_corpus

    started = time.perf_counter()
    corpus = cfg.path("search_corpus")  # the stage's output: the corpus the index was built from
    if cfg.search.corpus_path:
        corpus.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cfg.root / cfg.search.corpus_path, corpus)
        n_docs = None
    else:
        n_docs = build_wiki_corpus(corpus)
    build_index(corpus, cfg.root / cfg.search.index_dir)
    seconds = round(time.perf_counter() - started, 2)
    print(f"indexed {corpus} into {cfg.root / cfg.search.index_dir} in {seconds} s")
    return {"documents": n_docs or sum(1 for _ in corpus.open()), "seconds": seconds}


def open_search(cfg: Config):
    """The configured backend behind its cache (`search.cache_path`, `search.mode`): how stages search."""
    from arft_core.search import make_backend

    return make_backend(cfg.search, cfg.root)


def annotation_changes(cfg: Config) -> list[str]:
    """'new annotations' when the MAT-Search export differs from the one the last import read (the export is a
    user's file outside DVC's graph, so `dvc status` cannot see it); empty for the embedded sample."""
    from arft_core.tracking import content_hash

    if cfg.search_data.export is None:
        return []
    export = cfg.root / cfg.search_data.export
    record = cfg.path("mat_search") / IMPORT_RECORD
    last = json.loads(record.read_text()) if record.is_file() else {}
    now = content_hash(export)
    return [] if last.get("md5") == now else [f"new MAT-Search annotations in {export} (md5 {last.get('md5')} -> {now})"]


def search_data_stage(cfg: Config) -> dict:
    """Import MAT-Search annotations (search_data.export, or the embedded sample) and run the teacher's searches
    (their gold queries) through the search cache."""
    import mlflow

    from arft_core.data.search_import import import_search
    from arft_core.tracking import content_hash

    d = cfg.search_data
    if d.export is None:
        from arft_core.data.search_sample import write_sample

        export = write_sample(cfg.path("search_sample"), "jsonl")
        image_dir = export.parent
    else:
        export = cfg.root / d.export
        image_dir = cfg.root / (d.image_dir or Path(d.export).parent)
    out = cfg.path("mat_search")
    previous = load_manifest(out, "all") if (out / "all.json").is_file() else None
    result = import_search(export, image_dir, out, d.format, d.fields or None, previous, d.test_fraction,
                           cfg.validation)
    result.write_quarantine(out / "quarantine.json")
    for q in result.quarantined:
        print(f"quarantined: {q['reason']}")
    write_json_atomic(out / "all.json", result.items)
    for part in ("train", "test"):
        write_json_atomic(out / f"{part}.json", [i for i in result.items if i.get("partition") == part])
    search = open_search(cfg)
    train = [i for i in result.items if i.get("partition") == "train"]
    # The teacher's searches (each annotated gold query), recorded in the search cache (search.cache_path): their
    # results frozen with the import. Training replays the teacher through its own cache (paths.train_search_cache).
    queries = [q for item in train for q in (item.get("gold") or {}).get("queries") or []]
    with progress_bar("teacher searches", len(queries)) as advance:
        for query in queries:
            search.search(query, cfg.search.top_k)
            advance(1)
    # What this import read: a retraining run compares it with the export now there (new annotations).
    write_json_atomic(out / IMPORT_RECORD, {"export": str(export), "md5": content_hash(export)})
    mlflow.log_artifact(str(out / "quarantine.json"))
    return {"items": len(result.items), "quarantined": len(result.quarantined), "teacher_searches": len(queries),
            "cache_hits": search.stats.hits, "backend_calls": search.stats.backend_calls}


def validate_stage(cfg: Config) -> dict:
    """Validate the MAT-Coding and MAT-Search manifests (Great Expectations); fails with a per-item report."""
    import mlflow

    from arft_core.validation import (ValidationFailed, format_report, merge_reports, new_context,
                                      validate_manifests)

    data_dir = cfg.path("mat_coding")
    expected = {m: {"n": n, "hard": round(n * cfg.data.hard_fraction) if cfg.data.hard else 0}
                for m, n in (("train", cfg.data.n_train), ("test", cfg.data.n_test))}
    docs = cfg.path("data_docs")
    context = new_context(docs)
    report = validate_manifests({m: load_manifest(data_dir, m) for m in MANIFESTS}, data_dir, cfg.validation,
                                expected, context=context)
    search_dir = cfg.path("mat_search")
    search = validate_manifests({m: load_manifest(search_dir, m) for m in MANIFESTS}, search_dir, cfg.validation,
                                kind="search", context=context)
    context.build_data_docs(site_names=["arft"])
    report = merge_reports({"coding": report, "search": search})
    report_path = cfg.path("validation_report")
    write_json_atomic(report_path, report)
    mlflow.log_artifact(str(report_path))
    mlflow.log_artifacts(str(docs), artifact_path="data_docs")
    text = format_report(report)
    if not report["success"]:
        raise ValidationFailed(f"{text}\nfull report: {report_path}")
    print(text)
    n_failed = sum(len(m["failures"]) for m in report["manifests"].values())
    n_quarantined = sum(len(q) for q in report["quarantined"].values())
    return {"items": sum(m["n_items"] for m in report["manifests"].values()), "failed_expectations": n_failed,
            "quarantined": n_quarantined}
