"""The search tool: BM25 full-text search over the run's documents, results within a token budget.

    build_index(["runs/tiny/data/shards/*.parquet"], "runs/tiny/index/search.sqlite")
    backend = SqliteSearch("runs/tiny/index/search.sqlite")
    backend.search("capital of France", k=3)          # -> [SearchResult(title, url, snippet, score)]
    format_results(results, token_budget=256)        # what the model sees

The default backend is SQLite's FTS5 extension (in the standard library's sqlite3 on every mainstream
build): a real inverted index with BM25 ranking (Robertson & Zaragoza 2009) and no server to run.
Documents are split into passages of about `passage_chars` on paragraph boundaries before indexing,
so a hit points at the relevant part of a long page, and BM25's length normalisation compares
like-sized units. Another engine (Elasticsearch, a vector store, a web API) plugs in by implementing
`SearchBackend.search`.

Model queries are free text, not FTS5 syntax: `fts_query` keeps the words and ORs them, so a query
like `what's "C++"?` cannot raise a syntax error, and BM25 still rewards documents matching more of them.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from chatforge.common import ChatforgeError
from chatforge.corpus import CorpusStats, expand_corpus, read_documents


@dataclass
class SearchResult:
    title: str
    url: str
    snippet: str
    score: float  # higher is better (negated FTS5 bm25)


class SearchBackend(Protocol):
    """Anything that answers a free-text query with ranked results."""

    def search(self, query: str, k: int = 5) -> list[SearchResult]: ...


@dataclass
class Doc:
    title: str
    url: str
    text: str


# ----------------------------------------------------------------------------------------------
# Documents: read with the corpus reader the tokenizer and pretraining use (chatforge.tokenizer)


def _title_of(text: str) -> str:
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first[:80] + ("…" if len(first) > 80 else "")


def iter_docs(files: Iterable[Path], stats: CorpusStats | None = None) -> Iterator[Doc]:
    """Documents of files (from `expand_corpus`) through `chatforge.corpus.read_documents`, so the
    index sees the documents the model was trained on: parquet `text` column, .jsonl / .json records,
    plain text by blank-line blocks (one document per line in a file without blank lines), never
    truncated (long documents are cut into passages instead). The title is the record's `title`, else
    the first line; the URL its `url` (or `source`), else `file#n`. Bad records are counted in
    stats.bad_records and skipped."""
    for d in read_documents(files, doc_chars=0, stats=stats, fields=("url", "source", "title")):
        yield Doc(d.meta.get("title") or _title_of(d.text), d.meta.get("url") or d.meta.get("source") or d.source,
                  d.text)


def passages(text: str, passage_chars: int) -> list[str]:
    """Split on paragraph (then line) boundaries into pieces of at most ~passage_chars.

    >>> passages("a\\n\\nb\\n\\nc", 4)
    ['a\\n\\nb', 'c']
    """
    out, buf, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        while len(para) > passage_chars:  # one huge paragraph: cut at a space near the limit
            cut = para.rfind(" ", 0, passage_chars)
            cut = cut if cut > passage_chars // 2 else passage_chars
            if buf:
                out.append("\n\n".join(buf))
                buf, size = [], 0
            out.append(para[:cut])
            para = para[cut:].lstrip()
        if size and size + len(para) > passage_chars:
            out.append("\n\n".join(buf))
            buf, size = [], 0
        buf.append(para)
        size += len(para) + 2
    if buf:
        out.append("\n\n".join(buf))
    return out


# ----------------------------------------------------------------------------------------------
# The SQLite FTS5 backend

_SCHEMA = """
CREATE VIRTUAL TABLE passages USING fts5(title, url UNINDEXED, body, tokenize = 'porter unicode61');
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
"""


def build_index(paths: Iterable[str | Path], out: str | Path, passage_chars: int = 1200, max_docs: int = 0,
                log: Callable[[str], None] | None = None) -> dict:
    """Index documents from files or globs (`chatforge.corpus.expand_corpus`: a `Path` is a file,
    a string may be a glob) into a new SQLite FTS5 database at `out` (written to a temporary file and
    renamed, so a crash never leaves half an index). Returns counts."""
    files = expand_corpus(paths)  # once: a file name with glob characters (`a[1].txt`) stays a file
    if not files:
        raise ChatforgeError("no input files to index; give .parquet, .jsonl or text files")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    t0 = time.time()
    stats = CorpusStats()
    n_docs = n_passages = n_chars = 0
    db = sqlite3.connect(tmp)
    try:
        db.executescript(_SCHEMA)
        rows = []
        for doc in iter_docs(files, stats):
            n_docs += 1
            n_chars += len(doc.text)
            for i, body in enumerate(passages(doc.text, passage_chars)):
                rows.append((doc.title, doc.url, body))
            if len(rows) >= 5000:
                db.executemany("INSERT INTO passages VALUES (?, ?, ?)", rows)
                n_passages += len(rows)
                rows.clear()
                if log:
                    log(f"index: {n_docs:,} documents, {n_passages:,} passages ({n_chars / (time.time() - t0) / 1e6:.1f} MB/s)")
            if max_docs and n_docs >= max_docs:
                break
        db.executemany("INSERT INTO passages VALUES (?, ?, ?)", rows)
        n_passages += len(rows)
        db.execute("INSERT INTO passages(passages) VALUES ('optimize')")  # merge segments: faster queries
        summary = {"documents": n_docs, "passages": n_passages, "chars": n_chars,
                   "bad_records": stats.bad_records, "files": [str(f) for f in files],
                   "seconds": round(time.time() - t0, 2)}
        db.execute("INSERT INTO meta VALUES ('summary', ?)", (json.dumps(summary),))
        db.commit()
    finally:
        db.close()
    tmp.replace(out)
    return summary


def fts_query(text: str) -> str:
    """Free text -> an FTS5 query: the words, each quoted, OR-ed (BM25 rewards matching more).

    >>> fts_query('what\\'s "C++" in 2024?')
    '"what" OR "s" OR "C" OR "in" OR "2024"'
    """
    words = re.findall(r"\w+", text)[:32]
    return " OR ".join(f'"{w}"' for w in words)


class SqliteSearch:
    """SearchBackend over an index written by build_index (read-only; safe to share across calls)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ChatforgeError(f"search index {self.path} not found; build one with `chatforge index`")
        self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        try:
            self.db.execute("SELECT count(*) FROM passages LIMIT 1").fetchone()
        except sqlite3.DatabaseError as e:
            raise ChatforgeError(f"{self.path} is not a chatforge search index ({e})") from None

    def search(self, query: str, k: int = 5) -> list[SearchResult]:
        q = fts_query(query)
        if not q:
            return []
        # bm25(): lower is better; columns weighted title 2, url 0, body 1. snippet(): up to 40 tokens
        # of the body around the matches.
        rows = self.db.execute(
            "SELECT title, url, snippet(passages, 2, '', '', ' … ', 40), bm25(passages, 2.0, 0.0, 1.0) AS s "
            "FROM passages WHERE passages MATCH ? ORDER BY s LIMIT ?", (q, k)).fetchall()
        return [SearchResult(t, u, " ".join(sn.split()), -s) for t, u, sn, s in rows]


def format_results(results: list[SearchResult], token_budget: int = 256,
                   count_tokens: Callable[[str], int] | None = None) -> str:
    """Numbered title / url / snippet blocks, as many as fit in token_budget (the last one that does
    not fit is cut to the remaining budget). count_tokens defaults to ~4 characters per token.

    >>> format_results([SearchResult("T", "u", "some words here", 1.0)], 100)
    '[1] T\\nu\\nsome words here'
    """
    count = count_tokens or (lambda s: (len(s) + 3) // 4)
    if not results:
        return "no results"
    out: list[str] = []
    used = 0
    for i, r in enumerate(results, 1):
        block = f"[{i}] {r.title}\n{r.url}\n{r.snippet}"
        sep = 2 if out else 0
        need = count(block) + sep
        if used + need > token_budget:
            left = token_budget - used - sep
            if left > 16:  # cut this block by words until it fits
                words = block.split(" ")
                while words and count(" ".join(words) + " …") > left:
                    words = words[: max(1, int(len(words) * 0.8))] if len(words) > 1 else []
                if words:
                    out.append(" ".join(words) + " …")
            break
        out.append(block)
        used += need
    return "\n\n".join(out) if out else "no results fit the token budget"


def search_tool(backend: SearchBackend | str | Path | None, k: int = 3, token_budget: int = 256,
                count_tokens: Callable[[str], int] | None = None):
    """The `search` Tool: query -> formatted results. `backend` may be an index path; None gives a
    tool that explains how to build an index (so a model calling it gets a readable error)."""
    from chatforge.tools import Tool, ToolError

    if isinstance(backend, (str, Path)):
        backend = SqliteSearch(backend)

    def fn(query: str) -> str:
        if backend is None:
            raise ToolError("no search index is loaded; build one with `chatforge index` and pass it to the chat")
        if not query.strip():
            raise ToolError("empty query; write the words to search for between the search tokens")
        return format_results(backend.search(query, k), token_budget, count_tokens)

    return Tool("search", "full-text search over the indexed documents; returns titles, URLs and snippets", fn)
