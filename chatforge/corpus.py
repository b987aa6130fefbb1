"""Reading a text corpus: the one reader the tokenizer, pretraining and the search index share.

Files are .parquet (the `text` column), .jsonl / .json (one record per line, or a JSON list; see
`record_text`) or plain UTF-8 text (blank-line separated blocks, else one document per line), each
optionally gzipped. `expand_corpus` turns paths, globs and `stage:NAME` entries into a file list once;
`read_documents` streams `Document`s from it, counting into a `CorpusStats`; `iter_documents` is the
text-only shortcut. A bad record is skipped and counted; a missing, unreadable or non-UTF-8 file is one
clear error naming it.

    from chatforge.corpus import CorpusStats, expand_corpus, read_documents
    stats = CorpusStats()
    for doc in read_documents(expand_corpus(["text/*.txt"], data_dir_setting), stats=stats):
        doc.text, doc.source, doc.meta
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from chatforge.common import ChatforgeError, data_dir, data_path


@dataclass
class CorpusStats:
    """What a read saw, filled in as documents stream out of `read_documents`."""

    files: int = 0
    documents: int = 0
    chars: int = 0
    truncated: int = 0
    bad_records: int = 0


STAGE_PREFIX = "stage:"


def stage_shards(stage_path: Path) -> list[Path]:
    """The text shards a complete stage publishes: `<stage dir>/shards/*.parquet` (the data stage's
    output), else any `*.parquet` directly in the stage folder."""
    return sorted((stage_path / "shards").glob("*.parquet")) or sorted(stage_path.glob("*.parquet"))


def expand_corpus(paths: Iterable[str | Path], data_dir_setting: str = "", run: Any = None) -> list[Path]:
    """Files named by paths or globs; relative names are looked up in the data dir too.

    A string that names an existing file is that file, even when it holds glob characters (`a[1].txt`);
    otherwise `*?[` make it a glob. A `Path` is always the file it names, never a glob, so a list this
    function returned passes through it unchanged (expand once, hand the list on). The entry
    `stage:NAME` (e.g. `stage:data`) stands for the text shards of stage NAME of `run` (a stage
    config: anything with `runs_dir` and `run`), which must be complete."""
    out: list[Path] = []
    for p in paths:
        if isinstance(p, Path):
            if not p.exists():
                raise ChatforgeError(f"corpus file '{p}' not found")
            out.append(p)
            continue
        if p.startswith(STAGE_PREFIX):
            stage = p[len(STAGE_PREFIX):]
            if run is None:
                raise ChatforgeError(f"corpus entry '{p}' names a stage, but no run was given to resolve it")
            from chatforge.common import require_stage

            shards = stage_shards(require_stage(run, stage))
            if not shards:
                raise ChatforgeError(f"corpus entry '{p}': stage '{stage}' of run '{run.run}' has no parquet "
                                     f"shards; rerun it with --force")
            out.extend(shards)
            continue
        root = "" if os.path.isabs(p) else str(data_dir(data_dir_setting))
        literal = next((Path(c) for c in (p, os.path.join(root, p)) if os.path.isfile(c)), None)
        if literal is None and any(ch in p for ch in "*?["):
            hits = sorted(glob.glob(p)) or sorted(glob.glob(os.path.join(root, p)))
            if not hits:
                raise ChatforgeError(f"corpus glob '{p}' matches no file (cwd and data dir {root or '/'})")
            out.extend(Path(h) for h in hits)
        else:
            out.append(literal or data_path(p, data_dir_setting))
    for f in out:
        if f.is_dir():
            raise ChatforgeError(f"corpus entry '{f}' is a folder; give files or a glob like '{f}/*.parquet'")
    return out


def _open_text(path: Path):
    # universal newlines: a CRLF file reads as LF, so its blank lines separate documents too
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="strict")
    return open(path, "r", encoding="utf-8", errors="strict")


def record_text(rec: Any) -> str:
    """The text of a JSON record: its 'text' (else 'content') field; else every nested 'text' field joined by blank
    lines (OASST message trees); else its string values and lists of strings joined by newlines
    (GSM8K question+answer, MT-bench turns, HumanEval prompt+solution).

    >>> record_text({"question": "1+1?", "answer": "2"})
    '1+1?\\n2'
    """
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return ""
    for key in ("text", "content"):
        if isinstance(rec.get(key), str):
            return rec[key]
    nested: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("text"), str):
                nested.append(x["text"])
            for k, v in x.items():
                if k != "text":
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(rec)
    if nested:
        return "\n\n".join(nested)
    parts: list[str] = []
    for v in rec.values():
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts.extend(x for x in v if isinstance(x, str))
    return "\n".join(parts)


_BLANK_LINE = re.compile(r"\n\s*\n")


def _split_plain(text: str, doc_chars: int) -> Iterator[str]:
    """Plain text has no document boundaries: blank-line separated blocks are documents, and a file
    with no blank line at all is one document per line (e.g. one article per line). A block longer
    than doc_chars (0 = no limit) is cut on line boundaries so nothing is thrown away.

    >>> list(_split_plain("a\\nb\\n\\nc\\n", 100)), list(_split_plain("a\\nb\\n\\n", 100))
    (['a\\nb', 'c\\n'], ['a', 'b'])
    """
    # a blank line (spaces allowed) inside the text, not just a trailing one, makes it paragraph-separated
    blocks = _BLANK_LINE.split(text) if _BLANK_LINE.search(text.strip()) else text.split("\n")
    for block in blocks:
        if not block.strip():
            continue
        if not doc_chars or len(block) <= doc_chars:
            yield block
            continue
        piece: list[str] = []
        size = 0
        for line in block.split("\n"):
            if size + len(line) + 1 > doc_chars and piece:
                yield "\n".join(piece)
                piece, size = [], 0
            piece.append(line)
            size += len(line) + 1
        if piece:
            yield "\n".join(piece)


class Document(NamedTuple):
    """One document of a corpus file."""

    text: str
    source: str  # "<file name>#<n>": the n-th row, line, list element or text block of the file, from 0
    meta: dict  # the string values of the record fields asked for (e.g. url, title); {} for plain text


def _iter_file(path: Path, doc_chars: int, stats: CorpusStats, fields: tuple[str, ...]) -> Iterator[Document]:
    name = path.name.removesuffix(".gz")

    def doc(n: int, text: Any, rec: Any) -> Document | None:
        if not isinstance(text, str) or not text.strip():
            stats.bad_records += 1  # a long job skips and counts a bad record
            return None
        meta = {k: rec[k] for k in fields if isinstance(rec.get(k), str) and rec[k]} if isinstance(rec, dict) else {}
        return Document(text, f"{path.name}#{n}", meta)

    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises several types for a bad file
                raise ChatforgeError(f"corpus file '{path}' is not a readable parquet file ({e})") from None
            columns = pf.schema_arrow.names
            if "text" not in columns:
                raise ChatforgeError(f"corpus file '{path}' has no 'text' column (columns: {columns})")
            n = 0
            for batch in pf.iter_batches(columns=["text", *(c for c in fields if c in columns and c != "text")],
                                         batch_size=1024):
                texts = batch.column(0).to_pylist()
                recs = batch.to_pylist() if fields else [None] * len(texts)
                for text, rec in zip(texts, recs):
                    if (d := doc(n, text, rec)) is not None:
                        yield d
                    n += 1
        elif name.endswith((".jsonl", ".json")):
            with _open_text(path) as f:
                first = f.read(256).lstrip()[:1]  # a JSON list may start after whitespace
                f.seek(0)
                if name.endswith(".json") and first == "[":  # a JSON list of records
                    try:
                        records: Iterable[Any] = json.load(f)
                    except json.JSONDecodeError as e:
                        raise ChatforgeError(f"corpus file '{path}' is not valid JSON ({e})") from None
                    for n, rec in enumerate(records):
                        if (d := doc(n, record_text(rec), rec)) is not None:
                            yield d
                    return
                for n, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        rec = None
                    if (d := doc(n, record_text(rec), rec)) is not None:
                        yield d
        else:
            with _open_text(path) as f:
                for n, text in enumerate(_split_plain(f.read(), doc_chars)):
                    yield Document(text, f"{path.name}#{n}", {})
    except UnicodeDecodeError as e:
        raise ChatforgeError(
            f"corpus file '{path}' is not valid UTF-8 (byte {e.object[e.start:e.start + 1]!r} at offset "
            f"~{e.start} of a chunk); convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    except (OSError, EOFError) as e:
        raise ChatforgeError(f"corpus file '{path}' could not be read ({e})") from None


def read_documents(files: Iterable[Path], doc_chars: int = 10_000, max_chars: int = 0,
                   stats: CorpusStats | None = None, fields: tuple[str, ...] = ()) -> Iterator[Document]:
    """The documents of files (from `expand_corpus`): .parquet (the `text` column), .jsonl / .json
    (`record_text` of each record), else UTF-8 text, optionally gzipped. Each is truncated to doc_chars
    (0 = no limit); reading stops after max_chars in total (0 = no limit). `fields` names record fields
    to keep in Document.meta (e.g. ("url", "title") for the search index). Records without text are
    counted in stats.bad_records and skipped; a missing, unreadable or non-UTF-8 file is an error."""
    stats = stats if stats is not None else CorpusStats()
    for path in files:
        stats.files += 1
        for doc in _iter_file(Path(path), doc_chars, stats, fields):
            if doc_chars and len(doc.text) > doc_chars:
                doc = doc._replace(text=doc.text[:doc_chars])
                stats.truncated += 1
            stats.documents += 1
            stats.chars += len(doc.text)
            yield doc
            if max_chars and stats.chars >= max_chars:
                return


def iter_documents(paths: Iterable[str | Path], data_dir_setting: str = "", doc_chars: int = 10_000,
                   max_chars: int = 0, stats: CorpusStats | None = None, run: Any = None) -> Iterator[str]:
    """The text of `read_documents` over `expand_corpus(paths, data_dir_setting, run)`: documents
    truncated to doc_chars, stopping after max_chars in total (0 = no limit). `stats` is filled in as
    documents are read; `run` resolves `stage:NAME` entries."""
    for doc in read_documents(expand_corpus(paths, data_dir_setting, run), doc_chars, max_chars, stats):
        yield doc.text
