"""WARC read speed and recovery: `chatforge.data.warc.iter_pages` vs a bare `fastwarc` loop.

    CHATFORGE_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python bench/bench_warc_read.py --trials 5

Speed (clean files): both sides read the same local file on one thread and read every
response/resource payload in full (fastwarc parses the HTTP head of each response, as the reader
does); the bare loop is the floor our reader's bookkeeping (HTML check, counts, damage checks) adds
to. Identical output is asserted first: the record ids our reader yields are exactly the HTML
response ids the bare loop sees. Reported: median MB/s of compressed input and the ratio.

Recovery (hostile copies, untimed): per-record gzip WARCs with junk bytes between members at several
places, and a record whose Content-Length lies; the bare loop stops at the first damage (it raises),
our reader resynchronises. Reported: records out of each, against the clean file's count.

Run it on a quiet machine: timings taken while other jobs share the cores are not results.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import re
import statistics
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

DEFAULT = ["web/python-docs.warc.gz", "web/postgresql-docs.warc.gz", "web/git-docs.warc.gz"]


def bare_fastwarc(path: str) -> list[str]:
    """The peer: fastwarc's iterator, every response/resource payload read; stops on the first error."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    ids = []
    with open(path, "rb") as f:
        try:
            for rec in ArchiveIterator(f, parse_http=False,
                                       record_types=WarcRecordType.response | WarcRecordType.resource):
                if rec.record_type == WarcRecordType.response:
                    rec.parse_http()
                rec.reader.read()
                ids.append(rec.headers.get("WARC-Record-ID").strip("<>"))
        except OSError:
            pass
    return ids


def ours(path: str) -> list[str]:
    from chatforge.data.warc import iter_pages

    return [p.id for p in iter_pages(path, Counter())]


def members(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(31)
        d.decompress(data[pos:])
        end = len(data) - len(d.unused_data)
        out.append(data[pos:end])
        pos = end
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", nargs="*", default=DEFAULT)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    root = Path(os.environ.get("CHATFORGE_DATA_DIR", "../shared/data"))
    print("| file | MB | fastwarc MB/s | chatforge MB/s | chatforge / fastwarc |\n|---|---:|---:|---:|---:|")
    for rel in args.inputs:
        path = str(root / rel)
        mb = os.path.getsize(path) / 1e6
        a, b = bare_fastwarc(path), ours(path)
        assert a == b, f"{rel}: outputs differ ({len(a)} vs {len(b)} records)"
        times = {"fastwarc": [], "chatforge": []}
        for _ in range(args.trials):  # interleaved, so drift in machine load hits both sides alike
            for name, fn in (("fastwarc", bare_fastwarc), ("chatforge", ours)):
                t = time.perf_counter()
                fn(path)
                times[name].append(time.perf_counter() - t)
        fw, cf = (mb / statistics.median(times[k]) for k in ("fastwarc", "chatforge"))
        print(f"| {rel} | {mb:.1f} | {fw:.1f} | {cf:.1f} | {cf / fw:.3f} |")

    print("\n| hostile copy of git-docs | clean records | fastwarc | chatforge |\n|---|---:|---:|---:|")
    src = (root / "web/git-docs.warc.gz").read_bytes()
    mem = members(src)
    rng = random.Random(0)
    junk = bytes(rng.randrange(256) for _ in range(400))
    rec = bytearray(gzip.decompress(mem[40]))
    m = re.search(rb"\r\nContent-Length: (\d+)", rec)
    lying = gzip.compress(bytes(rec[:m.start(1)]) + str(int(m.group(1)) + 5000).encode() + bytes(rec[m.end(1):]))
    cases = {
        "junk between members at 5 places": b"".join(x + (junk if i % 50 == 49 else b"") for i, x in enumerate(mem)),
        "record 41 with Content-Length +5000": b"".join(mem[:40]) + lying + b"".join(mem[41:]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in cases.items():
            p = Path(tmp) / "x.warc.gz"
            p.write_bytes(data)
            print(f"| {name} | {len(mem)} | {len(bare_fastwarc(str(p)))} | {len(ours(str(p)))} |")


if __name__ == "__main__":
    main()
