"""MAT-Search through the pipeline's pieces: GX validation of imported annotations, the teacher's step rows (its
trajectory replayed through the agent loop, the search tool answering through its cache: record, then replay
byte-identically), and the `arft search` CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arft_core.agent import Tools, Transcript
from arft_core.agent.steps import step_rows
from arft_core.config import AgentConfig, ModelConfig, ValidationConfig
from arft_core.data.search_import import import_search
from arft_core.data.search_sample import write_sample
from arft_core.protocol import query_text
from arft_core.search import SearchError, format_information
from arft_core.search.cache import CachedSearch, SearchCache
from arft_core.search.local import LocalSearch, build_index
from arft_core.validation import format_report, validate_manifests

CORPUS = [
    {"id": "d1", "title": "The Scream", "text": "The Scream is a painting by the Norwegian artist Edvard Munch."},
    {"id": "d2", "title": "Edvard Munch", "text": "Edvard Munch was a Norwegian painter born in Adalsbruk."},
    {"id": "d3", "title": "Oslo", "text": "Oslo is the capital and most populous city of Norway."},
    {"id": "d4", "title": "Gold", "text": "Gold is a chemical element with the symbol Au and atomic number 79."},
]


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("search")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    build_index(corpus, folder / "index")
    return folder / "index"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mat_search")
    export = write_sample(folder / "sample", "jsonl")
    result = import_search(export, export.parent, folder / "store")
    assert result.quarantined == []
    return folder / "store", result.items


def split(items: list[dict]) -> dict[str, list[dict]]:
    return {p: [i for i in items if i["partition"] == p] for p in ("train", "test")}


def test_imported_sample_passes_the_search_suite(imported):
    store, items = imported
    report = validate_manifests(split(items), store, ValidationConfig(), kind="search")
    assert report["success"], format_report(report)


def test_search_suite_names_broken_items(imported):
    store, items = imported
    parts = split(copy.deepcopy(items))
    train, test = parts["train"], parts["test"]
    train[1]["id"] = train[0]["id"]
    train[2]["answers"] = [""]
    train[3]["gold"] = {"queries": ["", 3], "answer": "x"}
    test[0]["image_sha256"] = train[5]["image_sha256"]
    text = format_report(validate_manifests(parts, store, ValidationConfig(), kind="search"))
    assert "duplicate id" in text
    assert f"item id={train[2]['id']}: no non-empty answer" in text
    assert f"item id={train[3]['id']}: bad gold (gold='malformed queries')" in text
    assert f"item id={test[0]['id']}: image also in the other split" in text


def transcript() -> Transcript:
    """The step-mode transcript (the paper's single message) on the embedded model's processor (no weights)."""
    from arft_core.model.processor import build_processor
    from arft_core.model.tokenizer import build_qwen_tokenizer

    cfg = ModelConfig()
    processor = build_processor(build_qwen_tokenizer(2048), cfg.min_pixels, cfg.max_pixels)
    return Transcript(processor, "arft", AgentConfig().for_training_mode("step").transcript)


def test_step_rows_record_then_replay_identically(imported, index, tmp_path):
    store, items = imported
    item = next(i for i in items if i["gold"] and len(i["gold"]["queries"]) >= 2)
    agent, rendered = AgentConfig().for_training_mode("step"), transcript()

    def rows(backend, mode: str) -> list[dict]:  # the teacher's searches through the cache in `mode`
        search = CachedSearch(backend, SearchCache(tmp_path / "cache.sqlite"), mode)
        return step_rows([item], "search", store, Tools(search=search, top_k=4), agent, rendered, tmp_path / mode)

    recorded = rows(LocalSearch(index), "record")
    queries = item["gold"]["queries"]
    assert [r["type"] for r in recorded] == ["search"] * len(queries) + ["answer"]
    text = [r["prompt"][0]["content"][-1]["text"] for r in recorded]
    first = query_text("search", item["question"])
    assert text[0] == first and recorded[0]["solution"].endswith(f"<search> {queries[0]} </search>")
    assert text[1].startswith(f"{first}\n{recorded[0]['solution']}\n<information>")
    assert recorded[-1]["solution"].endswith(f"<answer> {item['gold']['answer']} </answer>")

    class Unreachable:
        name = "local"

        def search(self, query, k):
            raise AssertionError("replay must not call the backend")

    replayed = rows(Unreachable(), "replay")
    assert json.dumps(replayed) == json.dumps(recorded)
    with pytest.raises(SearchError, match="never recorded"):
        CachedSearch(Unreachable(), SearchCache(tmp_path / "cache.sqlite"), "replay").search("never recorded", 4)


def test_information_block_format(index):
    results = LocalSearch(index).search("capital of Norway", 2)
    block = format_information(results, 2)
    assert block.startswith("<information>") and block.rstrip().endswith("</information>")
    assert "1. Content:" in block and results[0].snippet in block


def test_search_cli_prints_json_results(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"search": {"corpus_path": "corpus.jsonl"}}))
    run = lambda *a: subprocess.run([sys.executable, "-m", "arft_core.cli", *a], cwd=tmp_path,  # noqa: E731
                                    capture_output=True, text=True)
    built = run("data", "search-index")
    assert built.returncode == 0, built.stderr
    proc = run("search", "atomic number of gold", "--backend", "local", "-k", "2")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results[0]["source"] == "d4" and set(results[0]) == {"title", "snippet", "source"}
    missing = run("search", "anything else", "--mode", "replay")
    assert missing.returncode == 1 and "anything else" in missing.stderr
