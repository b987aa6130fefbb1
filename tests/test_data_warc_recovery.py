"""Hostile copies of real WARCs: every good record comes out, and what was lost is counted.

Each test damages a real file from the shared data (junk between gzip members or between plain
records, a lying Content-Length, a cut last member, a corrupt member) and checks that the pages read
from it are exactly the clean file's pages minus the damaged record(s), with the damage counted.
"""

from __future__ import annotations

import gzip
import random
import re
import zlib
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fastwarc")

from chatforge.data.warc import iter_pages  # noqa: E402

GIT = "web/git-docs.warc.gz"  # 241 response records, one gzip member each, every one an HTML page
DOLMA = "web/dolma-sample-0000.warc.gz"  # 48 records of 5 types (request, warcinfo, metadata, ...)


def members(data: bytes) -> list[bytes]:
    """The gzip members of a per-record-gzip WARC, as stored."""
    out, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(31)
        d.decompress(data[pos:])
        end = len(data) - len(d.unused_data)
        out.append(data[pos:end])
        pos = end
    return out


@pytest.fixture(scope="module")
def git(shared_data) -> list[bytes]:
    return members((shared_data / GIT).read_bytes())


def read(path: Path) -> tuple[list[str], Counter]:
    counts: Counter = Counter()
    return [p.id for p in iter_pages(str(path), counts)], counts


def ids_of(records: list[bytes]) -> list[str]:
    """WARC-Record-IDs of plain records, in order (what iter_pages yields as Page.id)."""
    return [re.search(rb"WARC-Record-ID: <([^>]+)>", r).group(1).decode() for r in records]


def lie(record: bytes, delta: int) -> bytes:
    """The record with its WARC Content-Length off by `delta` (its bytes unchanged)."""
    m = re.search(rb"\r\nContent-Length: (\d+)\r\n", record)
    return record[:m.start(1)] + str(int(m.group(1)) + delta).encode() + record[m.end(1):]


def junk(n: int, seed: int) -> bytes:
    """Random bytes seeded with decoys a resynchroniser must pass over: a gzip magic followed by
    garbage, a gzip member of non-WARC text, and a WARC version line with no valid header."""
    rng = random.Random(seed)
    body = bytes(rng.randrange(256) for _ in range(n))
    decoys = b"\x1f\x8b\x08garbage" + gzip.compress(b"not a WARC record\r\n") + b"WARC/1.0\r\nWARC-Type: x\r\n\r\n"
    return b"J" + body[: n // 2] + decoys + body[n // 2:]  # starts with a non-CR/LF byte


def test_clean_real_files_report_no_damage(shared_data):
    """The end-of-file check and the lookahead change nothing on well-formed files."""
    for rel in [GIT, DOLMA, "web/dolma-sample-0001.warc.gz", "web/whirlwind.warc.gz", "web/whirlwind.warc.wet.gz",
                "web/warcio-edge-cases/example.warc", "web/warcio-edge-cases/example.warc.gz",
                "web/warcio-edge-cases/example-wrong-chunks.warc.gz",  # each member starts with the CRLF CRLF before it
                "web/warcio-edge-cases/example-bad-non-chunked.warc.gz"]:  # all records in one gzip member
        _, counts = read(shared_data / rel)
        damage = [k for k in counts if k.startswith(("damaged:", "file:", "error:")) or k.endswith("_file")]
        assert not damage, (rel, counts)


@pytest.mark.parametrize("places", [[100], [1, 60, 120, 180, 240], [0], [241], [0, 5, 6, 7, 241]])
def test_junk_between_gzip_members(tmp_path, git, places):
    """The issue's case (73 of 241 records out of a file with junk inserted): junk between members
    at the start, the end, several places and adjacent members; all 241 come out, the junk counted."""
    pieces, inserted = [], 0
    for i, m in enumerate(git + [b""]):
        if i in places:
            j = junk(300 + 37 * i, seed=i)
            pieces.append(j)
            inserted += len(j)
        pieces.append(m)
    path = tmp_path / "junk.warc.gz"
    path.write_bytes(b"".join(pieces))
    got, counts = read(path)
    assert got == ids_of([gzip.decompress(m) for m in git])
    assert counts["file:resynced_bytes"] == inserted and counts["file:resyncs"] == len(places)
    assert counts["skip:malformed_file"] == 1 and counts["records"] == 241


def test_junk_between_members_at_random_places(tmp_path, git):
    """Twenty random hostile copies (1-6 junk runs of 1-2000 bytes each): exact recovery every time."""
    rng = random.Random(1234)
    want = ids_of([gzip.decompress(m) for m in git])
    for trial in range(20):
        places = sorted(rng.sample(range(1, 241), rng.randint(1, 6)))
        runs = {p: junk(rng.randint(1, 2000), seed=trial * 1000 + p) for p in places}
        path = tmp_path / f"r{trial}.warc.gz"
        path.write_bytes(b"".join(runs.get(i, b"") + m for i, m in enumerate(git)))
        got, counts = read(path)
        assert got == want, (trial, places)
        assert counts["file:resynced_bytes"] == sum(map(len, runs.values())), (trial, places)


def test_junk_between_plain_records(tmp_path, git):
    recs = [gzip.decompress(m) for m in git]
    inserted = {3: junk(500, 1), 100: junk(20, 2), 200: junk(4000, 3)}
    path = tmp_path / "junk.warc"
    path.write_bytes(b"".join(inserted.get(i, b"") + r for i, r in enumerate(recs)))
    got, counts = read(path)
    assert got == ids_of(recs)
    assert counts["file:resynced_bytes"] == sum(map(len, inserted.values())) and counts["file:resyncs"] == 3


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("delta", [+5000, -5000, +37, -3, +10**9],
                         ids=["larger", "smaller", "larger37", "smaller3", "huge"])
@pytest.mark.parametrize("where", [0, 120, 239])
def test_lying_content_length(tmp_path, git, gz, delta, where):
    """One record's Content-Length is wrong: that record (only) is lost, counted as
    bad_content_length, and every record behind it comes out (the issue: 2 of 4 were lost, counted
    as truncated). A huge one used to make fastwarc swallow the rest of the file without an error.
    (A length short only by trailing CR/LF is tolerated, as fastwarc does: no text is lost.)"""
    recs = [gzip.decompress(m) for m in git]
    bad = list(recs)
    bad[where] = lie(recs[where], delta)
    path = tmp_path / ("lie.warc.gz" if gz else "lie.warc")
    path.write_bytes(b"".join(gzip.compress(r) if gz else r for r in bad))
    got, counts = read(path)
    want = ids_of(recs)
    assert got == want[:where] + want[where + 1:]
    assert counts["skip:bad_content_length"] == counts["damaged:bad_content_length"] == 1
    assert counts["records"] == 241 and counts["skip:truncated"] == 0 and counts["file:resynced_bytes"] == 0


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_lying_content_length_on_last_record(tmp_path, git, gz):
    """On the last record a Content-Length too large looks like a cut file when nothing follows (a
    plain WARC) and is a lie when its gzip member is complete: lost and counted either way."""
    recs = [gzip.decompress(m) for m in git]
    for delta in (+5000, -5000):
        bad = recs[:-1] + [lie(recs[-1], delta)]
        path = tmp_path / "last.warc"
        path.write_bytes(b"".join(gzip.compress(r) if gz else r for r in bad))
        got, counts = read(path)
        assert got == ids_of(recs)[:-1]
        reason = "truncated" if (delta > 0 and not gz) else "bad_content_length"
        assert counts[f"skip:{reason}"] == counts[f"damaged:{reason}"] == 1, (delta, counts)


def test_lying_content_length_on_a_request_record(tmp_path, shared_data):
    """A request record (not a document) with a huge Content-Length in a real crawl: fastwarc skipped
    to the end of the file silently; now no page is lost and the damaged record is counted."""
    ms = members((shared_data / DOLMA).read_bytes())
    recs = [gzip.decompress(m) for m in ms]
    i = next(k for k, r in enumerate(recs) if b"WARC-Type: request" in r[:2000] and k > 2)
    clean, _ = read(shared_data / DOLMA)
    path = tmp_path / "req.warc.gz"
    path.write_bytes(b"".join(ms[:i]) + gzip.compress(lie(recs[i], 10**9)) + b"".join(ms[i + 1:]))
    got, counts = read(path)
    assert got == clean and counts["damaged:bad_content_length"] == 1 and counts["records"] == 48
    assert counts["record:request"] == 22 and counts["skip:bad_content_length"] == 0  # not a document


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_truncated_last_record(tmp_path, git, gz):
    recs = [gzip.decompress(m) for m in git]
    data = b"".join(gzip.compress(r) if gz else r for r in recs)
    last = len(git[-1]) if gz else len(recs[-1])
    path = tmp_path / "cut.warc"
    path.write_bytes(data[: len(data) - last // 2])
    got, counts = read(path)
    assert got == ids_of(recs)[:-1]
    assert counts["skip:truncated"] == counts["damaged:truncated"] == 1 and counts["records"] == 241


def test_corrupt_member(tmp_path, git):
    """Bytes destroyed inside one gzip member: that record is lost (counted), the rest come out."""
    for k in (0, 77, 240):
        m = bytearray(git[k])
        m[len(m) // 2: len(m) // 2 + 40] = bytes(40)
        path = tmp_path / "corrupt.warc.gz"
        path.write_bytes(b"".join(git[:k]) + bytes(m) + b"".join(git[k + 1:]))
        got, counts = read(path)
        want = ids_of([gzip.decompress(x) for x in git])
        assert got == want[:k] + want[k + 1:], k
        assert counts["damaged:corrupt"] == counts["skip:corrupt"] == 1 and counts["records"] == 241, counts


def test_destroyed_header_between_good_records(tmp_path, shared_data):
    """A plain WARC whose third header is overwritten: the records around it come out; its bytes are
    counted as skipped (with no header it cannot be told apart from junk)."""
    raw = bytearray((shared_data / "web/warcio-edge-cases/example.warc").read_bytes())
    starts = [m.start() for m in re.finditer(rb"WARC/1\.0\r\n", bytes(raw))]
    raw[starts[2]:starts[2] + 8] = b"XARC/9.9"
    path = tmp_path / "flipped.warc"
    path.write_bytes(bytes(raw))
    _, counts = read(path)
    assert counts["records"] == 5 and counts["skip:malformed_file"] == 1  # 6 records, one header gone
    assert counts["file:resynced_bytes"] == starts[3] - starts[2] and counts["file:resyncs"] == 1


def test_empty_and_junk_only_files(tmp_path, shared_data):
    (tmp_path / "empty.warc.gz").write_bytes(b"")
    pages, counts = read(tmp_path / "empty.warc.gz")
    assert pages == [] and counts["skip:empty_file"] == 1 and counts["skip:unreadable_file"] == 0
    for name, data in [("junk.warc.gz", junk(100_000, 7)), ("magic.warc.gz", b"\x1f\x8b\x08garbage" * 2000),
                       ("page.warc", b"<html><body>not a WARC</body></html>\n" * 100)]:
        (tmp_path / name).write_bytes(data)
        pages, counts = read(tmp_path / name)
        assert pages == [] and counts["skip:unreadable_file"] == 1 and counts["records"] == 0, name
        assert not counts["file:resynced_bytes"] and not counts["skip:malformed_file"], name


def test_one_counter_over_many_files(tmp_path, shared_data):
    """File-level keys are per file even when one Counter is shared (as the pipeline's callers may)."""
    (tmp_path / "junk.warc").write_bytes(junk(1000, 1))
    counts: Counter = Counter()
    for f in [shared_data / GIT, tmp_path / "junk.warc", shared_data / DOLMA]:
        list(iter_pages(str(f), counts))
    assert counts["skip:unreadable_file"] == 1 and counts["records"] == 241 + 48


def test_file_of_lying_records_is_given_up_not_read_quadratically(tmp_path, shared_data):
    """Thousands of headers each claiming a 1 MB block: every one makes fastwarc read ~1 MB past it
    before the lie shows, so reading around each would re-read the file once per record. The reader
    stops once restarts have re-read 4x the file (plus 64 MB), counts why, and keeps what came before."""
    good = (shared_data / "web/whirlwind.warc.gz").read_bytes()
    fake = b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: 999999\r\n\r\n"
    path = tmp_path / "liars.warc.gz"
    path.write_bytes(good + fake * 20_000)  # 1.2 MB of lies
    got, counts = read(path)
    assert got == read(shared_data / "web/whirlwind.warc.gz")[0]
    assert counts["file:gave_up"] == 1 and counts["skip:malformed_file"] == 1
    assert 4 < counts["damaged:bad_content_length"] < 1000  # stopped early: ~70 x 1 MB re-read, not 20,000
