"""Search tool: local BM25 index (tiny corpus and the real embedded Wikipedia corpus), web backends against a real
HTTP server imitating Serper and Brave (retries, backoff, timeout, rate limit, key hygiene), and the SQLite cache."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from arft_core.config import SearchConfig
from arft_core.search import SearchBackend, SearchError, SearchResult, format_information, make_backend
from arft_core.search.cache import CachedSearch, SearchCache
from arft_core.search.local import LocalSearch, build_index, build_wiki_corpus, ensure_index, index_meta
from arft_core.search.web import BraveSearch, SerperSearch, TokenBucket, _parse_retry_after
from servers import Recorded, loopback_http

KEY = "sk-test-7f3a9c1e5b2d4680"  # a fake key; the point is that it never leaks

DOCS = [
    ("d0", "Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris."),
    ("d1", "Great Wall of China", "The Great Wall of China is a series of fortifications across northern China."),
    ("d2", "Photosynthesis", "Photosynthesis is the process by which plants convert light energy into chemical energy."),
    ("d3", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("d4", "Python (programming language)", "Python is a high-level programming language created by Guido van Rossum."),
    ("d5", "Amazon River", "The Amazon River in South America is the largest river by discharge volume of water."),
    ("d6", "Mona Lisa", "The Mona Lisa is a half-length portrait painting by Leonardo da Vinci, kept in the Louvre."),
    ("d7", "Saturn", "Saturn is the sixth planet from the Sun and has a prominent ring system."),
    ("d8", "Penicillin", "Penicillin is a group of antibiotics discovered by Alexander Fleming in 1928."),
    ("d9", "Kangaroo", "The kangaroo is a marsupial from Australia that moves by hopping on its hind legs."),
]


def write_corpus(path: Path, docs=DOCS) -> Path:
    path.write_text("".join(json.dumps({"id": i, "title": t, "text": x}) + "\n" for i, t, x in docs))
    return path


@pytest.fixture
def tiny_index(tmp_path: Path) -> Path:
    build_index(write_corpus(tmp_path / "corpus.jsonl"), tmp_path / "index")
    return tmp_path / "index"


# --- format --------------------------------------------------------------------------------------------------------

def test_format_information_numbers_entries_with_newline_separator():
    results = [SearchResult("A", "first  snippet\nwith break", "u1"), SearchResult("B", "second", "u2"),
               SearchResult("C", "third", "u3")]
    assert format_information(results, 2) == "<information> 1. Content:first snippet with break\n2. Content:second </information>"
    assert format_information([], 4) == "<information> No results found. </information>"


# --- local ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("query, expected", [
    ("eiffel tower paris", "d0"), ("highest mountain Himalayas", "d3"), ("who created python", "d4"),
    ("Leonardo painting in the Louvre", "d6"), ("antibiotics Fleming", "d8"), ("planet with rings", "d7"),
    ("marsupial hopping", "d9"), ("plants converting light", "d2"),  # stemming: converting ~ convert
])
def test_local_search_ranks_expected_doc_first(tiny_index: Path, query: str, expected: str):
    results = LocalSearch(tiny_index).search(query, 3)
    assert results and results[0].source == expected
    doc = next(d for d in DOCS if d[0] == expected)
    assert results[0].title == doc[1] and results[0].snippet == doc[2]


def test_local_search_survives_query_syntax_and_empty_queries(tiny_index: Path):
    s = LocalSearch(tiny_index)
    assert s.search('title:"Eiffel AND (tower -paris', 2)[0].source == "d0"
    assert s.search("  ?! ", 3) == []
    assert len(s.search("the", 10)) <= 10
    assert isinstance(s, SearchBackend)


def test_local_snippet_is_trimmed(tmp_path: Path):
    long = " ".join(["word"] * 200)
    build_index(write_corpus(tmp_path / "c.jsonl", [("x", "Long", long)]), tmp_path / "idx")
    snippet = LocalSearch(tmp_path / "idx").search("word", 1)[0].snippet
    assert len(snippet) <= 301 and snippet.endswith("…")


def test_build_index_is_atomic_and_ensure_index_rebuilds_on_change(tmp_path: Path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    idx = tmp_path / "index"
    ensure_index(corpus, idx)
    first = index_meta(idx)
    assert first and first["n_docs"] == 10
    ensure_index(corpus, idx)  # unchanged corpus: kept
    assert index_meta(idx) == first
    write_corpus(corpus, DOCS + [("d10", "Zebra", "The zebra is an African equine with black-and-white stripes.")])
    ensure_index(corpus, idx)
    assert index_meta(idx)["n_docs"] == 11
    assert LocalSearch(idx).search("striped zebra", 1)[0].source == "d10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "index"]  # no temporary folders left

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "ok"}\nnot json\n')
    with pytest.raises(SearchError, match="bad.jsonl:2"):
        build_index(bad, idx)
    assert index_meta(idx)["n_docs"] == 11  # a failed build leaves the previous index in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "corpus.jsonl", "index"]


def test_wiki_corpus_end_to_end(tmp_path: Path, capsys, record_property):
    t0 = time.perf_counter()
    n = build_wiki_corpus(tmp_path / "wiki.jsonl")
    t1 = time.perf_counter()
    assert build_index(tmp_path / "wiki.jsonl", tmp_path / "index") == n
    t2 = time.perf_counter()
    record_property("wiki_corpus_s", t1 - t0)
    record_property("wiki_index_s", t2 - t1)
    with capsys.disabled():
        print(f"\n[search] wiki corpus: {n} docs written in {t1 - t0:.2f} s, indexed in {t2 - t1:.2f} s")
    assert n == 10_033
    assert t2 - t0 < 60
    assert build_wiki_corpus(tmp_path / "again.jsonl") == n  # deterministic output
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "wiki.jsonl").read_bytes()
    first = json.loads((tmp_path / "wiki.jsonl").open().readline())
    assert set(first) == {"id", "title", "text"} and first["text"]

    s = LocalSearch(tmp_path / "index")
    assert s.search("Eiffel Tower", 4)[0].source == "Eiffel Tower"
    assert s.search("photosynthesis in plants", 4)[0].title == "Photosynthesis"
    results = s.search("who directed 2001: A Space Odyssey", 4)
    assert results[0].source == "2001: A Space Odyssey" and len(results) == 4
    assert "1. Content:2001: A Space Odyssey is a 1968" in format_information(results, 4)


def test_make_backend_local_record_then_replay(tmp_path: Path):
    write_corpus(tmp_path / "corpus.jsonl")
    cfg = SearchConfig(backend="local", corpus_path="corpus.jsonl", index_dir="idx", cache_path="cache.sqlite")
    backend = make_backend(cfg, tmp_path)
    assert isinstance(backend, CachedSearch) and backend.name == "local"
    first = backend.search("Mona Lisa", 2)
    assert backend.search("mona   lisa ", 2) == first
    assert (backend.stats.hits, backend.stats.misses, backend.stats.backend_calls) == (1, 1, 1)

    replay = make_backend(cfg.model_copy(update={"mode": "replay", "index_dir": "never-built"}), tmp_path)
    assert replay.search("MONA LISA", 2) == first
    assert not (tmp_path / "never-built").exists()  # replay builds nothing
    with pytest.raises(SearchError, match="saturn"):
        replay.search("saturn", 2)


# --- web: a real HTTP server imitating Serper and Brave -----------------------------------------------------------

@dataclass
class Reply:
    status: int = 200
    body: dict | str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class FakeAPI:
    url: str
    script: list[Reply]
    requests: list[dict] = field(default_factory=list)
    default: Reply = field(default_factory=Reply)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_reply(self, request: dict) -> Reply:
        with self.lock:
            self.requests.append(request)
            return self.script.pop(0) if self.script else self.default


SERPER_OK = {"organic": [{"title": "Eiffel Tower - Wikipedia", "link": "https://en.wikipedia.org/wiki/Eiffel_Tower",
                          "snippet": "The tower is 330 metres tall."},
                         {"title": "Tour Eiffel", "link": "https://www.toureiffel.paris/", "snippet": "Official site."}]}
BRAVE_OK = {"web": {"results": [{"title": "Eiffel <strong>Tower</strong>", "url": "https://example.org/eiffel",
                                 "description": "It is <strong>330</strong> m tall &amp; made of iron."}]}}


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    fake = FakeAPI(url="", script=[])

    def respond(r: Recorded) -> tuple[int, dict[str, str], bytes]:
        reply = fake.next_reply({"method": r.method, "path": r.path, "headers": r.headers, "body": r.body})
        time.sleep(reply.delay)
        data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body or {})
        return reply.status, {**reply.headers, "Content-Type": "application/json"}, data.encode()

    with loopback_http(respond) as server:
        fake.url = f"{server.url}/search"
        yield fake


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def web_cfg(api: FakeAPI, **kw) -> SearchConfig:
    base = dict(serper_url=api.url, brave_url=api.url, timeout_s=0.3, retries=3, backoff_s=0.05, rate_per_s=1000.0,
                burst=100)
    return SearchConfig(**{**base, **kw})


class RecordingSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        time.sleep(seconds)


def assert_no_key(caplog, *texts: str) -> None:
    assert caplog.records, "expected retry warnings"
    for record in caplog.records:
        assert KEY not in record.getMessage() and KEY not in str(record.args)
    assert KEY not in caplog.text
    for text in texts:
        assert KEY not in text


def test_serper_retries_429_500_timeout_then_succeeds(api: FakeAPI, monkeypatch, caplog):
    monkeypatch.setenv("SERPER_API_KEY", KEY)
    api.script = [Reply(429, {"message": "slow down"}, {"Retry-After": "0"}), Reply(500, {"message": "oops"}),
                  Reply(200, SERPER_OK, delay=1.0), Reply(200, SERPER_OK)]
    sleep = RecordingSleep()
    backend = SerperSearch(web_cfg(api), sleep=sleep)
    caplog.set_level(logging.WARNING, logger="arft_core.search")
    t0 = time.perf_counter()
    results = backend.search("How tall is the Eiffel Tower?", 2)
    elapsed = time.perf_counter() - t0

    assert results == [SearchResult("Eiffel Tower - Wikipedia", "The tower is 330 metres tall.",
                                    "https://en.wikipedia.org/wiki/Eiffel_Tower"),
                       SearchResult("Tour Eiffel", "Official site.", "https://www.toureiffel.paris/")]
    assert backend.attempts == 4 and len(api.requests) == 4
    # Retry-After: 0 honoured, then exponential backoff from backoff_s (jitter up to +25%).
    assert sleep.calls[0] == 0.0
    assert 0.10 <= sleep.calls[1] <= 0.125 and 0.20 <= sleep.calls[2] <= 0.25
    assert elapsed >= 0.3 + 0.10 + 0.20  # the timeout fired (0.3 s) and both backoff delays were slept
    assert elapsed < 1.0  # ...and the client did not wait for the 1 s slow reply
    assert any("timed out" in r.getMessage() for r in caplog.records)
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 3
    for req in api.requests:
        assert req["method"] == "POST" and req["headers"]["x-api-key"] == KEY
        assert json.loads(req["body"]) == {"q": "How tall is the Eiffel Tower?", "num": 2}
    assert_no_key(caplog, repr(backend))


def test_serper_gives_up_after_retries(api: FakeAPI, monkeypatch, caplog):
    monkeypatch.setenv("SERPER_API_KEY", KEY)
    api.default = Reply(503, {"error": f"backend down for key {KEY}"})
    backend = SerperSearch(web_cfg(api, retries=2, backoff_s=0.01))
    caplog.set_level(logging.WARNING, logger="arft_core.search")
    with pytest.raises(SearchError, match="after 3 attempts") as exc:
        backend.search("q", 4)
    assert backend.attempts == 3 and len(api.requests) == 3
    assert len(caplog.records) == 2
    assert_no_key(caplog, str(exc.value), repr(exc.value))


def test_400_is_not_retried_and_key_is_scrubbed(api: FakeAPI, monkeypatch, caplog):
    monkeypatch.setenv("SERPER_API_KEY", KEY)
    api.default = Reply(400, {"message": f"Invalid API key {KEY}"})
    backend = SerperSearch(web_cfg(api))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SearchError, match="HTTP 400") as exc:
        backend.search("q", 4)
    assert backend.attempts == 1
    assert "Invalid API key ***" in str(exc.value)
    assert KEY not in str(exc.value) and KEY not in caplog.text
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_missing_key_names_the_variable(api: FakeAPI, monkeypatch):
    monkeypatch.delenv("BRAVE_API_KEY", raising=False)
    with pytest.raises(SearchError, match="BRAVE_API_KEY"):
        BraveSearch(web_cfg(api)).search("q", 4)
    monkeypatch.setenv("MY_SERPER", KEY)
    backend = SerperSearch(web_cfg(api, api_key_env={"serper": "MY_SERPER"}))
    api.default = Reply(200, {"searchParameters": {"q": "q"}})
    assert backend.search("q", 4) == []  # an answer without `organic`: empty, not a crash
    assert api.requests[-1]["headers"]["x-api-key"] == KEY and "MY_SERPER" in repr(backend)


def test_brave_get_parse_and_retry(api: FakeAPI, monkeypatch, caplog):
    monkeypatch.setenv("BRAVE_API_KEY", KEY)
    api.script = [Reply(502, "<html>bad gateway</html>"), Reply(200, BRAVE_OK)]
    backend = BraveSearch(web_cfg(api, backoff_s=0.01))
    caplog.set_level(logging.WARNING, logger="arft_core.search")
    results = backend.search("eiffel tower height", 3)
    assert results == [SearchResult("Eiffel Tower", "It is 330 m tall & made of iron.", "https://example.org/eiffel")]
    assert len(api.requests) == 2
    req = api.requests[-1]
    assert req["method"] == "GET" and req["path"] == "/search?q=eiffel+tower+height&count=3"
    assert req["headers"]["x-subscription-token"] == KEY
    assert_no_key(caplog, repr(backend))


def test_connection_refused_is_retried(monkeypatch, caplog):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SERPER_API_KEY", KEY)
    cfg = SearchConfig(serper_url=f"http://127.0.0.1:{port}/search", retries=2, backoff_s=0.01, timeout_s=1.0)
    backend = SerperSearch(cfg)
    caplog.set_level(logging.WARNING, logger="arft_core.search")
    with pytest.raises(SearchError, match="connection error") as exc:
        backend.search("q", 4)
    assert backend.attempts == 3
    assert_no_key(caplog, str(exc.value))


# --- web: redirects and malformed answers (issue 13) ----------------------------------------------------------------

@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("backend_name", ["serper", "brave"])
def test_redirect_to_another_origin_never_gets_the_key(monkeypatch, tmp_path: Path, backend_name: str, code: int):
    """Port A answers every request with a redirect to port B, which answers like a healthy API. The key must never
    reach B (B gets no request at all), the call fails naming the status and Location, and nothing is cached."""
    monkeypatch.setenv(f"{backend_name.upper()}_API_KEY", KEY)
    good = json.dumps(SERPER_OK if backend_name == "serper" else BRAVE_OK).encode()
    with loopback_http(lambda req: (200, {"Content-Type": "application/json"}, good)) as b:
        target = f"{b.url}/search?from=a"

        def redirect(req: Recorded) -> tuple[int, dict[str, str], bytes]:
            return code, {"Location": target}, b""

        with loopback_http(redirect) as a:
            cfg = SearchConfig(backend=backend_name, serper_url=f"{a.url}/search", brave_url=f"{a.url}/search",
                               mode="record", cache_path="cache.sqlite", retries=3, backoff_s=0.01, timeout_s=2.0)
            backend = make_backend(cfg, tmp_path)
            with pytest.raises(SearchError) as exc:
                backend.search("eiffel tower", 2)
    message = str(exc.value)
    assert f"HTTP {code}" in message and target in message and "not followed" in message
    assert KEY not in message
    assert len(a.requests) == 1  # a redirect is not retried
    assert b.requests == []      # B never heard from the client, let alone saw the key
    assert isinstance(backend, CachedSearch)
    assert len(backend.cache) == 0 and backend.cache.get(backend_name, "eiffel tower", 2) is None
    assert backend.stats.backend_calls == 0


def test_redirect_location_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", KEY)
    with loopback_http(lambda req: (302, {"Location": f"http://evil.invalid/?k={KEY}"}, b"")) as a:
        with pytest.raises(SearchError, match="HTTP 302") as exc:
            SerperSearch(SearchConfig(serper_url=f"{a.url}/search")).search("q", 2)
    assert KEY not in str(exc.value) and "k=***" in str(exc.value)


# --- web: a server echoing the key into the texts that reach error messages (issue 26) -----------------------------

ODD_KEY = "sk/test+7f3a=9c1e&5b2d 4680"  # characters that percent-, JSON- or HTML-encoding change


def key_pieces(key: str) -> set[str]:
    """Every 8-character piece of the key, as sent and percent-encoded."""
    forms = {key, urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key)}
    return {form[i:i + 8] for form in forms for i in range(len(form) - 7)}


def assert_no_key_piece(key: str, *texts: str) -> None:
    for text in texts:
        leaked = sorted(piece for piece in key_pieces(key) if piece in text)
        assert not leaked, (leaked, text)


def straddling(cut: int, key: str, lead: int = 0) -> range:
    """Padding lengths that put the key across a cut at `cut` characters (after `lead` characters of message)."""
    return range(max(0, cut - lead - len(key) - 1), cut - lead + 2)


@pytest.mark.parametrize("key", [KEY, ODD_KEY])
def test_a_key_echoed_anywhere_leaves_no_piece_in_errors(monkeypatch, caplog, key: str):
    """The key echoed in an error body, a Location header and a malformed answer, at every position across the
    excerpt's cut (200 and 80 characters), in the spellings a server might use: no 8 characters of it reach the
    error, its repr or the log. Before, the text was cut first and scrubbed after: a 12-20 character prefix leaked."""
    monkeypatch.setenv("SERPER_API_KEY", key)
    caplog.set_level(logging.DEBUG)
    spellings = [key, urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key), json.dumps(key)[1:-1]]
    replies: list[tuple[int, dict[str, str], bytes]] = []
    shown = []  # whether the echo's *** fits inside the excerpt
    lead = len("http://evil.invalid/?")
    for spelling in spellings:
        for pad in straddling(200, spelling):  # an error body's excerpt: 200 characters
            replies.append((401, {}, ("x" * pad + spelling + " trailing text " * 20).encode()))
            shown.append(pad + 3 <= 200)
        for pad in straddling(200, spelling, lead):  # the Location, also cut at 200
            replies.append((302, {"Location": f"http://evil.invalid/?{'p' * pad}{spelling}&more"}, b""))
            shown.append(lead + pad + 3 <= 200)
        for pad in straddling(80, spelling):  # a malformed answer's preview: 80 characters
            replies.append((200, {}, ("<" * pad + spelling + " not json" * 20).encode()))
            shown.append(pad + 3 <= 80)
    queue = list(replies)
    with loopback_http(lambda req: queue.pop(0)) as server:
        backend = SerperSearch(SearchConfig(serper_url=f"{server.url}/search", retries=0, timeout_s=5.0,
                                            rate_per_s=1000.0, burst=100))
        messages = []
        for status, _, _ in replies:
            with pytest.raises(SearchError, match=f"HTTP {status}" if status != 200 else "malformed response") as exc:
                backend.search("q", 2)
            messages += [str(exc.value), repr(exc.value)]
    assert queue == [] and len(server.requests) == len(replies)
    assert all(r["x-api-key"] == key for r in (req.headers for req in server.requests))  # the key was sent...
    assert_no_key_piece(key, *messages, caplog.text)  # ...and no piece of it came back
    assert ["***" in m for m in messages[::2]] == shown  # each echo inside the excerpt was found and replaced


def test_a_status_line_echoing_the_key_leaves_no_piece(monkeypatch, caplog):
    """A server that answers with a broken status line quoting the key: http.client's error quotes that line."""
    import socket

    monkeypatch.setenv("SERPER_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    listener = socket.create_server(("127.0.0.1", 0))
    pads = list(straddling(200, KEY, len("connection error: BadStatusLine: ")))

    def serve() -> None:
        for pad in pads:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"XTTP/1.1 " + b"s" * pad + KEY.encode() + b"\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    backend = SerperSearch(SearchConfig(serper_url=f"http://127.0.0.1:{listener.getsockname()[1]}/search",
                                        retries=0, timeout_s=5.0, rate_per_s=1000.0, burst=100))
    messages = []
    for _ in pads:
        with pytest.raises(SearchError, match="connection error: BadStatusLine") as exc:
            backend.search("q", 2)
        messages.append(str(exc.value))
    thread.join(timeout=10)
    listener.close()
    assert_no_key_piece(KEY, *messages, caplog.text)


SERPER_GARBAGE = [Reply(200, "<html><body>Service temporarily unavailable</body></html>"), Reply(200, ""),
                  Reply(200, "[1, 2, 3]"), Reply(200, '"organic"'), Reply(200, {"organic": {"title": "x"}}),
                  Reply(200, {}), Reply(200, {"message": "quota"}),
                  # well-formed answers whose entries are not result objects (issue 26)
                  Reply(200, {"organic": [1, "x", None]}), Reply(200, {"organic": [SERPER_OK["organic"][0], 7]}),
                  Reply(200, {"organic": [{"title": 5, "link": "https://x/"}]}), Reply(200, {"organic": [{}]})]
BRAVE_GARBAGE = [Reply(200, "{truncated"), Reply(200, "null"), Reply(200, {"web": []}),
                 Reply(200, {"web": {"results": {"a": 1}}}), Reply(200, {"status": "ok"}),
                 Reply(200, {"type": "search", "web": {"results": [1, "x", None]}}),
                 Reply(200, {"type": "search", "web": {"results": [{"title": "t", "url": ["https://x/"]}]}})]


@pytest.mark.parametrize("backend_name, garbage, good, expected", [
    ("serper", SERPER_GARBAGE, SERPER_OK, "The tower is 330 metres tall."),
    ("brave", BRAVE_GARBAGE, BRAVE_OK, "It is 330 m tall & made of iron."),
])
def test_malformed_answers_are_retried_then_the_good_one_is_cached(api: FakeAPI, monkeypatch, caplog, tmp_path: Path,
                                                                   backend_name, garbage, good, expected):
    monkeypatch.setenv(f"{backend_name.upper()}_API_KEY", KEY)
    api.script = [*garbage, Reply(200, good)]
    sleep = RecordingSleep()
    cls = SerperSearch if backend_name == "serper" else BraveSearch
    backend = cls(web_cfg(api, retries=len(garbage), backoff_s=0.001), sleep=sleep)
    cached = CachedSearch(backend, SearchCache(tmp_path / "c.sqlite"), "record")
    caplog.set_level(logging.WARNING, logger="arft_core.search")
    results = cached.search("eiffel", 2)
    assert results[0].snippet == expected
    assert backend.attempts == len(garbage) + 1 == len(api.requests)
    # The same exponential backoff as for a 5xx: backoff_s * 2**attempt, jitter up to +25%.
    assert len(sleep.calls) == len(garbage)
    for attempt, delay in enumerate(sleep.calls):
        assert 0.001 * 2 ** attempt <= delay <= 0.001 * 2 ** attempt * 1.25
    assert all("malformed response" in r.getMessage() for r in caplog.records)
    assert len(caplog.records) == len(garbage)
    assert len(cached.cache) == 1 and cached.cache.get(backend_name, "eiffel", 2) == results


@pytest.mark.parametrize("backend_name", ["serper", "brave"])
def test_malformed_answers_forever_fail_clearly_and_cache_nothing(api: FakeAPI, monkeypatch, caplog, tmp_path: Path,
                                                                 backend_name):
    monkeypatch.setenv(f"{backend_name.upper()}_API_KEY", KEY)
    api.default = Reply(200, f"<html>gateway error, key {KEY}</html>")
    cls = SerperSearch if backend_name == "serper" else BraveSearch
    backend = cls(web_cfg(api, retries=2, backoff_s=0.001))
    cached = CachedSearch(backend, SearchCache(tmp_path / "c.sqlite"), "record")
    caplog.set_level(logging.WARNING, logger="arft_core.search")
    with pytest.raises(SearchError, match=r"after 3 attempts for query 'eiffel': malformed response: not JSON "
                                          r"\('<html>gateway error, key \*\*\*</html>'\)") as exc:
        cached.search("eiffel", 2)
    assert backend.attempts == 3 and len(caplog.records) == 2
    assert len(cached.cache) == 0 and cached.stats.backend_calls == 0
    assert_no_key(caplog, str(exc.value), repr(exc.value))

    api.default = Reply(200, {"organic": "not a list"})  # JSON, but not Serper's / Brave's answer
    with pytest.raises(SearchError, match="malformed response: `(organic|web.results)` is not a list|none of"):
        cached.search("eiffel", 2)
    assert len(cached.cache) == 0


@pytest.mark.parametrize("backend_name, malformed, problem, good, expected", [
    ("serper", {"organic": [1, "x", None]}, "`organic[0]` is a number, not a result object", SERPER_OK,
     "The tower is 330 metres tall."),
    ("brave", {"type": "search", "web": {"results": [None]}}, "`web.results[0]` is null, not a result object",
     BRAVE_OK, "It is 330 m tall & made of iron."),
])
def test_malformed_entries_are_a_bad_answer_retried_and_never_cached(api: FakeAPI, monkeypatch, caplog,
                                                                    tmp_path: Path, backend_name, malformed, problem,
                                                                    good, expected):
    """Issue 26: `{"organic": [1, "x", null]}` was taken as zero results on the first attempt and cached."""
    monkeypatch.setenv(f"{backend_name.upper()}_API_KEY", KEY)
    cls = SerperSearch if backend_name == "serper" else BraveSearch
    backend = cls(web_cfg(api, retries=2, backoff_s=0.001))
    cached = CachedSearch(backend, SearchCache(tmp_path / "c.sqlite"), "record")
    caplog.set_level(logging.WARNING, logger="arft_core.search")
    api.default = Reply(200, malformed)
    with pytest.raises(SearchError) as exc:
        cached.search("eiffel", 2)
    assert str(exc.value).startswith(f"{backend_name} search failed after 3 attempts for query 'eiffel': "
                                     f"malformed response: {problem} (")
    assert backend.attempts == 3 and len(api.requests) == 3  # retried like any transient failure
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"{backend_name} search attempt {i}/3 failed" for i in (1, 2)]
    assert len(cached.cache) == 0 and cached.cache.get(backend_name, "eiffel", 2) is None
    assert cached.stats.backend_calls == 0

    api.script = [Reply(200, malformed), Reply(200, good)]  # one bad answer, then a good one: the good one is kept
    results = cached.search("eiffel", 2)
    assert results[0].snippet == expected and backend.attempts == 5
    assert len(cached.cache) == 1 and cached.cache.get(backend_name, "eiffel", 2) == results
    api.default = Reply(500, {})
    assert cached.search("eiffel", 2) == results and backend.attempts == 5  # replayed from the cache


def test_cache_refuses_non_answers(tmp_path: Path):
    cache = SearchCache(tmp_path / "c.sqlite")
    for bad in (None, {"organic": []}, [{"title": "t"}], "text", [SearchResult("t", None, "s")]):
        with pytest.raises(SearchError, match="not cached"):
            cache.put("serper", "q", 2, bad)  # type: ignore[arg-type]
    cache.put("serper", "q", 2, [])  # no results is an answer
    assert len(cache) == 1 and cache.get("serper", "q", 2) == []


def test_token_bucket_limits_a_burst(api: FakeAPI, monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", KEY)
    api.default = Reply(200, SERPER_OK)
    backend = SerperSearch(web_cfg(api, rate_per_s=20.0, burst=2))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=backend.search, args=(f"q{i}", 1)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    assert len(api.requests) == 6
    assert elapsed >= 0.19  # 2 free, then 4 more at 20/s = 0.2 s
    assert elapsed < 1.0


def test_token_bucket_with_fake_clock():
    now = [0.0]
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        now[0] += s

    bucket = TokenBucket(10.0, 3, clock=lambda: now[0], sleep=sleep)
    assert [bucket.acquire() for _ in range(5)] == [0.0, 0.0, 0.0, pytest.approx(0.1), pytest.approx(0.1)]
    now[0] += 10.0  # long idle: refills only up to burst
    assert [bucket.acquire() for _ in range(4)][-1] == pytest.approx(0.1)


def test_retry_after_parsing():
    assert _parse_retry_after("2") == 2.0
    assert _parse_retry_after("100000") == 60.0
    assert _parse_retry_after("garbage") is None and _parse_retry_after(None) is None
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


# --- cache ---------------------------------------------------------------------------------------------------------

class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.calls = 0
        self.version = 1

    def search(self, query: str, k: int) -> list[SearchResult]:
        self.calls += 1
        return [SearchResult(f"T{i} v{self.version} «{query}»", f"snippet {i} \u00e9\u4e2d\U0001f600 lone\ud800 \n  end",
                             f"https://x/{i}") for i in range(k)]


def dump(results: list[SearchResult]) -> bytes:
    return json.dumps([r.__dict__ for r in results], ensure_ascii=False).encode("utf-8", "surrogatepass")


def test_cache_record_then_replay_is_byte_identical(tmp_path: Path):
    backend = FakeBackend()
    rec = CachedSearch(backend, SearchCache(tmp_path / "c.sqlite"), "record")
    recorded = {q: rec.search(q, 3) for q in ("alpha", "beta query", "gamma")}
    assert rec.search("alpha", 3) == recorded["alpha"]
    assert (rec.stats.hits, rec.stats.misses, rec.stats.backend_calls) == (1, 3, 3)
    rec.cache.close()

    fresh = FakeBackend()
    replay = CachedSearch(fresh, SearchCache(tmp_path / "c.sqlite"), "replay")
    for q, results in recorded.items():
        again = replay.search(q, 3)
        assert dump(again) == dump(results)
        assert hashlib.sha256(dump(again)).digest() == hashlib.sha256(dump(results)).digest()
    assert fresh.calls == 0 and replay.stats.backend_calls == 0 and replay.stats.hits == 3
    with pytest.raises(SearchError, match=r"'delta'.*'fake'"):
        replay.search("delta", 3)
    with pytest.raises(SearchError, match="alpha"):
        replay.search("alpha", 2)  # k is part of the key
    assert replay.stats.misses == 2 and fresh.calls == 0


def test_cache_normalises_query(tmp_path: Path):
    backend = FakeBackend()
    s = CachedSearch(backend, SearchCache(tmp_path / "c.sqlite"), "record")
    first = s.search("Eiffel Tower height", 2)
    assert s.search("  eiffel\t TOWER   Height\n", 2) == first
    assert backend.calls == 1 and s.stats.hits == 1 and len(s.cache) == 1


def test_cache_live_refreshes(tmp_path: Path):
    backend = FakeBackend()
    cache = SearchCache(tmp_path / "c.sqlite")
    CachedSearch(backend, cache, "record").search("q", 1)
    backend.version = 2
    live = CachedSearch(backend, cache, "live")
    fresh = live.search("q", 1)
    assert "v2" in fresh[0].title and live.stats.backend_calls == 1 and live.stats.hits == 0
    assert CachedSearch(backend, cache, "replay").search("Q", 1) == fresh  # the refreshed answer was stored
    assert backend.calls == 2


def test_cache_is_thread_safe(tmp_path: Path):
    backend = FakeBackend()
    s = CachedSearch(backend, SearchCache(tmp_path / "c.sqlite"), "record")
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(40):
                assert s.search(f"query {i % 10}", 2)[0].source == "https://x/0"
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s.stats.hits + s.stats.misses == 240 and len(s.cache) == 10
    assert s.stats.backend_calls == s.stats.misses >= 10


# --- make_backend wiring -------------------------------------------------------------------------------------------

def test_make_backend_default_wiki_corpus_builds_once(tmp_path: Path):
    cfg = SearchConfig(backend="local", corpus_path=None, index_dir="data/idx", cache_path="data/cache.sqlite")
    backend = make_backend(cfg, tmp_path)
    assert backend.search("Mount Everest", 4)[0].source == "Mount Everest"
    meta_file = tmp_path / "data/idx/corpus.json"
    stamp = meta_file.stat().st_mtime_ns
    make_backend(cfg, tmp_path)  # same corpus: the index is reused, not rebuilt
    assert meta_file.stat().st_mtime_ns == stamp and index_meta(tmp_path / "data/idx")["n_docs"] == 10_033


def test_make_backend_serper_goes_through_the_cache(api: FakeAPI, monkeypatch, tmp_path: Path):
    monkeypatch.setenv("SERPER_API_KEY", KEY)
    api.default = Reply(200, SERPER_OK)
    cfg = web_cfg(api, backend="serper", mode="record", cache_path="cache.sqlite")
    backend = make_backend(cfg, tmp_path)
    assert backend.name == "serper"
    first = backend.search("Eiffel tower", 2)
    assert backend.search("eiffel  TOWER", 2) == first and len(api.requests) == 1
    monkeypatch.delenv("SERPER_API_KEY")  # replay needs neither the key nor the network
    assert make_backend(cfg.model_copy(update={"mode": "replay"}), tmp_path).search("Eiffel Tower", 2) == first
    assert len(api.requests) == 1 and KEY not in repr(backend)
