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
    SearchHit,
    SearchTool,
    ToolCall,
    ToolRegistry,
    format_hits,
)
from trl_appo.tools.search import default_corpus_path, parse_pages


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


@pytest.mark.parametrize("value", ["not json", '{"text": "a dict, not a list"}', '[{"nope": 1}]', "[1, 2]"])
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
