"""Search tool: BM25 over the shipped corpus, exact ARPO cache replay, the multi-process sqlite cache."""

from __future__ import annotations

import gc
import json
import logging
import os
import sqlite3
import subprocess
import sys

import pytest

from trl_appo.tools import (
    ARPOCacheBackend,
    BM25Backend,
    HTTPSearchBackend,
    SearchBackend,
    SearchCache,
    SearchCacheError,
    SearchHit,
    SearchTool,
    ToolCall,
    ToolRegistry,
    format_hits,
)
from trl_appo.tools.search import MAX_QUERY_TOKENS, BM25Index, default_corpus_path, parse_pages, query_terms


def test_shipped_corpus_is_small_and_well_formed():
    path = default_corpus_path()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert 40 <= len(rows) <= 80 and path.stat().st_size < 50_000
    assert all({"id", "title", "text"} <= set(r) for r in rows)


def test_bm25_finds_the_relevant_documents():
    tool = SearchTool(top_k=3)
    hits = tool.hits("capital of Zorvath")
    assert hits[0].title in {"Zorvath", "Quellmarsh"} and len(hits) == 3
    assert tool.search("who invented the telephone").startswith("Page 1: Telephone: Alexander Graham Bell")
    assert tool.search("qwxyz zzzz") == "No search results found."


def test_parquet_corpus_with_custom_field_names(tmp_path):
    import pandas as pd

    path = tmp_path / "docs.parquet"
    pd.DataFrame({"heading": ["A", "B"], "body": ["apples are red", "bananas are yellow"]}).to_parquet(path)
    backend = BM25Backend.from_file(path, text_field="body", title_field="heading", id_field=None)
    assert [h.title for h in backend.search("yellow bananas", 5)] == ["B"]


def test_empty_query_is_an_error_the_model_sees():
    result = ToolRegistry([SearchTool()]).execute(ToolCall("search", {"query": " "}))
    assert result.failed and result.content == "Error: empty search query."


def test_cache_serves_repeated_queries(tmp_path):
    class Counting:
        name = "counting"

        def __init__(self):
            self.calls = 0

        def search(self, query: str, top_k: int) -> list[SearchHit]:
            self.calls += 1
            return [SearchHit(text=f"about {query}", title="T")]

    backend = Counting()
    assert isinstance(backend, SearchBackend)
    tool = SearchTool(backend, cache=tmp_path / "cache.sqlite")
    first = tool.search("Hello  World")
    assert tool.search("hello world") == first == "Page 1: T: about Hello  World"  # normalised key
    assert backend.calls == 1
    # The cache persists on disk for the next process / tool.
    assert SearchTool(Counting(), cache=tmp_path / "cache.sqlite").search("HELLO WORLD") == first


_WRITER = """
import sys
from trl_appo.tools.search import SearchCache, SearchHit
cache = SearchCache(sys.argv[1], timeout=30)
for i in range(150):
    cache.put(SearchCache.key("b", f"{sys.argv[2]} query {i}", 5), [SearchHit(text=str(i))])
    assert cache.get(SearchCache.key("b", f"{sys.argv[2]} query {i}", 5))[0].text == str(i)
"""


def test_cache_is_safe_with_two_processes_writing(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, path, name]) for name in ("p1", "p2")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    cache = SearchCache(path)
    assert len(cache) == 300
    assert cache.get(SearchCache.key("b", "P2 QUERY 149", 5))[0].text == "149"


class _Counting:
    name = "counting"

    def __init__(self):
        self.calls = 0

    def search(self, query: str, top_k: int) -> list[SearchHit]:
        self.calls += 1
        return [SearchHit(text=f"about {query}", title="T")]


def _good_cache(path):
    tool = SearchTool(_Counting(), cache=path)
    for i in range(50):
        tool.search(f"query {i}")
    del tool
    gc.collect()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty-garbage-header", "wrong-table"])
def test_a_damaged_cache_file_is_set_aside_and_rebuilt(tmp_path, caplog, damage):
    path = tmp_path / "cache.sqlite"
    if damage == "truncated":
        _good_cache(path)
        for suffix in ("-wal", "-shm"):
            (tmp_path / f"cache.sqlite{suffix}").unlink(missing_ok=True)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 100])
    elif damage == "garbage":
        path.write_bytes(os.urandom(5000))
    elif damage == "empty-garbage-header":
        path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    else:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE cache (a INTEGER)")
        conn.commit()
        conn.close()
    with caplog.at_level(logging.WARNING, logger="trl_appo.tools.search"):
        backend = _Counting()
        tool = SearchTool(backend, cache=path)  # construction never fails on a damaged file
        assert tool.search("hello") == tool.search("hello") == "Page 1: T: about hello"
    assert backend.calls == 1  # the rebuilt cache works
    assert any("damaged" in r.message for r in caplog.records)
    assert list(tmp_path.glob("cache.sqlite.corrupt-*"))  # set aside, not deleted


def test_a_cache_damaged_while_in_use_is_rebuilt_at_the_next_query(tmp_path, caplog):
    path = tmp_path / "cache.sqlite"
    backend = _Counting()
    tool = SearchTool(backend, cache=path)
    tool.search("before")
    tool.cache._close_local()
    for suffix in ("", "-wal", "-shm"):
        p = tmp_path / f"cache.sqlite{suffix}"
        if p.exists():
            p.write_bytes(os.urandom(4096))
    with caplog.at_level(logging.WARNING, logger="trl_appo.tools.search"):
        assert tool.search("after") == "Page 1: T: about after"
        assert tool.search("after") == "Page 1: T: about after"
    assert backend.calls == 2 and any("damaged" in r.message for r in caplog.records)


@pytest.mark.parametrize("value", ["not json", '{"text": "a dict, not a list"}', '[{"nope": 1}]', "[1, 2]",
                                   pytest.param("[" * 200_000 + "]" * 200_000, id="nested-200k-deep")])
def test_one_bad_row_is_dropped_and_recomputed(tmp_path, caplog, value):
    path = tmp_path / "cache.sqlite"
    backend = _Counting()
    tool = SearchTool(backend, cache=path)
    tool.search("good")
    key = SearchCache.key(backend.name, "bad", tool.top_k)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO cache (key, value) VALUES (?, ?)", (key, value))
    with caplog.at_level(logging.WARNING, logger="trl_appo.tools.search"):
        assert tool.search("bad") == "Page 1: T: about bad"
    assert tool.search("bad") == "Page 1: T: about bad" and tool.search("good") == "Page 1: T: about good"
    assert backend.calls == 2  # "good" stayed cached, "bad" was recomputed once and cached again
    assert any("unreadable row" in r.message for r in caplog.records)


def test_http_backend_is_a_configurable_skeleton():
    backend = HTTPSearchBackend("https://search.example/api", api_key_env="MY_SEARCH_KEY", params={"lang": "en"})
    assert isinstance(backend, SearchBackend)
    payload = {"results": [{"title": "T", "snippet": "s", "url": "u"}]}
    assert backend.parse(payload) == [SearchHit(text="s", title="T", url="u")]


@pytest.fixture(scope="module")
def arpo_cache(arpo_data_dir):
    return ARPOCacheBackend(arpo_data_dir / "search_cache.json")


def test_arpo_cache_replays_every_entry_exactly(arpo_cache):
    tool = SearchTool(arpo_cache, top_k=10)
    for query, text in arpo_cache.cache.items():
        assert tool.search(query) == text
    some_query = next(iter(arpo_cache.cache))
    assert tool.search("  " + some_query.upper() + " ") == arpo_cache.cache[some_query]  # normalised lookup


def test_arpo_cache_serves_uncached_queries_from_its_snippets(arpo_cache):
    assert arpo_cache.lookup("Campfire Tales 1997 horror anthology directors") is None
    text = SearchTool(arpo_cache, top_k=3).search("Campfire Tales 1997 horror anthology directors")
    lines = text.split("\n")
    assert len(lines) == 3 and lines[0].startswith("Page 1: ") and "Campfire Tales" in text


def test_format_and_parse_pages_round_trip():
    hits = [SearchHit(text="first\nwith a second line"), SearchHit(text="second")]
    assert parse_pages(format_hits(hits)) == hits
    assert parse_pages("No search results found.") == [] and format_hits([]) == "No search results found."


def test_a_long_query_scores_each_distinct_word_once_up_to_the_cap():
    """A pasted 3000-word query costs what its first MAX_QUERY_TOKENS distinct words cost (one scoring pass over
    the documents each), and repeats still weigh as BM25 weighs them."""
    docs = [SearchHit(f"w{i} w{i + 1} common", title=f"d{i}") for i in range(40)]
    index = BM25Index(docs)
    scored: list[str] = []
    full = index._bm25.get_scores

    def spy(tokens):
        scored.extend(tokens)
        return full(tokens)

    index._bm25.get_scores = spy
    query = " ".join(f"w{i % 1000}" for i in range(3000))  # 1000 distinct words, each 3 times
    assert index.search(query, 3)
    assert len(scored) == MAX_QUERY_TOKENS and len(set(scored)) == len(scored)
    assert scored == [f"w{i}" for i in range(MAX_QUERY_TOKENS)]  # the first distinct words, in query order
    assert query_terms("b a b c", 2) == {"b": 2, "a": 1}  # "c" is past the cap; repeats of kept words count

    scored.clear()
    hits = index.search("w3 w3 w4 common", 40)
    assert sorted(scored) == ["common", "w3", "w4"]
    expected = full(["w3", "w3", "w4", "common"])  # BM25Okapi over the full token list
    assert [h.score for h in hits] == pytest.approx([expected[int(h.title[1:])] for h in hits])
    assert [h.title for h in hits[:2]] == ["d3", "d2"]


def test_a_directory_at_the_cache_path_is_refused_not_moved(tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "keep.txt").write_text("mine")
    with pytest.raises(SearchCacheError, match="is a directory; pass the path of a cache file"):
        SearchTool(_Counting(), cache=cache_dir)
    assert (cache_dir / "keep.txt").read_text() == "mine" and os.listdir(tmp_path) == ["cache"]


_READONLY_CHECK = r"""
import json, sys, types
sys.path.append(DEPS)
pkg = types.ModuleType("trl_appo"); pkg.__path__ = [PKG]; sys.modules["trl_appo"] = pkg
from trl_appo.tools.search import SearchCache, SearchCacheError, SearchHit
cache = SearchCache(PATH)
hits = cache.get(KEY)
cache.put("other", [SearchHit("x")])
out = {"readonly": cache.readonly, "hits": [h.text for h in hits or []], "len": len(cache)}
try:
    SearchCache(PATH + ".new")
except SearchCacheError as e:
    out["new"] = str(e)
print(json.dumps(out))
"""


def test_a_clean_cache_in_a_read_only_directory_is_used_read_only(tmp_path):
    """As root the check runs as an unprivileged uid (setpriv; root ignores file modes), else after chmod."""
    import shutil
    import sysconfig

    import filelock

    base = tmp_path / "ro"
    base.mkdir()
    path = base / "cache.sqlite"
    backend = _Counting()
    tool = SearchTool(backend, cache=path)
    tool.search("question")
    del tool
    gc.collect()
    key = SearchCache.key(backend.name, "question", 5)
    before = {name: (base / name).read_bytes() for name in os.listdir(base)}
    code = tmp_path / "code"  # world-readable copies of trl_appo/tools and filelock (the checkout may be private)
    shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "trl_appo", "tools"), code / "trl_appo" / "tools")
    shutil.copytree(os.path.dirname(filelock.__file__), code / "deps" / "filelock")
    for d in (tmp_path, code, *[p for p in code.rglob("*")]):
        os.chmod(d, 0o755)
    script = (_READONLY_CHECK.replace("DEPS", repr(str(code / "deps"))).replace("PKG", repr(str(code / "trl_appo")))
              .replace("PATH", repr(str(path))).replace("KEY", repr(key)))
    if os.geteuid() == 0:
        python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        if shutil.which("setpriv") is None or not os.path.exists(python):
            pytest.skip("as root this needs setpriv and a system python of this version")
        uid = os.environ.get("APPO_TEST_UID", "43210")
        for name in os.listdir(base):
            os.chmod(base / name, 0o644)
        parent = tmp_path
        while str(parent) != "/":  # the uid must reach the directory (pytest's base temp dir is 0700)
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
            parent = parent.parent
        cmd = ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", "--", python, "-c", script]
    else:
        os.chmod(base, 0o555)
        cmd = [sys.executable, "-c", script]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        os.chmod(base, 0o755)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["readonly"] and result["hits"] == ["about question"] and result["len"] == 1
    assert "using it read-only" in out.stderr  # said once
    assert "cannot create" in result["new"] and "writable directory" in result["new"]
    assert {name: (base / name).read_bytes() for name in os.listdir(base)} == before  # nothing moved or written
