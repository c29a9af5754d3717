"""Search: the paper's `<search>` tool (`SearchTool`) over pluggable backends, with an on-disk cache.

Backends (`SearchBackend` protocol, `search(query, top_k) -> list[SearchHit]`):

* `BM25Backend`: a local BM25 index (`rank_bm25.BM25Okapi`, lowercase word tokens) over a user corpus in
  JSONL or parquet (`title`/`text`/`id` fields, names configurable). `BM25Backend.default()` serves the
  small corpus shipped in `trl_appo/resources/corpus.jsonl`.
* `ARPOCacheBackend`: replays an ARPO `search_cache.json` (query -> "Page k: snippet" lines) exactly, and
  answers uncached queries from a BM25 index over all cached snippets (about 10k real web snippets).
* `HTTPSearchBackend`: a documented skeleton for a web-search API at a user-configured URL.

`SearchCache` is a persistent query cache shared safely by several processes (sqlite3 in WAL mode with a
busy timeout: readers never block, writers queue), keyed by backend name, top-k and the normalised query.
`SearchTool` formats hits as the ARPO cache does ("Page k: snippet", one per line), so replayed results
are byte-identical to the paper's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from filelock import FileLock

from .base import Tool, ToolOutput

logger = logging.getLogger(__name__)

NO_RESULTS = "No search results found."
MAX_QUERY_TOKENS = 64
"""Distinct words of a query that BM25 scores (the first ones, in query order). Scoring costs one pass over all
documents per distinct word; a search query is a few keywords, and a pasted 3000-word "query" over 10k documents
otherwise kept a thread busy for 10-70 s past the tool's timeout."""
_TOKEN_RE = re.compile(r"\w+")
_PAGE_RE = re.compile(r"^Page (\d+): ?")


def tokenize(text: str) -> list[str]:
    """BM25 tokens: lowercase runs of word characters (unicode-aware)."""
    return _TOKEN_RE.findall(text.lower())


def query_terms(query: str, max_terms: int = MAX_QUERY_TOKENS) -> dict[str, int]:
    """The distinct tokens of `query` that are scored, in query order, with their counts: the first `max_terms`
    distinct ones (later new words are ignored; repeats of kept words still count)."""
    counts: dict[str, int] = {}
    for token in tokenize(query):
        if token in counts:
            counts[token] += 1
        elif len(counts) < max_terms:
            counts[token] = 1
    return counts


def normalize_query(query: str) -> str:
    """Cache key of a query: lowercase with whitespace collapsed."""
    return " ".join(query.lower().split())


@dataclass
class SearchHit:
    """One search result. `text` is the snippet; `title`/`id`/`url` are optional."""

    text: str
    title: str = ""
    id: str = ""
    url: str = ""
    score: float = 0.0


@runtime_checkable
class SearchBackend(Protocol):
    """Anything that answers `search(query, top_k)` with hits, best first."""

    name: str

    def search(self, query: str, top_k: int) -> list[SearchHit]: ...


def format_hits(hits: Sequence[SearchHit]) -> str:
    """ARPO's result format: one "Page k: snippet" line per hit (the title prefixes the snippet if any)."""
    if not hits:
        return NO_RESULTS
    lines = []
    for k, hit in enumerate(hits, 1):
        snippet = f"{hit.title}: {hit.text}" if hit.title else hit.text
        lines.append(f"Page {k}: {snippet}")
    return "\n".join(lines)


def parse_pages(text: str) -> list[SearchHit]:
    """Inverse of `format_hits` for ARPO cache entries (lines not starting with "Page k:" continue a hit)."""
    hits: list[SearchHit] = []
    for line in text.split("\n"):
        m = _PAGE_RE.match(line)
        if m and int(m.group(1)) == len(hits) + 1:
            hits.append(SearchHit(text=line[m.end():]))
        elif hits:
            hits[-1].text += "\n" + line
        else:
            return []  # not a page listing (e.g. "No search results found.")
    return hits


class BM25Index:
    """BM25Okapi over documents; `search` returns the top-k documents sharing a word with the query.

    A query is scored over its distinct words, each weighted by how often it occurs (the same scores as
    BM25Okapi over the full token list), and over at most `max_query_tokens` of them (`MAX_QUERY_TOKENS`).
    """

    def __init__(self, documents: Sequence[SearchHit], max_query_tokens: int = MAX_QUERY_TOKENS):
        from rank_bm25 import BM25Okapi

        if not documents:
            raise ValueError("BM25Index needs at least one document")
        self.documents = list(documents)
        self.max_query_tokens = max_query_tokens
        # Title words count as document words: short factual snippets often name their subject only there.
        corpus = [tokenize(f"{d.title} {d.text}") or ["_"] for d in self.documents]
        self._bm25 = BM25Okapi(corpus)
        self._vocab = [frozenset(tokens) for tokens in corpus]

    def search(self, query: str, top_k: int) -> list[SearchHit]:
        counts = query_terms(query, self.max_query_tokens)
        if not counts:
            return []
        scores = None
        for token, count in counts.items():  # BM25 sums over query tokens: a repeated word scores count times
            term = self._bm25.get_scores([token])
            scores = term * count if scores is None else scores + term * count
        # Candidates share a word with the query (not score > 0: BM25Okapi's idf is 0 for a word found in
        # half of the documents, so a tiny corpus would otherwise return nothing).
        query_set = set(counts)
        candidates = [i for i in range(len(scores)) if query_set & self._vocab[i]]
        order = sorted(candidates, key=lambda i: (-scores[i], i))[:top_k]
        return [self._hit(i, scores[i]) for i in order]

    def _hit(self, i: int, score: float) -> SearchHit:
        d = self.documents[i]
        return SearchHit(d.text, d.title, d.id, d.url, float(score))


def load_documents(
    path: str | os.PathLike,
    text_field: str = "text",
    title_field: str | None = "title",
    id_field: str | None = "id",
) -> list[SearchHit]:
    """Read a JSONL or parquet corpus into hits. Missing title/id fields are allowed."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pandas as pd

        rows: Iterable[dict] = pd.read_parquet(path).to_dict(orient="records")
    else:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    docs = []
    for n, row in enumerate(rows):
        docs.append(
            SearchHit(
                text=str(row[text_field]),
                title=str(row.get(title_field) or "") if title_field else "",
                id=str(row.get(id_field) if id_field and row.get(id_field) is not None else n),
            )
        )
    return docs


def default_corpus_path() -> Path:
    """The small offline corpus shipped with the package (tests and the demo)."""
    return Path(__file__).resolve().parents[1] / "resources" / "corpus.jsonl"


class BM25Backend:
    """Local BM25 search over a document collection."""

    def __init__(self, documents: Sequence[SearchHit], name: str = "bm25"):
        self.name = name
        self.index = BM25Index(documents)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **fields: Any) -> BM25Backend:
        """Corpus in JSONL or parquet; `fields` are `load_documents`' field-name arguments."""
        return cls(load_documents(path, **fields), name=f"bm25:{Path(path).name}")

    @classmethod
    def default(cls) -> BM25Backend:
        return cls.from_file(default_corpus_path())

    def search(self, query: str, top_k: int) -> list[SearchHit]:
        return self.index.search(query, top_k)


class ARPOCacheBackend:
    """Offline replay of an ARPO `search_cache.json`; BM25 over all cached snippets for other queries.

    A cached query (exact, else after `normalize_query`) returns the cached pages, so `format_hits` gives back
    the cached text byte for byte. The fallback index is built on first use (about a second for 10k snippets).
    """

    def __init__(self, path: str | os.PathLike, name: str = "arpo_cache"):
        self.name = name
        with open(path, encoding="utf-8") as f:
            self.cache: dict[str, str] = json.load(f)
        self._normalized = {normalize_query(q): q for q in self.cache}
        self._index: BM25Index | None = None
        self._lock = threading.Lock()

    def lookup(self, query: str) -> str | None:
        """The cached text of a query, or None."""
        key = query if query in self.cache else self._normalized.get(normalize_query(query))
        return None if key is None else self.cache[key]

    def search(self, query: str, top_k: int) -> list[SearchHit]:
        cached = self.lookup(query)
        if cached is not None:
            return parse_pages(cached)[:top_k]
        return self.index.search(query, top_k)

    @property
    def index(self) -> BM25Index:
        with self._lock:
            if self._index is None:
                seen: set[str] = set()
                docs = []
                for text in self.cache.values():
                    for hit in parse_pages(text):
                        if hit.text not in seen:  # the same snippet is cached under many queries
                            seen.add(hit.text)
                            docs.append(hit)
                self._index = BM25Index(docs)
            return self._index


class HTTPSearchBackend:
    """Skeleton for a web-search API (not exercised in tests; the machines that run them are offline).

    GETs `url` with `{query_param: query, top_k_param: top_k, **params}` and an optional bearer token read from
    the environment variable `api_key_env`, then hands the decoded JSON to `parse` which must return hits.
    The default `parse` expects `{"results": [{"title", "snippet" or "text", "url"}, ...]}`; adapt it to your
    provider (Serper, Bing, SearxNG, ...). Wrap it in `SearchTool(cache=...)` so repeated queries are free.
    """

    def __init__(
        self,
        url: str,
        query_param: str = "q",
        top_k_param: str = "num",
        params: dict[str, str] | None = None,
        api_key_env: str | None = None,
        parse: Callable[[Any], list[SearchHit]] | None = None,
        timeout: float = 20.0,
        name: str = "http",
    ):
        self.url, self.query_param, self.top_k_param = url, query_param, top_k_param
        self.params = dict(params or {})
        self.api_key_env = api_key_env
        self.parse = parse or self._parse_default
        self.timeout = timeout
        self.name = name

    def search(self, query: str, top_k: int) -> list[SearchHit]:
        import urllib.parse
        import urllib.request

        query_string = urllib.parse.urlencode({self.query_param: query, self.top_k_param: top_k, **self.params})
        request = urllib.request.Request(f"{self.url}?{query_string}")
        if self.api_key_env and os.environ.get(self.api_key_env):
            request.add_header("Authorization", f"Bearer {os.environ[self.api_key_env]}")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - user-configured
            return self.parse(json.loads(response.read().decode("utf-8")))[:top_k]

    @staticmethod
    def _parse_default(payload: Any) -> list[SearchHit]:
        return [
            SearchHit(text=r.get("snippet") or r.get("text") or "", title=r.get("title", ""), url=r.get("url", ""))
            for r in payload.get("results", [])
        ]


class SearchCacheError(ValueError):
    """A cache path that cannot be used (the message, one line, says how to fix it)."""


class SearchCache:
    """Persistent query -> hits cache in sqlite3, safe for concurrent processes and threads.

    WAL mode lets readers proceed while one writer commits; `timeout` makes a writer wait for the lock
    instead of failing. Each thread opens its own connection (sqlite connections are not thread-safe).

    A cache is only a cache: a file that is not a database (truncated, garbage), fails sqlite's quick check or
    lacks the table is moved aside (``<path>.corrupt-<time>``, with a warning) and rebuilt empty, at
    construction or when a later query hits the damage; a row that does not decode is deleted (with a
    warning) and recomputed (also one nested too deeply to decode). Neither construction nor a query fails
    permanently because of the file.

    Refused with `SearchCacheError` (one line naming the fix): a directory at `path` (it is never moved), and a
    cache this process cannot write whose file does not read as a cache. A readable cache that cannot be written
    here (a read-only directory or file) is opened read-only (sqlite ``mode=ro``; ``immutable=1`` when its WAL
    index cannot be created either) with one warning: cached queries are answered, new results are not stored.
    """

    def __init__(self, path: str | os.PathLike, timeout: float = 30.0):
        self.path = str(path)
        self.timeout = timeout
        self._local = threading.local()
        self._generation = 0  # bumped on every rebuild: threads reopen their connections
        self._rebuild_lock = threading.Lock()
        self.readonly = False
        self._uri: str | None = None
        if os.path.isdir(self.path):
            raise SearchCacheError(f"SearchCache: {self.path} is a directory; pass the path of a cache file, e.g. "
                                   f"{os.path.join(self.path, 'search_cache.sqlite')}")
        parent = os.path.dirname(os.path.abspath(self.path))
        if os.path.isfile(self.path) and not (os.access(self.path, os.W_OK) and os.access(parent, os.W_OK)):
            self._open_readonly()
            return
        # Switching to WAL and creating the table need an exclusive lock, and sqlite answers a concurrent switch
        # with SQLITE_BUSY *without* waiting on the busy timeout; a file lock serialises set-up across processes.
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.path + ".lock", timeout=timeout)
            lock.acquire()
        except PermissionError as exc:
            raise SearchCacheError(f"SearchCache: cannot create {self.path} or its lock file ({exc.strerror}: "
                                   f"{exc.filename}); pass a cache path in a writable directory") from exc
        try:
            try:
                self._setup(check=True)
            except sqlite3.DatabaseError as exc:
                self._set_aside(exc)
                self._setup(check=False)
        finally:
            lock.release()

    def _setup(self, check: bool) -> None:
        conn = self._connect()
        if check and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            verdict = conn.execute("PRAGMA quick_check").fetchone()
            if verdict is None or verdict[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {verdict[0] if verdict else 'no answer'}")
        conn.execute("PRAGMA journal_mode=WAL")
        with conn:
            conn.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        columns = [row[1] for row in conn.execute("PRAGMA table_info(cache)")]
        if columns[:2] != ["key", "value"]:
            raise sqlite3.DatabaseError(f"unexpected cache table columns {columns}")

    def _open_readonly(self) -> None:
        """Use a cache this process cannot write: read-only, if it reads as a cache; else refuse."""
        from urllib.parse import quote

        problem = None
        for flags in ("mode=ro", "mode=ro&immutable=1"):  # immutable: no WAL index (-shm) can be made here
            self._uri = f"file:{quote(os.path.abspath(self.path))}?{flags}"
            self._generation += 1
            try:
                conn = self._connect()
                verdict = conn.execute("PRAGMA quick_check").fetchone()
                columns = [row[1] for row in conn.execute("PRAGMA table_info(cache)")]
                if verdict and verdict[0] == "ok" and columns[:2] == ["key", "value"]:
                    self.readonly = True
                    logger.warning("SearchCache: %s is not writable here; using it read-only (%s): cached queries "
                                   "are answered, new results are not stored.", self.path, flags)
                    return
                problem = f"quick_check {verdict[0] if verdict else 'no answer'}, columns {columns}"
            except sqlite3.Error as exc:
                problem = str(exc)
            self._close_local()
        raise SearchCacheError(f"SearchCache: {self.path} is not writable here and does not read as a cache "
                               f"({problem}); make it writable, or pass another cache path")

    def _set_aside(self, exc: BaseException) -> None:
        """Close this thread's connection and move the damaged file (and its WAL) out of the way."""
        if os.path.isdir(self.path):
            raise SearchCacheError(f"SearchCache: {self.path} is a directory (not moved); pass the path of a cache "
                                   "file")
        self._close_local()
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(self.path + suffix, aside + suffix)
            except FileNotFoundError:
                pass
        self._generation += 1
        logger.warning("SearchCache: %s is damaged (%s); moved it to %s and started an empty cache.",
                       self.path, exc, aside)

    def _rebuild(self, exc: BaseException) -> None:
        with self._rebuild_lock, FileLock(self.path + ".lock", timeout=self.timeout):
            # Another thread or process may have rebuilt it already: only set aside what still fails.
            self._close_local()
            try:
                self._setup(check=True)
                return
            except sqlite3.DatabaseError:
                pass
            self._set_aside(exc)
            self._setup(check=False)

    def _close_local(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "generation", None) != self._generation:
            self._close_local()
            conn = None
        if conn is None and self._uri is not None:  # read-only
            conn = sqlite3.connect(self._uri, uri=True, timeout=self.timeout)
            self._local.conn = conn
            self._local.generation = self._generation
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout)
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL is persistent: set once in __init__
            self._local.conn = conn
            self._local.generation = self._generation
        return conn

    def _guarded(self, fn: Callable[[sqlite3.Connection], Any], default: Any) -> Any:
        """`fn(connection)`; on damage rebuild once and retry; if that fails too, `default` (a cache miss)."""
        for attempt in range(2):
            try:
                return fn(self._connect())
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc) or attempt or self.readonly:
                    logger.warning("SearchCache: %s: %s (treated as a cache miss)", self.path, exc)
                    return default
                damage = exc
            except sqlite3.DatabaseError as exc:
                if attempt or self.readonly:
                    logger.warning("SearchCache: %s %s: %s", self.path,
                                   "(read-only)" if self.readonly else "still fails after a rebuild", exc)
                    return default
                damage = exc
            try:
                self._rebuild(damage)
            except Exception as exc:  # noqa: BLE001 - the search itself must still answer
                logger.warning("SearchCache: could not rebuild %s: %s", self.path, exc)
                return default
        return default

    @staticmethod
    def key(backend: str, query: str, top_k: int) -> str:
        return f"{backend}\t{top_k}\t{normalize_query(query)}"

    def get(self, key: str) -> list[SearchHit] | None:
        row = self._guarded(lambda c: c.execute("SELECT value FROM cache WHERE key = ?", (key,)).fetchone(), None)
        if row is None:
            return None
        try:
            hits = json.loads(row[0])
            return [SearchHit(**h) for h in hits]
        except (TypeError, ValueError, AttributeError, RecursionError) as exc:  # a bad row: drop it, recompute
            logger.warning("SearchCache: dropping an unreadable row of %s (%s: %s)", self.path, type(exc).__name__,
                           str(exc)[:200])
            if self.readonly:
                return None

            def delete(conn: sqlite3.Connection) -> None:
                with conn:
                    conn.execute("DELETE FROM cache WHERE key = ?", (key,))

            self._guarded(delete, None)
            return None

    def put(self, key: str, hits: Sequence[SearchHit]) -> None:
        if self.readonly:
            return
        value = json.dumps([asdict(h) for h in hits], ensure_ascii=False)

        def insert(conn: sqlite3.Connection) -> None:
            with conn:  # one transaction; `with` commits
                conn.execute("INSERT OR REPLACE INTO cache (key, value) VALUES (?, ?)", (key, value))

        self._guarded(insert, None)

    def __len__(self) -> int:
        return self._guarded(lambda c: c.execute("SELECT COUNT(*) FROM cache").fetchone()[0], 0)


class SearchTool(Tool):
    """The `search` tool: query -> formatted top-k hits ("Page k: ..." lines).

    Args:
        backend: a `SearchBackend`; default: BM25 over the shipped offline corpus.
        top_k: hits per query.
        cache: a `SearchCache` or a path to one (None: no cache).
        name: tool name (the tag of the tag protocol: `<search>`).
        timeout: per-call timeout in seconds (enforced by the registry).
        max_output_chars: truncation of the formatted text.
    """

    def __init__(
        self,
        backend: SearchBackend | None = None,
        top_k: int = 5,
        cache: SearchCache | str | os.PathLike | None = None,
        name: str = "search",
        timeout: float = 30.0,
        max_output_chars: int = 4096,
    ):
        super().__init__(self.search, name=name, timeout=timeout, max_output_chars=max_output_chars)
        self.backend = backend if backend is not None else BM25Backend.default()
        self.top_k = top_k
        self.cache = SearchCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.last_latency = 0.0

    def search(self, query: str) -> str:
        """Search the knowledge source and return the top results, one "Page k: snippet" line each.

        Args:
            query: what to search for, in a few keywords.
        """
        return format_hits(self.hits(query))

    def hits(self, query: str) -> list[SearchHit]:
        """Top-k hits for `query`, from the cache when present."""
        key = SearchCache.key(self.backend.name, query, self.top_k)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        start = time.monotonic()
        hits = self.backend.search(query, self.top_k)
        self.last_latency = time.monotonic() - start
        if self.cache is not None:
            self.cache.put(key, hits)
        return hits

    def invoke(self, bound, session: Any = None) -> ToolOutput | str:
        query = bound.arguments.get("query", "")
        if not isinstance(query, str) or not query.strip():
            return ToolOutput("Error: empty search query.", failed=True)
        return self.search(query.strip())
