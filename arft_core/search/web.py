"""Web search backends: Serper (the paper's engine, Google results) and Brave, over the standard library's urllib.

Shared behaviour (spec §5.3 lists what the paper's tool lacked): the API key is read from the environment at call
time and never appears in exceptions, log records or reprs; a per-request timeout; retries with exponential,
jittered backoff on 429 / 5xx / timeouts / connection errors / malformed answers (not JSON, JSON that is not
the API's answer, or result entries that are not result objects), honouring `Retry-After`, none on other 4xx;
redirects are never followed (the key header would go to wherever the Location points), a 3xx is an error; and a
thread-safe token bucket shared by every call of one backend instance.

Every text a server controls (error bodies, reason phrases, Location headers, connection errors, previews of
malformed answers) reaches an error message only through `_Secret.excerpt`: the key is scrubbed from the whole text
first and only then is it cut to length, so that no cut can leave a piece of an echoed key behind.
"""

from __future__ import annotations

import email.message
import email.utils
import html
import http.client
import json
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import IO, Any

from arft_core.config import SearchConfig
from arft_core.search.base import SearchError, SearchResult

log = logging.getLogger(__name__)

# A server may ask for any Retry-After; past this the caller is better served by an error than by a stalled run.
MAX_RETRY_AFTER_S = 60.0
_ERROR_BODY_CHARS = 200   # of an error body, a Location, a connection error, in an error message
_BODY_PREVIEW_CHARS = 80  # of a malformed answer's body
_REASON_CHARS = 80        # of an HTTP reason phrase
# Bytes of an error body read for its excerpt: bounded (a server may send anything), and far more than any excerpt
# shows, so that a key cut in two by this read lies well past the excerpt's end.
_ERROR_BODY_READ = 1 << 16
_TAG = re.compile(r"<[^>]+>")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect: urllib would resend the request's headers, the API key among them, to the new
    Location, whatever its host. The 3xx then reaches the caller as an HTTPError."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: email.message.Message, newurl: str) -> urllib.request.Request | None:
        return None


# One opener for all backends: urlopen's default handlers (proxies from the environment included), minus redirects.
_OPENER = urllib.request.build_opener(_NoRedirect)


class TokenBucket:
    """Thread-safe token bucket: `rate` tokens per second, at most `burst` saved up.

    A caller reserves its token under the lock (the balance may go negative) and sleeps outside it, so waiting
    callers are served in arrival order and never hold the lock while sleeping.
    """

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst = float(rate), float(burst)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until it is available; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


class _Secret:
    """Holds the key so that no repr, str or traceback-with-locals can show it."""

    __slots__ = ("_value", "_forms")

    def __init__(self, value: str) -> None:
        self._value = value
        # The spellings a server may echo it in: as sent, percent-encoded (a redirect target's query), JSON- and
        # HTML-escaped. Longest first, so that a longer spelling is replaced whole before a shorter one inside it.
        forms = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value), json.dumps(value)[1:-1],
                 html.escape(value)} if value else set()
        self._forms = sorted(forms, key=len, reverse=True)

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, "***")
        return text

    def excerpt(self, text: str, limit: int) -> str:
        """At most `limit` characters of server-controlled `text`, without the key: scrubbed whole, then cut (the
        other order leaves the first characters of a key that straddles the cut)."""
        text = self.scrub(text).strip()
        return text if len(text) <= limit else text[:limit] + "..."

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _preview(body: bytes, key: _Secret) -> str:
    text = key.excerpt(body[:_ERROR_BODY_READ].decode("utf-8", "replace"), _BODY_PREVIEW_CHARS)
    return repr(text) if text else "an empty body"


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _entries_error(items: Sequence[Any], where: str, fields: tuple[str, ...]) -> str | None:
    """Why `items` (the answer's result list at `where`) is not a list of result objects, or None. An answer with
    one bad entry is a bad answer as a whole (a broken proxy or API): retried and never cached, not shortened."""
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return f"`{where}[{i}]` is {_json_type(item)}, not a result object"
        for name in fields:
            if item.get(name) is not None and not isinstance(item[name], str):
                return f"`{where}[{i}].{name}` is {_json_type(item[name])}, not a string"
        if not any(item.get(name) for name in fields):
            return f"`{where}[{i}]` has none of " + ", ".join(f"`{name}`" for name in fields)
    return None


def _clean(text: Any) -> str:
    """Plain text from an API string field (Brave marks matches with <strong> and escapes entities)."""
    return html.unescape(_TAG.sub("", text)).strip() if isinstance(text, str) else ""


class _WebSearch(ABC):
    """Request, retry, rate-limit and key handling shared by the web backends; subclasses build and parse."""

    name: str

    def __init__(self, cfg: SearchConfig, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.key_env = cfg.api_key_env.get(self.name, f"{self.name.upper()}_API_KEY")
        self._sleep = sleep
        self._env = env
        self._bucket = TokenBucket(cfg.rate_per_s, cfg.burst, clock=clock, sleep=sleep)
        self.attempts = 0  # HTTP requests sent by this instance (tests and diagnostics)
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self._url()!r}, key_env={self.key_env!r})"

    # -- subclass hooks -------------------------------------------------------------------------------------------
    @abstractmethod
    def _url(self) -> str:
        ...

    @abstractmethod
    def _request(self, query: str, k: int, key: _Secret) -> urllib.request.Request:
        ...

    @abstractmethod
    def _shape_error(self, payload: Any) -> str | None:
        """Why `payload` (decoded JSON) is not this API's answer, or None when it is one `_parse` can read."""

    @abstractmethod
    def _parse(self, payload: dict[str, Any]) -> list[SearchResult]:
        ...

    # -- shared behaviour -----------------------------------------------------------------------------------------
    def _key(self) -> _Secret:
        env = os.environ if self._env is None else self._env
        value = env.get(self.key_env, "")
        if not value:
            raise SearchError(f"{self.name} search needs an API key: set the environment variable {self.key_env}")
        return _Secret(value)

    def _attempt(self, req: urllib.request.Request, key: _Secret) -> list[SearchResult]:
        self._bucket.acquire()
        with self._count_lock:
            self.attempts += 1
        try:
            with _OPENER.open(req, timeout=self.cfg.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = key.excerpt(e.read(_ERROR_BODY_READ).decode("utf-8", "replace"), _ERROR_BODY_CHARS)
            except Exception:  # noqa: BLE001 - the body is only decoration for the error message
                detail = ""
            finally:
                e.close()
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}", _parse_retry_after(e.headers.get("Retry-After"))) from None
            if 300 <= e.code < 400:
                location = key.excerpt(e.headers.get("Location") or "(no Location header)", _ERROR_BODY_CHARS)
                raise SearchError(f"{self.name} search failed: HTTP {e.code} redirect from {self._url()} to "
                                  f"{location}; redirects are not followed, so that the API key is only ever sent "
                                  f"to the configured URL (point the config at the final URL)") from None
            reason = key.excerpt(str(e.reason), _REASON_CHARS)
            raise SearchError(f"{self.name} search failed: HTTP {e.code} {reason}: {detail}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"timed out after {self.cfg.timeout_s:g} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timed out after {self.cfg.timeout_s:g} s") from None
            raise _Retryable(f"connection error: {key.excerpt(str(e.reason), _ERROR_BODY_CHARS)}") from None
        except (ConnectionError, http.client.HTTPException) as e:  # e.g. BadStatusLine quotes the server's line
            detail = key.excerpt(f"{type(e).__name__}: {e}", _ERROR_BODY_CHARS)
            raise _Retryable(f"connection error: {detail}") from None
        # A malformed answer (a proxy's error page, a truncated body) is as transient as a 5xx: retried the same way.
        try:
            payload = json.loads(body)
        except ValueError:
            raise _Retryable(f"malformed response: not JSON ({_preview(body, key)})") from None
        problem = self._shape_error(payload)
        if problem is not None:
            raise _Retryable(f"malformed response: {problem} ({_preview(body, key)})")
        return self._parse(payload)

    def search(self, query: str, k: int) -> list[SearchResult]:
        key = self._key()
        req = self._request(query, k, key)
        tries = self.cfg.retries + 1
        for attempt in range(tries):
            try:
                results = self._attempt(req, key)
            except _Retryable as e:
                if attempt + 1 >= tries:
                    raise SearchError(f"{self.name} search failed after {tries} attempts for query {query!r}: "
                                      f"{e.reason}") from None
                backoff = self.cfg.backoff_s * 2 ** attempt * random.uniform(1.0, 1.25)
                delay = e.retry_after if e.retry_after is not None else backoff
                log.warning("%s search attempt %d/%d failed (%s); retrying in %.2f s", self.name, attempt + 1,
                            tries, e.reason, delay)
                self._sleep(delay)
                continue
            return results[:k]
        raise AssertionError("unreachable")  # pragma: no cover


class SerperSearch(_WebSearch):
    """google.serper.dev: POST `{"q", "num"}` with header X-API-KEY; results from `organic[*]`."""

    name = "serper"

    def _url(self) -> str:
        return self.cfg.serper_url

    def _request(self, query: str, k: int, key: _Secret) -> urllib.request.Request:
        return urllib.request.Request(
            self._url(), data=json.dumps({"q": query, "num": k}).encode(), method="POST",
            headers={"X-API-KEY": key.reveal(), "Content-Type": "application/json", "Accept": "application/json"})

    def _shape_error(self, payload: Any) -> str | None:
        # Every Serper answer echoes `searchParameters`; one without `organic` is a search with no results.
        if not isinstance(payload, dict):
            return f"expected a JSON object, got {type(payload).__name__}"
        if "organic" not in payload and "searchParameters" not in payload:
            return "a JSON object with neither `organic` nor `searchParameters`"
        if not isinstance(payload.get("organic"), (list, type(None))):
            return "`organic` is not a list"
        return _entries_error(payload.get("organic") or [], "organic", ("title", "snippet", "link"))

    def _parse(self, payload: dict[str, Any]) -> list[SearchResult]:
        # The paper's tool raised on a missing `organic` key; no organic results is an empty answer. Every entry is
        # a result object (`_shape_error` checked).
        items = payload.get("organic") or []
        return [SearchResult(title=_clean(it.get("title")), snippet=_clean(it.get("snippet")),
                             source=it.get("link") or "") for it in items]


class BraveSearch(_WebSearch):
    """Brave Search API: GET `?q=&count=` with header X-Subscription-Token; results from `web.results[*]`."""

    name = "brave"

    def _url(self) -> str:
        return self.cfg.brave_url

    def _request(self, query: str, k: int, key: _Secret) -> urllib.request.Request:
        url = f"{self._url()}?{urllib.parse.urlencode({'q': query, 'count': k})}"
        return urllib.request.Request(url, method="GET",
                                      headers={"X-Subscription-Token": key.reveal(), "Accept": "application/json"})

    def _shape_error(self, payload: Any) -> str | None:
        # Every Brave answer has `type` and `query`; `web` is left out when there are no web results.
        if not isinstance(payload, dict):
            return f"expected a JSON object, got {type(payload).__name__}"
        if not {"type", "query", "web"} & payload.keys():
            return "a JSON object with none of `type`, `query`, `web`"
        web = payload.get("web")
        if web is not None and not (isinstance(web, dict) and isinstance(web.get("results"), (list, type(None)))):
            return "`web.results` is not a list"
        return _entries_error((web or {}).get("results") or [], "web.results", ("title", "description", "url"))

    def _parse(self, payload: dict[str, Any]) -> list[SearchResult]:
        web = payload.get("web")
        items = (web.get("results") if isinstance(web, dict) else None) or []
        return [SearchResult(title=_clean(it.get("title")), snippet=_clean(it.get("description")),
                             source=it.get("url") or "") for it in items]
