"""One task of the data stage: a WARC file in, a staged parquet file of filtered documents out.

    read -> url -> extract -> lang -> gopher_rep -> gopher_quality -> c4 -> fineweb -> pii
    (then, over all tasks' outputs, the dedup phase: chatforge.data.dedup)

Every document that enters a step either leaves it or is dropped under a named reason, so for each
step `in == out + sum(dropped)`; the stats also hold seconds and words per step (words are
whitespace-separated tokens of the extracted text; before extraction there is no text to count).
A document that makes a step raise is dropped under `error:<ExceptionType>`: a long job never dies on
one bad record. But a step that raises is a bug (ours or a library's), not bad input, so once a step's
errors in a task pass `MAX_STEP_ERRORS` and `MAX_STEP_ERROR_SHARE` of the documents it saw, the task
fails with one error naming the step and the first exception: data is never dropped silently en masse.

Outputs of task i in `<stage>/tasks/` (each written atomically; the marker last):
    i.staged        parquet: the output schema + `exact_hash`, `band_keys` for the dedup phase
                    (not named .parquet so nothing mistakes it for a finished shard)
    i.dropped.jsonl a few dropped documents per reason, for `chatforge data inspect`
    i.json          the task's stats + the settings fingerprint: the completion marker
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from chatforge.common import ChatforgeError, atomic_write_text
from chatforge.data.dedup import MinHasher, exact_hash
from chatforge.data.extract import ExtractionTimeout, TooDeep, extract_text
from chatforge.data.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                    GopherRepetitionFilter, URLFilter)
from chatforge.data.langid import LanguageFilter
from chatforge.data.pii import PIIMasker
from chatforge.data.warc import READER_VERSION, Page, decode_html, iter_pages, parse_date

# The output shard schema (documented in the README).
SCHEMA = pa.schema([
    ("id", pa.string()),            # WARC-Record-ID (urn:uuid:...)
    ("url", pa.string()),           # WARC-Target-URI
    ("date", pa.string()),          # WARC-Date, ISO 8601
    ("text", pa.string()),          # clean main-content text, PII masked
    ("lang", pa.string()),          # fastText lid.176 language code
    ("lang_score", pa.float32()),   # its probability
    ("pii_emails", pa.int32()),     # e-mail addresses masked in this document
    ("pii_ips", pa.int32()),        # public IP addresses masked
    ("pii_phones", pa.int32()),     # phone numbers masked
    ("source", pa.string()),        # input file name
])
STAGED_SCHEMA = SCHEMA.append(pa.field("exact_hash", pa.int64())).append(pa.field("band_keys", pa.binary()))
STEPS = ["read", "url", "extract", "lang", "gopher_rep", "gopher_quality", "c4", "fineweb", "pii", "dedup"]
# Settings that change what a task produces; the others (workers, executor, shard size) do not. The
# dedup switches do count: a task stages exact hashes and band keys only when they are on.
_NOT_IN_FINGERPRINT = {"run", "runs_dir", "device", "threads", "force", "workers", "executor", "ray_address",
                       "shard_docs", "sample_dropped"}
_FLUSH_DOCS = 500  # staged rows per parquet row group: bounds a worker's memory
_FILE_LEVEL = ("skip:malformed_file", "skip:unreadable_file", "skip:empty_file")  # iter_pages' per-file keys
# A step that raises on more than this many documents of a task AND on more than this share of the documents
# it saw fails the task. One odd page in a million is counted and skipped; a filter that raises on every page
# (a bug, a missing dependency: without lxml_html_clean every trafilatura call raises ImportError) stops the run
# after 11 pages instead of "keeping" nothing.
MAX_STEP_ERRORS = 10
MAX_STEP_ERROR_SHARE = 0.01


def settings_fingerprint(cfg: Any, extra: dict | None = None) -> str:
    d = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    d["warc_reader"] = READER_VERSION  # a reader that recovers more records redoes the tasks of an older one
    d.update(extra or {})
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def empty_stats() -> dict:
    return {"files": 0, "records": 0, "record_types": {}, "file_errors": {}, "decode": {},
            "pii": {"emails": 0, "ips": 0, "phones": 0}, "bytes_in": 0, "seconds": 0.0,
            "steps": {s: {"in": 0, "out": 0, "dropped": {}, "seconds": 0.0, "words_in": 0, "words_out": 0}
                      for s in STEPS}}


def merge_stats(total: dict, part: dict) -> dict:
    """Add `part` into `total` (nested counts summed)."""
    for k, v in part.items():
        if isinstance(v, dict):
            merge_stats(total.setdefault(k, {}), v)
        elif isinstance(v, (int, float)):
            total[k] = total.get(k, 0) + v
    return total


class _Doc:
    """What the filters see: text, url, meta (a Page after extraction)."""

    __slots__ = ("id", "url", "date", "text", "meta", "words")

    def __init__(self, page: Page, text: str):
        self.id, self.url, self.date, self.text = page.id, page.url, page.date, text
        self.meta = dict(page.meta)
        self.words = len(text.split())


def build_filters(cfg, blocklist: str) -> list[tuple[str, Any]]:
    """The text filters in FineWeb's order, as (step name, filter object); switched-off steps are
    left out (their stats stay at zero)."""
    steps: list[tuple[str, Any]] = []
    if cfg.languages or cfg.lang_threshold > 0:
        steps.append(("lang", LanguageFilter(cfg.languages, cfg.lang_threshold)))
    if cfg.gopher_repetition:
        steps.append(("gopher_rep", GopherRepetitionFilter()))
    if cfg.gopher_quality:
        steps.append(("gopher_quality", GopherQualityFilter(min_doc_words=cfg.min_doc_words)))
    if cfg.c4:
        steps.append(("c4", C4QualityFilter(filter_no_terminal_punct=False)))
    if cfg.fineweb:
        steps.append(("fineweb", FineWebQualityFilter()))
    return steps


class TaskRunner:
    """Runs the per-document steps over one input file and writes the staged output."""

    def __init__(self, cfg, blocklist: str):
        self.cfg = cfg
        self.url_filter = URLFilter(blocklist, cfg.url_words) if cfg.url_filter else None
        self.filters = build_filters(cfg, blocklist)
        self.pii = PIIMasker(*(k in cfg.pii for k in ("emails", "ips", "phones"))) if cfg.pii else None
        self.hasher = MinHasher(cfg.minhash_ngram, cfg.minhash_bands, cfg.minhash_rows)
        self.stats = empty_stats()
        self.samples: dict[tuple[str, str], list] = defaultdict(list)
        self.errors: Counter = Counter()  # step -> documents that made it raise
        self.first_error: dict[str, str] = {}  # step -> the first exception, for the failure message
        self.source = ""  # the input file, for the failure message

    # -- bookkeeping ------------------------------------------------------------------------------
    def _drop(self, step: str, reason: str, doc: _Doc | Page | None, words: int = 0) -> None:
        st = self.stats["steps"][step]
        st["dropped"][reason] = st["dropped"].get(reason, 0) + 1
        key = (step, reason)
        if self.cfg.sample_dropped and doc is not None and len(self.samples[key]) < self.cfg.sample_dropped:
            text = doc.text if isinstance(doc, _Doc) else ""
            self.samples[key].append({"step": step, "reason": reason, "url": doc.url, "words": words,
                                      "text": (text or "")[:3000]})

    def _error(self, step: str, what: Any, e: Exception, url: str) -> tuple[bool, str]:
        """Count an exception raised by step `step` (object `what`) as an `error:<type>` drop; raise
        ChatforgeError once the step's errors pass the limits above."""
        self.errors[step] += 1
        if step not in self.first_error:
            tb = traceback.extract_tb(e.__traceback__)[-1:]
            where = f" at {os.path.basename(tb[0].filename)}:{tb[0].lineno}" if tb else ""
            self.first_error[step] = f"{type(e).__name__}: {str(e)[:200]}{where} (page {url})"
        n, seen = self.errors[step], self.stats["steps"][step]["in"]
        if n > MAX_STEP_ERRORS and n > MAX_STEP_ERROR_SHARE * seen:
            label = what if isinstance(what, str) else type(what).__name__
            raise ChatforgeError(
                f"data: step '{step}' ({label}) raised on {n} of the {seen} documents it saw in "
                f"{self.source or 'this task'}; first: {self.first_error[step]}. That is a bug or a broken install, "
                f"not bad input: fix it (or switch the step off) and rerun; finished tasks are kept")
        return False, f"error:{type(e).__name__}"

    def _enter(self, step: str, words: int = 0) -> dict:
        st = self.stats["steps"][step]
        st["in"] += 1
        st["words_in"] += words
        return st

    # -- the steps --------------------------------------------------------------------------------
    def process(self, page: Page) -> _Doc | None:
        cfg = self.cfg
        # 1. URL filter
        t = time.perf_counter()
        st = self._enter("url")
        if self.url_filter is not None:
            try:
                res = self.url_filter.filter(page)
            except Exception as e:  # noqa: BLE001
                res = self._error("url", self.url_filter, e, page.url)
            if res is not True:
                st["seconds"] += time.perf_counter() - t
                self._drop("url", res[1], page)
                return None
        st["out"] += 1
        st["seconds"] += time.perf_counter() - t
        # 2. HTML -> text
        t = time.perf_counter()
        st = self._enter("extract")
        try:
            if page.html is not None:
                raw, page.html = page.html, None  # free the bytes early: a worker holds one page at a time
                html, how = decode_html(raw, page.charset)
                self.stats["decode"][how] = self.stats["decode"].get(how, 0) + 1
                # the depth check reads the raw bytes: no re-encoding of the decoded page
                text = extract_text(html, cfg.extractor, cfg.extract_timeout, cfg.favor_precision, raw=raw)
                del raw
            else:  # WET conversion record: already text
                text = "\n".join(ln.strip() for ln in (page.text or "").splitlines() if ln.strip())
            reason = None if text.strip() else "empty"
        except ExtractionTimeout:
            text, reason = "", "timeout"
        except (TooDeep, RecursionError):  # pathologically nested HTML
            text, reason = "", "too_deep"
        except Exception as e:  # noqa: BLE001
            text, reason = "", self._error("extract", f"extractor {cfg.extractor}", e, page.url)[1]
        st["seconds"] += time.perf_counter() - t
        if reason:
            self._drop("extract", reason, page)
            return None
        doc = _Doc(page, text)
        st["out"] += 1
        st["words_out"] += doc.words
        # 3.-4. language ID and quality filters
        for name, f in self.filters:
            t = time.perf_counter()
            st = self._enter(name, doc.words)
            try:
                res = f.filter(doc)
            except Exception as e:  # noqa: BLE001
                res = self._error(name, f, e, doc.url)
            if res is True and doc.text is not text:  # C4 keeps only some lines: count what leaves
                text = doc.text
                doc.words = len(text.split())
            st["seconds"] += time.perf_counter() - t
            if res is not True:
                self._drop(name, res[1], doc, doc.words)
                return None
            st["out"] += 1
            st["words_out"] += doc.words
        # 5. PII
        t = time.perf_counter()
        st = self._enter("pii", doc.words)
        if self.pii is not None:
            counts = self.pii(doc)
            for k, v in counts.items():
                self.stats["pii"][k.removeprefix("pii_")] += v
            if any(counts.values()):  # a mask can join or split whitespace-separated words
                doc.words = len(doc.text.split())
        st["out"] += 1
        st["words_out"] += doc.words
        st["seconds"] += time.perf_counter() - t
        return doc

    def run_file(self, path: str, staged: Path, dropped: Path) -> dict:
        """Process one input file; write the staged parquet and dropped samples; return stats."""
        t0 = time.perf_counter()
        counts: Counter = Counter()
        source = os.path.basename(path)
        self.source = path
        rows: dict[str, list] = {f.name: [] for f in STAGED_SCHEMA}
        tmp = staged.with_name(f".{staged.name}.{os.getpid()}.tmp")
        writer = pq.ParquetWriter(tmp, STAGED_SCHEMA, compression="zstd")
        dedup_on = self.cfg.dedup_exact or self.cfg.dedup_minhash
        try:
            read = self.stats["steps"]["read"]
            t_read = time.perf_counter()
            for page in iter_pages(path, counts, self.cfg.max_page_bytes):
                read["seconds"] += time.perf_counter() - t_read
                read["out"] += 1
                doc = self.process(page)
                if doc is not None:
                    t = time.perf_counter()
                    rows["id"].append(doc.id)
                    rows["url"].append(doc.url)
                    rows["date"].append(parse_date(doc.date))
                    rows["text"].append(doc.text)
                    rows["lang"].append(doc.meta.get("lang", ""))
                    rows["lang_score"].append(doc.meta.get("lang_score", 0.0))
                    for k in ("pii_emails", "pii_ips", "pii_phones"):
                        rows[k].append(doc.meta.get(k, 0))
                    rows["source"].append(source)
                    rows["exact_hash"].append(exact_hash(doc.text) if dedup_on else 0)
                    rows["band_keys"].append(self.hasher.band_keys(doc.text).tobytes()
                                             if self.cfg.dedup_minhash else b"")
                    self.stats["steps"]["dedup"]["seconds"] += time.perf_counter() - t
                    if len(rows["id"]) >= _FLUSH_DOCS:
                        writer.write_table(pa.table(rows, schema=STAGED_SCHEMA))
                        rows = {k: [] for k in rows}
                t_read = time.perf_counter()
            if rows["id"]:
                writer.write_table(pa.table(rows, schema=STAGED_SCHEMA))
            writer.close()
            _fsync_replace(tmp, staged)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
        # read-step funnel: candidates in, pages out, every skip reason counted
        read["in"] += counts.get("candidates", 0)
        fe = self.stats["file_errors"]
        for k, v in counts.items():
            if k in _FILE_LEVEL or k.startswith("file:"):  # not documents: about the file itself
                fe[k.split(":", 1)[1]] = fe.get(k.split(":", 1)[1], 0) + v
            elif k.startswith("skip:"):
                read["dropped"][k[5:]] = read["dropped"].get(k[5:], 0) + v
            elif k.startswith(("error:", "damaged:")):
                fe[k] = fe.get(k, 0) + v
            elif k.startswith("record:"):
                self.stats["record_types"][k[7:]] = self.stats["record_types"].get(k[7:], 0) + v
        # a record cut short after the last page counts even when no page followed it
        self.stats["files"] += 1
        self.stats["records"] += counts.get("records", 0)
        try:
            self.stats["bytes_in"] += os.path.getsize(path)
        except OSError:
            pass
        self.stats["seconds"] += time.perf_counter() - t0
        lines = [json.dumps(x, ensure_ascii=False) for v in self.samples.values() for x in v]
        atomic_write_text(dropped, "\n".join(lines) + ("\n" if lines else ""))
        return self.stats


def _fsync_replace(tmp: Path, path: Path) -> None:
    """Rename a fully written file into place, its bytes on disk first (as `common.atomic_write`): a
    crash never leaves a complete-looking name over a half-written file. (The parquet writers stream to
    `tmp` themselves, so `atomic_write`, which wants the bytes in one call, does not fit here.)"""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def completed_task(task: dict) -> dict | None:
    """The task's marker if it finished with these settings on this input and its staged output is
    still there, else None (the task must run)."""
    tasks_dir = Path(task["tasks_dir"])
    stem = f"{task['index']:05d}"
    done = read_marker(tasks_dir / f"{stem}.json")
    if (done and done.get("fingerprint") == task["fingerprint"] and done.get("input") == task["input"]
            and (tasks_dir / f"{stem}.staged").exists()):
        return done
    return None


def run_task(task: dict) -> dict:
    """Executor entry point (a top-level function, so it pickles for processes and Ray).

    task: {"index", "input", "tasks_dir", "cfg" (DataConfig), "blocklist", "fingerprint"}.
    Returns the marker dict (stats + identity). Skips the work if the marker already matches."""
    tasks_dir = Path(task["tasks_dir"])
    stem = f"{task['index']:05d}"
    marker = tasks_dir / f"{stem}.json"
    done = completed_task(task)
    if done:
        return done
    runner = TaskRunner(task["cfg"], task["blocklist"])
    stats = runner.run_file(task["input"], tasks_dir / f"{stem}.staged", tasks_dir / f"{stem}.dropped.jsonl")
    result = {"index": task["index"], "input": task["input"], "fingerprint": task["fingerprint"],
              "pid": os.getpid(), "stats": stats}
    atomic_write_text(marker, json.dumps(result))  # last: its presence means the task is complete
    return result


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------
# Problems with whole input files, for the console: each damaged or unreadable input by name.

_DAMAGE = {"bad_content_length": "with a wrong Content-Length", "corrupt": "with corrupt compressed bytes",
           "truncated": "cut short by the end of the file"}


def file_problem(stats: dict) -> str | None:
    """What was wrong with one task's input file, in one line (None when nothing was).

    >>> file_problem({"records": 9, "file_errors": {"malformed_file": 1, "resynced_bytes": 512, "resyncs": 2}})
    'damaged, read around: 512 bytes of junk skipped at 2 place(s); 9 record(s) read'
    """
    fe = stats.get("file_errors") or {}
    errors = "; ".join(k[6:] for k in fe if k.startswith("error:"))
    if fe.get("empty_file"):
        return "empty file: nothing to read"
    if fe.get("unreadable_file"):
        return f"unreadable, not one WARC record found ({errors or 'not a WARC file'})"
    parts = [f"{fe['resynced_bytes']:,} bytes of junk skipped at {fe.get('resyncs', 0)} place(s)"] \
        if fe.get("resynced_bytes") else []
    lost = 0
    for reason, words in _DAMAGE.items():
        if fe.get(f"damaged:{reason}"):
            parts.append(f"{fe[f'damaged:{reason}']:,} record(s) {words} lost")
            lost += fe[f"damaged:{reason}"]
    if fe.get("gave_up"):
        parts.append("reading stopped there, the damage too dense to read around")
    if parts:
        return f"damaged, read around: {', '.join(parts)}; {stats.get('records', 0) - lost:,} record(s) read"
    if fe.get("malformed_file"):
        return f"reading stopped early ({errors}); {stats.get('records', 0):,} record(s) read before"
    return None


def check_readable(results: list[dict]) -> None:
    """Raise one clear error when not one input file held a readable record (a run over nothing
    must not look complete)."""
    bad = [r["input"] for r in results if not r["stats"].get("records")]
    if results and len(bad) == len(results):
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ChatforgeError(f"none of the {len(bad)} input file(s) holds a readable WARC record: {names} "
                             f"(empty, not WARC, or unreachable; see the lines above); fix --inputs")


# ----------------------------------------------------------------------------------------------
# The dedup phase: decide over all staged files, then write the final shards.


def dedup_and_write(staged: list[Path], shards_dir: Path, cfg, log=print) -> dict:
    """Run exact + MinHash dedup across all staged files (only the hash columns are loaded) and
    stream the survivors into `shards_dir/shard_NNNNN.parquet` of `cfg.shard_docs` rows each.
    Returns {"in", "out", "dropped", "seconds", "index_bytes", "shards"}."""
    from chatforge.data.dedup import cluster_duplicates

    t0 = time.perf_counter()
    ex_parts, key_parts = [], []
    for f in staged:
        tab = pq.read_table(f, columns=["exact_hash", "band_keys"])
        ex_parts.append(tab.column("exact_hash").to_numpy())
        bk = tab.column("band_keys").to_pylist()
        width = cfg.minhash_bands if cfg.dedup_minhash else 0
        arr = (np.frombuffer(b"".join(bk), dtype=np.uint64).reshape(len(bk), width) if width and bk
               else np.zeros((len(bk), width), np.uint64))
        key_parts.append(arr)
    exact = np.concatenate(ex_parts) if ex_parts else np.zeros(0, np.int64)
    keys = np.concatenate(key_parts) if key_parts else np.zeros((0, 0), np.uint64)
    if not cfg.dedup_minhash:
        keys = np.zeros((len(exact), 0), np.uint64)
    reason, _ = cluster_duplicates(keys, exact if cfg.dedup_exact else None)
    index_bytes = int(keys.nbytes + exact.nbytes + 8 * len(exact))  # + union-find parents
    # write shards
    shards_dir.mkdir(parents=True, exist_ok=True)
    for old in shards_dir.glob("*.parquet"):  # an interrupted earlier dedup phase: start clean
        old.unlink()
    n_shard, buf, pos, shards = 0, [], 0, []

    def flush(tables):
        nonlocal n_shard
        path = shards_dir / f"shard_{n_shard:05d}.parquet"
        tmp = shards_dir / f".{path.name}.tmp"
        pq.write_table(pa.concat_tables(tables), tmp, compression="zstd")
        _fsync_replace(tmp, path)
        shards.append(path.name)
        n_shard += 1

    buffered, words_in, words_out = 0, 0, 0
    for f in staged:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=1000, columns=SCHEMA.names):
            keep = reason[pos:pos + batch.num_rows] == 0
            pos += batch.num_rows
            words = pc.list_value_length(pc.utf8_split_whitespace(batch.column("text"))).to_numpy(zero_copy_only=False)
            words_in += int(words.sum())
            words_out += int(words[keep].sum())
            tab = pa.Table.from_batches([batch]).filter(pa.array(keep))
            while tab.num_rows:
                take = min(cfg.shard_docs - buffered, tab.num_rows)
                buf.append(tab.slice(0, take))
                buffered += take
                tab = tab.slice(take)
                if buffered >= cfg.shard_docs:
                    flush(buf)
                    buf, buffered = [], 0
    if buffered:
        flush(buf)
    dropped = {}
    if (reason == 1).any():
        dropped["exact"] = int((reason == 1).sum())
    if (reason == 2).any():
        dropped["near_duplicate"] = int((reason == 2).sum())
    return {"in": int(len(reason)), "out": int((reason == 0).sum()), "dropped": dropped,
            "words_in": words_in, "words_out": words_out, "seconds": time.perf_counter() - t0, "index_bytes": index_bytes, "shards": shards}


def run_stats(task_stats: list[dict], dedup: dict, cfg, *, inputs: list[str], wall: float, task_seconds: float,
              workers: int) -> dict:
    """The whole run's stats.json: the tasks' funnels summed, the dedup phase's counts (`dedup_and_write`'s
    result) as the last step, throughput and the settings."""
    stats = empty_stats()
    for part in task_stats:
        merge_stats(stats, part)
    dd = stats["steps"]["dedup"]
    dd.update({"in": dedup["in"], "out": dedup["out"], "dropped": dedup["dropped"], "words_in": dedup["words_in"],
               "words_out": dedup["words_out"]})
    dd["seconds"] += dedup["seconds"]
    docs_in = stats["steps"]["read"]["in"]
    stats.update({
        "inputs": inputs, "docs_in": docs_in, "docs_out": dedup["out"], "shards": dedup["shards"],
        "wall_seconds": round(wall, 2), "task_phase_seconds": round(task_seconds, 2),
        "workers": workers, "executor": cfg.executor,
        "docs_per_second": round(docs_in / max(wall, 1e-9), 1),
        "docs_per_second_per_core": round(docs_in / max(wall, 1e-9) / workers, 1),
        "dedup_index_bytes": dedup["index_bytes"],
        "dedup_index_bytes_per_doc": round(dedup["index_bytes"] / max(1, dedup["in"]), 1),
        "schema": ", ".join(SCHEMA.names),
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("run", "runs_dir")},
    })
    return stats


def sample_rows(shards: list[Path], k: int, seed: int = 0) -> list[dict]:
    """k random documents from the output shards (reads one shard)."""
    rng = random.Random(seed)
    if not shards:
        return []
    tab = pq.read_table(rng.choice(shards), columns=["url", "lang", "lang_score", "text"])
    idx = rng.sample(range(tab.num_rows), min(k, tab.num_rows))
    return [tab.slice(i, 1).to_pylist()[0] for i in idx]
