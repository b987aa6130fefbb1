"""Search tool: FTS5 index over parquet / jsonl / text, BM25 ranking, token budget, the index stage."""

from __future__ import annotations

import json
import sqlite3

import pytest

from chatforge.common import ChatforgeError
from chatforge.tools.search import (SearchResult, SqliteSearch, build_index, format_results, fts_query, passages,
                                    search_tool)

DOCS = [
    {"id": "a", "url": "https://en.example/paris", "text": "Paris is the capital of France.\n\nIt lies on the Seine river."},
    {"id": "b", "url": "https://en.example/london", "text": "London is the capital of England. The Thames flows through it."},
    {"id": "c", "url": "https://en.example/cats", "text": "Cats sleep a lot.\n\nA cat can sleep sixteen hours a day."},
    {"id": "d", "url": "https://en.example/rivers", "text": "Rivers of France: the Seine, the Loire, the Rhone. "
                                                            "The Seine flows through Paris."},
]


@pytest.fixture
def shard(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**d, "date": "2024-01-01", "lang": "en", "lang_score": 0.99} for d in DOCS]
    path = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_index_parquet_and_bm25_ranking(tmp_path, shard):
    summary = build_index([shard], tmp_path / "idx.sqlite")
    assert summary["documents"] == 4 and summary["bad_records"] == 0
    s = SqliteSearch(tmp_path / "idx.sqlite")
    hits = s.search("capital of France", k=3)
    assert hits[0].url == "https://en.example/paris" and hits[0].title == "Paris is the capital of France."
    assert hits[0].score >= hits[-1].score
    assert s.search("seine river", k=5)[0].url in ("https://en.example/paris", "https://en.example/rivers")
    assert s.search("sleeping cats")[0].url == "https://en.example/cats"  # porter stemming
    assert s.search("zzzqqq") == [] and s.search("?!") == []
    assert s.search('what\'s "C++" AND OR NOT (paris') != []  # free text never raises FTS5 syntax errors


def test_jsonl_and_text_inputs(tmp_path):
    j = tmp_path / "docs.jsonl"
    j.write_text("\n".join(json.dumps(d) for d in DOCS[:2]) + "\nnot json\n{\"text\": \"\"}\n")
    t = tmp_path / "notes.txt"
    t.write_text("Kettles boil water.\n\nToasters brown bread.\n")
    summary = build_index([j, str(tmp_path / "*.txt")], tmp_path / "idx.sqlite")
    # blank-line separated blocks are documents, as for the tokenizer and pretraining (one reader)
    assert summary["documents"] == 4 and summary["bad_records"] == 2
    hit = SqliteSearch(tmp_path / "idx.sqlite").search("toasters")[0]
    assert hit.url == "notes.txt#1" and hit.title == "Toasters brown bread." and "Toasters" in hit.snippet


def test_reads_the_documents_the_tokenizer_reads(tmp_path, shard):
    """One corpus reader: the index holds exactly the documents `iter_documents` gives the tokenizer
    and pretraining, whatever the format (a JSON list and gzipped text included)."""
    import gzip

    from chatforge.corpus import iter_documents

    (tmp_path / "list.json").write_text(json.dumps([{"question": "Why is the sky blue?", "answer": "Rayleigh."}]))
    with gzip.open(tmp_path / "book.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Chapter one.\n\nIt was a dark night.\n\n\nThe end.\n")
    files = [shard, tmp_path / "list.json", tmp_path / "book.txt.gz"]
    summary = build_index(files, tmp_path / "idx.sqlite", passage_chars=10_000)
    expected = list(iter_documents(files, doc_chars=100_000))
    assert summary["documents"] == len(expected) == 8
    db = sqlite3.connect(tmp_path / "idx.sqlite")
    assert sorted(b for (b,) in db.execute("SELECT body FROM passages")) == sorted(e.strip() for e in expected)
    assert SqliteSearch(tmp_path / "idx.sqlite").search("Rayleigh")[0].url == "list.json#0"


def test_document_boundaries_and_record_fields(tmp_path):
    """What one document is, written out by hand: blank lines (CRLF files too) separate paragraphs; a file
    without blank lines (a trailing one does not count) is one document per line; a record's 'content' is
    its text, not its url/title; whitespace-only records are bad records, not empty documents."""
    from chatforge.corpus import CorpusStats, iter_documents

    (tmp_path / "book.txt").write_bytes(b"Para one, line 1\r\nline 2\r\n\r\nPara two.\r\n")
    (tmp_path / "lines.txt").write_text("Article one.\nArticle two.\nArticle three.\n\n")
    (tmp_path / "recs.jsonl").write_text(
        json.dumps({"content": "Kettles boil water.", "url": "https://ex.org/k", "title": "Kettles"}) + "\n"
        + json.dumps({"text": "   "}) + "\n")
    stats = CorpusStats()
    docs = list(iter_documents([tmp_path / "book.txt", tmp_path / "lines.txt", tmp_path / "recs.jsonl"],
                               stats=stats))
    assert docs == ["Para one, line 1\nline 2", "Para two.\n", "Article one.", "Article two.", "Article three.",
                    "Kettles boil water."]
    assert stats.bad_records == 1
    summary = build_index([tmp_path / "recs.jsonl"], tmp_path / "idx.sqlite")
    assert summary["documents"] == 1
    [hit] = SqliteSearch(tmp_path / "idx.sqlite").search("kettles")
    assert (hit.url, hit.title) == ("https://ex.org/k", "Kettles") and "ex.org" not in hit.snippet


def test_file_name_with_glob_characters(tmp_path, shard):
    """`[` in a file name: the inputs are expanded once, so the file is indexed, not read as a glob
    (`a[1].txt` as a glob would match `a1.txt`)."""
    from chatforge.cli import main

    odd = tmp_path / "notes [draft].txt"
    odd.write_text("Kettles boil water.\n")
    (tmp_path / "notes d.txt").write_text("Decoy matched by the glob.\n")  # what the glob [draft] would match
    assert build_index([str(odd)], tmp_path / "idx.sqlite")["files"] == [str(odd)]
    assert build_index([odd], tmp_path / "idx.sqlite")["files"] == [str(odd)]
    rc = main(["index", "--runs_dir", str(tmp_path / "runs"), "--run", "t", "--inputs", str(odd)])
    assert rc == 0
    hit = SqliteSearch(tmp_path / "runs" / "t" / "index" / "search.sqlite").search("kettles")[0]
    assert hit.url == "notes [draft].txt#0"


def test_token_budget_and_tool(tmp_path, shard):
    build_index([shard], tmp_path / "idx.sqlite")
    tool = search_tool(tmp_path / "idx.sqlite", k=3, token_budget=40)
    out = tool.fn("capital of France")
    assert out.startswith("[1] Paris is the capital of France.\nhttps://en.example/paris\n")
    assert (len(out) + 3) // 4 <= 40
    many = [SearchResult(f"T{i}", f"u{i}", "word " * 50, 1.0) for i in range(5)]
    words = lambda s: len(s.split())  # a custom token counter
    assert words(format_results(many, 60, words)) <= 60
    assert format_results([], 10) == "no results"
    with pytest.raises(Exception, match="empty query"):
        tool.fn("   ")


def test_errors(tmp_path):
    with pytest.raises(ChatforgeError, match="not found"):
        build_index([tmp_path / "missing.parquet"], tmp_path / "x.sqlite")
    with pytest.raises(ChatforgeError, match="matches no file"):
        build_index([str(tmp_path / "*.parquet")], tmp_path / "x.sqlite")
    with pytest.raises(ChatforgeError, match="chatforge index"):
        SqliteSearch(tmp_path / "nope.sqlite")
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not a database")
    with pytest.raises(ChatforgeError, match="not a chatforge search index"):
        SqliteSearch(bad)


def test_passages():
    text = "\n\n".join(["para " * 30] * 5)
    parts = passages(text, 400)
    assert all(len(p) <= 400 for p in parts) and len(parts) >= 3
    assert passages("x" * 1000, 300)[0] == "x" * 300  # no space to cut at
    assert fts_query("hello, world!") == '"hello" OR "world"'


def test_index_stage(tmp_path, shard):
    from chatforge.cli import main

    rc = main(["index", "--runs_dir", str(tmp_path / "runs"), "--run", "t", "--inputs", str(shard)])
    assert rc == 0
    out = tmp_path / "runs" / "t" / "index"
    assert (out / "search.sqlite").exists() and (out / "DONE").exists()
    done = json.loads((out / "DONE").read_text())
    assert done["documents"] == 4 and done["passages"] >= 4
    assert SqliteSearch(out / "search.sqlite").search("London")[0].url == "https://en.example/london"
    # the data stage's shards are the default input
    data = tmp_path / "runs" / "t2" / "data"
    (data / "shards").mkdir(parents=True)
    shard.rename(data / "shards" / shard.name)
    (data / "DONE").write_text("{}")
    assert main(["index", "--runs_dir", str(tmp_path / "runs"), "--run", "t2"]) == 0
    assert main(["index", "--runs_dir", str(tmp_path / "runs"), "--run", "t3"]) == 2  # no data stage: clear error


def test_one_document_per_line_text(tmp_path):
    t = tmp_path / "articles.txt"
    t.write_text("Anarchism is a political philosophy.\nAlbedo is the diffuse reflection of light.\n")
    assert build_index([t], tmp_path / "idx.sqlite")["documents"] == 2
    hit = SqliteSearch(tmp_path / "idx.sqlite").search("albedo reflection")[0]
    assert hit.url == "articles.txt#1" and hit.title.startswith("Albedo")
