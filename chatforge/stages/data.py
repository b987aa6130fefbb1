"""`chatforge data process`: raw web crawls (WARC/WET) -> parquet shards of clean text, FineWeb-style,
with every decision counted. `chatforge data inspect RUN` shows what happened.

Reads: WARC/WET files (local paths or globs, https URLs, Common Crawl paths), a UT1 blocklist.
Writes to runs/<run>/data/:
    shards/shard_NNNNN.parquet   the kept documents (schema: chatforge.data.pipeline.SCHEMA)
    stats.json                   the funnel: per step docs in/out, dropped per reason, words, seconds
    tasks/                       per-input-file staged output + completion markers (resume)
    config.json, meta.json, metrics.jsonl, DONE

Two phases. (1) One task per input file, run by the local process pool or Ray: read -> URL filter ->
HTML extraction -> language ID -> Gopher repetition -> Gopher quality -> C4 -> FineWeb -> PII masking,
plus the document's exact hash and MinHash band keys. A task writes atomically and marks itself
complete; a rerun skips complete tasks whose settings are unchanged. (2) Dedup over all tasks'
outputs (exact, then MinHash-LSH), streaming the survivors into shards; then DONE.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tqdm import tqdm

from chatforge.common import (ChatforgeError, data_dir, data_path, is_complete, log0, physical_cores, read_done,
                              stage_dir, stage_run, write_json)
from chatforge.config import DataConfig


def _resolve_blocklist(cfg: DataConfig) -> str:
    if not cfg.url_filter or cfg.url_blocklist in ("", "datatrove"):
        if cfg.url_blocklist == "datatrove":
            try:
                import datatrove  # noqa: F401
            except ImportError:
                raise ChatforgeError("--url_blocklist datatrove reads the UT1 list shipped in the datatrove "
                                     "wheel: pip install datatrove, or give a UT1 folder") from None
        return cfg.url_blocklist
    try:
        p = data_path(cfg.url_blocklist, cfg.data_dir)
    except ChatforgeError:
        p = None
    if p is None or not p.is_dir():
        raise ChatforgeError(f"--url_blocklist '{cfg.url_blocklist}': no such folder (looked in the data dir "
                             f"{data_dir(cfg.data_dir)} too); give a UT1-format folder, 'datatrove', or ''")
    return str(p)


def _check(cfg: DataConfig) -> None:
    if not cfg.inputs:
        raise ChatforgeError("no inputs: pass --inputs FILES (WARC/WET paths or globs, URLs, Common Crawl "
                             "paths) or a --preset that sets them (e.g. --preset tiny)")
    if cfg.executor not in ("local", "ray"):
        raise ChatforgeError(f"--executor {cfg.executor}: choose local or ray")
    if cfg.extractor not in ("resiliparse", "trafilatura"):
        raise ChatforgeError(f"--extractor {cfg.extractor}: choose resiliparse or trafilatura")
    bad = [k for k in cfg.pii if k not in ("emails", "ips", "phones")]
    if bad:
        raise ChatforgeError(f"--pii {','.join(bad)}: unknown kind; choose from emails, ips, phones")
    if cfg.shard_docs < 1 or cfg.minhash_bands < 1 or cfg.minhash_rows < 1 or cfg.minhash_ngram < 1:
        raise ChatforgeError("--shard_docs, --minhash_bands, --minhash_rows and --minhash_ngram must be >= 1")


def run(cfg: DataConfig) -> dict:
    out = stage_dir(cfg, "data")
    if is_complete(out) and not cfg.force:
        log0(f"data: {out} is complete, skipping (pass --force to redo)")
        return read_done(out)
    _check(cfg)
    from chatforge.data.executor import make_executor, remove_stale_temps
    from chatforge.data.extract import extractor_version, fineweb_trafilatura
    from chatforge.data.pipeline import (check_readable, completed_task, dedup_and_write, file_problem, run_stats,
                                         run_task, settings_fingerprint)
    from chatforge.data.report import STATS, funnel_table
    from chatforge.data.warc import expand_inputs

    root = data_dir(cfg.data_dir)
    try:
        inputs = expand_inputs(cfg.inputs, cfg.data_dir)
    except FileNotFoundError as e:
        raise ChatforgeError(f"data input '{e}' matches no file (looked in the current folder and the data dir "
                             f"{root}); fix --inputs or set --data_dir / $CHATFORGE_DATA_DIR") from None
    blocklist = _resolve_blocklist(cfg) if cfg.url_filter else ""
    workers = cfg.workers if cfg.workers > 0 else physical_cores()
    tasks_dir, shards_dir = out / "tasks", out / "shards"
    if cfg.force:
        for d in (tasks_dir, shards_dir):
            shutil.rmtree(d, ignore_errors=True)
    with stage_run(cfg, "data") as srun:
        tasks_dir.mkdir(parents=True, exist_ok=True)
        if n := remove_stale_temps(tasks_dir, shards_dir):
            log0(f"data: removed {n} temp file(s) left by an earlier run that was killed")
        # the extractor's version changes the text, so it is part of what a finished task was made with
        version = extractor_version(cfg.extractor)
        fp = settings_fingerprint(cfg, {"blocklist": blocklist, "extractor_version": version})
        if cfg.extractor == "trafilatura" and not fineweb_trafilatura(version):
            log0(f"data: note: trafilatura {version} is outside the range FineWeb's pipeline used (>=1.8,<1.12, "
                 f"datatrove's pin); its text layout differs, so the filters keep a different set. For FineWeb's "
                 f"selection: pip install 'trafilatura>=1.8,<1.12'")
        tasks = [{"index": i, "input": p, "tasks_dir": str(tasks_dir), "cfg": cfg, "blocklist": blocklist,
                  "fingerprint": fp} for i, p in enumerate(inputs)]
        results: dict[int, dict] = {}
        pending = []
        for t in tasks:
            m = completed_task(t)
            if m:
                results[t["index"]] = m
            else:
                pending.append(t)
        log0(f"data: {len(inputs)} input file(s), {len(results)} already done, {len(pending)} to process "
             f"with {min(workers, max(1, len(pending)))} {cfg.executor} worker(s); "
             f"extractor {cfg.extractor} {version}, "
             f"languages {','.join(cfg.languages) or 'any'} >= {cfg.lang_threshold}")
        t0 = time.time()
        executor = make_executor(cfg.executor, workers, cfg.ray_address)
        bar = tqdm(total=len(pending), desc="data tasks", unit="file", disable=None)
        docs_done = 0
        for res in executor.map_unordered(run_task, pending):
            results[res["index"]] = res
            st = res["stats"]
            docs_done += st["steps"]["read"]["in"]
            srun.log(event="task", index=res["index"], input=res["input"], docs_in=st["steps"]["read"]["in"],
                     docs_out=st["steps"]["pii"]["out"], seconds=round(st["seconds"], 3),
                     docs_per_s=round(st["steps"]["read"]["in"] / max(st["seconds"], 1e-9), 1))
            bar.update(1)
            bar.set_postfix(docs_s=f"{docs_done / max(time.time() - t0, 1e-9):.0f}")
        bar.close()
        task_seconds = time.time() - t0
        problems = {results[i]["input"]: file_problem(results[i]["stats"]) for i in sorted(results)}
        problems = {k: v for k, v in problems.items() if v}
        for name, problem in problems.items():
            log0(f"data: {name}: {problem}")
        check_readable([results[i] for i in sorted(results)])
        # phase 2: dedup across everything, then the shards
        staged = [tasks_dir / f"{i:05d}.staged" for i in sorted(results)]
        d = dedup_and_write(staged, shards_dir, cfg)
        wall = time.time() - t0
        stats = run_stats([results[i]["stats"] for i in sorted(results)], d, cfg, inputs=inputs, wall=wall,
                          task_seconds=task_seconds, workers=workers)
        stats["extractor_version"] = version
        stats["input_problems"] = problems
        docs_in = stats["docs_in"]
        write_json(out / STATS, stats)
        srun.log(event="done", docs_in=docs_in, docs_out=d["out"], wall_seconds=round(wall, 2),
                 docs_per_second=stats["docs_per_second"])
        log0(funnel_table(stats))
        log0(f"data: {docs_in:,} documents in, {d['out']:,} kept in {len(d['shards'])} shard(s) at {shards_dir} "
             f"({wall:.1f}s, {stats['docs_per_second']:.0f} docs/s on {workers} worker(s))")
        summary = {"docs_in": docs_in, "docs_out": d["out"], "shards": len(d["shards"]),
                   "docs_per_second": stats["docs_per_second"]}
        srun.finish(summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Reporting


def inspect(run_path: str, k: int = 3, seed: int = 0, chars: int = 300) -> str:
    """`chatforge data inspect`: the funnel and a few random kept and dropped documents of a data stage
    run. `run_path` is a run name (runs/<name>/data), a run folder, or the data stage folder itself."""
    from chatforge.data.report import STATS, inspect_report

    p = Path(run_path)
    cands = [p / "data", p, Path("runs") / run_path / "data"]
    d = next((c for c in cands if (c / STATS).exists()), None)
    if d is None:
        raise ChatforgeError(f"inspect {run_path}: no {STATS} found in {', '.join(map(str, cands))}; run "
                             f"`chatforge data process --run NAME` first")
    return inspect_report(d, k, seed, chars)
