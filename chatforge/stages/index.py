"""`chatforge index`: build the search tool's full-text index (SQLite FTS5, BM25 ranking).

    chatforge index --run tiny                           # the run's data stage shards
    chatforge index --inputs text/wiki_demo.txt,docs.jsonl --run mine

Writes runs/<run>/index/search.sqlite (plus config.json, meta.json, metrics.jsonl, DONE). The chat
and the engine's search tool read it (chatforge/tools/search.py).
"""

from __future__ import annotations

from chatforge.common import ChatforgeError, is_complete, log0, read_done, stage_dir, stage_run
from chatforge.config import IndexConfig

INDEX_FILE = "search.sqlite"


def run(cfg: IndexConfig) -> dict:
    from chatforge.corpus import expand_corpus
    from chatforge.tools.search import build_index

    out = stage_dir(cfg, "index")
    if is_complete(out) and not cfg.force:
        log0(f"index: {out} is complete, skipping (pass --force to rebuild)")
        return read_done(out)
    inputs = cfg.inputs
    if not inputs:
        if not is_complete(stage_dir(cfg, "data")):
            raise ChatforgeError(f"nothing to index: pass --inputs FILES, or run the data stage for run "
                                 f"'{cfg.run}' first")
        inputs = ["stage:data"]
    files = expand_corpus(inputs, cfg.data_dir, cfg)  # fails on a missing file before anything is written
    if cfg.passage_chars < 100:
        raise ChatforgeError(f"--passage_chars {cfg.passage_chars}: use at least 100")
    with stage_run(cfg, "index") as run:
        log0(f"index: {len(files)} file(s) -> {out / INDEX_FILE}")
        summary = build_index(files, out / INDEX_FILE, cfg.passage_chars, cfg.max_docs, log=log0)
        mb = summary["chars"] / 1e6
        rate = mb / max(summary["seconds"], 1e-9)
        size = (out / INDEX_FILE).stat().st_size / 1e6
        log0(f"index: {summary['documents']:,} documents, {summary['passages']:,} passages, {mb:.1f} MB of text "
             f"in {summary['seconds']:.1f}s ({rate:.1f} MB/s); index {size:.1f} MB; "
             f"{summary['bad_records']} bad records skipped")
        summary.update(index=str(out / INDEX_FILE), index_mb=round(size, 2), mb_per_s=round(rate, 2))
        run.log(**{k: v for k, v in summary.items() if k != "files"})
        run.finish(summary)
    return summary
