"""WARC reading on real and broken files: every problem is counted under a named reason, the run goes on."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fastwarc")

from chatforge.data.warc import iter_pages  # noqa: E402


def warc_record(url: str, payload: bytes, content_type: str = "text/html; charset=utf-8",
                http_extra: bytes = b"", rid: int = 1) -> bytes:
    """One WARC/1.0 response record, written by hand (as a crawler would)."""
    http = b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type.encode() + b"\r\n" + http_extra + \
           b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-{rid:012d}>\r\n"
            f"WARC-Target-URI: {url}\r\nWARC-Date: 2024-01-01T00:00:00Z\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http)}\r\n\r\n").encode()
    return head + http + b"\r\n\r\n"


def write_warc(path: Path, records: list[bytes], gz: bool = True) -> Path:
    with open(path, "wb") as f:
        for r in records:
            f.write(gzip.compress(r) if gz else r)  # one gzip member per record, as Common Crawl does
    return path


PAGE = b"<html><body><article><p>" + b"A sentence of real text for the reader. " * 20 + b"</p></article></body></html>"


def test_edge_case_files_never_raise(shared_data):
    total = Counter()
    pages = 0
    for f in sorted((shared_data / "web/warcio-edge-cases").iterdir()):
        counts = Counter()
        pages += len(list(iter_pages(str(f), counts)))
        total.update(counts)
    assert pages >= 6  # example.warc(.gz), iana chunked, post-test x3, wget, ...
    assert total["skip:unreadable_file"] == 4  # bad.arc, example.arc, example.arc.gz, example-space-in-url.arc
    assert total["skip:malformed_file"] >= 1  # example-trunc.warc: bad header after the truncated record
    assert total["record:request"] > 0 and total["record:warcinfo"] > 0


def test_chunked_transfer_encoding_is_decoded(shared_data):
    pages = list(iter_pages(str(shared_data / "web/warcio-edge-cases/example-iana.org-chunked.warc")))
    assert len(pages) == 1 and pages[0].html.lstrip().lower().startswith(b"<!doctype html")


def test_wet_conversion_records(shared_data):
    pages = list(iter_pages(str(shared_data / "web/whirlwind.warc.wet.gz")))
    assert len(pages) == 1 and pages[0].html is None and "Escopete" in pages[0].text


def test_corrupted_copies(tmp_path, shared_data):
    src = shared_data / "web/git-docs.warc.gz"
    # truncated gzip: the records before the cut are kept, the cut one is counted
    data = src.read_bytes()
    trunc = tmp_path / "trunc.warc.gz"
    trunc.write_bytes(data[:300_000])
    counts = Counter()
    n = len(list(iter_pages(str(trunc), counts)))
    assert n > 10 and counts["skip:truncated"] + counts["skip:malformed_file"] >= 1
    # flipped bytes in a header: the file is marked damaged, no exception (exact recovery: test_data_warc_recovery)
    raw = bytearray((shared_data / "web/warcio-edge-cases/example.warc").read_bytes())
    i = raw.find(b"WARC/1.0", 100)
    raw[i:i + 8] = b"XARC/9.9"
    flipped = tmp_path / "flipped.warc"
    flipped.write_bytes(bytes(raw))
    counts = Counter()
    list(iter_pages(str(flipped), counts))
    assert counts["skip:malformed_file"] == 1
    # random garbage and an empty file
    (tmp_path / "garbage.warc.gz").write_bytes(b"\x1f\x8b\x08garbage" * 100)
    (tmp_path / "empty.warc").write_bytes(b"")
    for name, key in (("garbage.warc.gz", "skip:unreadable_file"), ("empty.warc", "skip:empty_file")):
        counts = Counter()
        assert list(iter_pages(str(tmp_path / name), counts)) == [] and counts[key] == 1
    counts = Counter()
    assert list(iter_pages(str(tmp_path / "missing.warc"), counts)) == []
    assert counts["skip:unreadable_file"] == 1


def make_nasty_warc(path: Path) -> Path:
    """A WARC with one of each problem, between good pages."""
    big = b"<html><body><p>" + b"x" * (50 * 1024 * 1024) + b"</p></body></html>"  # a 50 MB page
    deep = b"<html><body>" + b"<div>" * 50_000 + b"<p>deep</p>" + b"</div>" * 50_000 + b"</body></html>"
    recs = [
        warc_record("https://good.example.org/1", PAGE, rid=1),
        warc_record("https://big.example.org/", big, rid=2),
        warc_record("https://deep.example.org/", deep, rid=3),
        warc_record("https://empty.example.org/", b"", rid=4),
        warc_record("https://blank.example.org/", b"<html><body>   </body></html>", rid=5),
        warc_record("https://img.example.org/x.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png", rid=6),
        warc_record("https://latin.example.org/", PAGE.replace(b"real", "réal".encode("latin-1")),
                    "text/html; charset=iso-8859-1", rid=7),
        warc_record("https://bytes.example.org/", PAGE + b"\xff\xfe\x81 undecodable", "text/html", rid=8),
        warc_record("https://nohdr.example.org/", PAGE, "", rid=9),
        warc_record("https://good.example.org/2", PAGE.replace(b"real", b"true"), rid=10),
    ]
    return write_warc(path, recs)


def test_nasty_records_counted(tmp_path):
    path = make_nasty_warc(tmp_path / "nasty.warc.gz")
    counts = Counter()
    pages = list(iter_pages(str(path), counts))
    urls = [p.url for p in pages]
    assert counts["skip:too_large"] == 1 and "https://big.example.org/" not in urls
    assert counts["skip:non_html"] == 1 and counts["skip:empty"] == 1
    assert "https://good.example.org/1" in urls and "https://good.example.org/2" in urls
    assert "https://nohdr.example.org/" in urls  # no Content-Type: sniffed as HTML
    assert counts["candidates"] == 10


def test_streaming_memory_stays_low(tmp_path):
    """A 50 MB page is skipped unread and pages are streamed: peak RSS grows far less than the file."""
    import subprocess
    import sys

    path = make_nasty_warc(tmp_path / "nasty.warc.gz")
    code = ("import resource,sys; from collections import Counter; from chatforge.data.warc import iter_pages; "
            "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"n=sum(1 for _ in iter_pages({str(path)!r}, Counter())); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)")
    grew_kb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grew_kb < 40 * 1024, grew_kb  # well under the 50 MB page


def test_expand_inputs_literal_names_globs_and_urls(tmp_path, shared_data):
    """An existing file whose name holds glob characters is that file (as a glob, `a[1]` would match
    `a1`); globs expand in order; URLs and crawl paths pass through; a missing entry is named."""
    import shutil

    from chatforge.data.warc import expand_inputs

    src = shared_data / "web/whirlwind.warc.gz"
    for name in ("a[1].warc.gz", "a1.warc.gz", "b.warc.gz"):
        shutil.copy(src, tmp_path / name)
    assert expand_inputs([str(tmp_path / "a[1].warc.gz")]) == [str(tmp_path / "a[1].warc.gz")]
    assert expand_inputs([str(tmp_path / "b*.gz"), "https://x.org/c.warc.gz", "crawl-data/CC/x.warc.gz",
                          str(tmp_path / "b.warc.gz")]) == [
        str(tmp_path / "b.warc.gz"), "https://x.org/c.warc.gz", "crawl-data/CC/x.warc.gz"]  # duplicates removed
    assert expand_inputs(["web/whirlwind.warc.gz"], str(shared_data)) == [str(src)]  # the data dir
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_inputs([str(tmp_path / "nope*.warc.gz")])
