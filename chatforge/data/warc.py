"""Reading web crawls: WARC (and WET) records -> `Page`s with decoded HTML, with every skip counted.

We read with `fastwarc` (resiliparse's WARC reader, about 2x faster than warcio on gzip). What we keep:

- `response` records with an HTTP payload whose Content-Type is HTML (or, when the server sent none,
  whose bytes look like HTML) -> a Page with `html` set;
- `resource` records of an HTML type (wget and archive tools store pages that way);
- `conversion` records (WET files: Common Crawl's own text extraction) -> a Page with `text` set,
  which skips our HTML extraction step.

Everything else is counted, never fatal: other record types by type, non-HTML payloads, empty
payloads, pages over `max_bytes` (never read into memory), records cut short by a truncated file.

Damaged files are read around, not abandoned: after junk between records, a record whose
Content-Length lies, a corrupt gzip member or a destroyed header, reading resynchronises at the next
record (the next gzip member that holds a WARC header, or the next plain WARC header), so every intact
record comes out; the damaged record and the skipped bytes are counted (see `iter_pages`). A clean
file takes fastwarc's fast path untouched: the checks run only after an error and once at the end of
a file. On an https stream the bytes since the last record's start are kept in memory (up to
`_ForwardStream.WINDOW`) so the same works there; damage behind a record larger than that ends the file.

Text decoding follows the order browsers roughly use: the charset the server declared, then
detection (resiliparse's `detect_encoding`, which also reads <meta charset>), then UTF-8 with
replacement characters, so undecodable bytes never stop a run.
"""

from __future__ import annotations

import codecs
import io
import os
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Iterator

# Common Crawl paths such as "crawl-data/CC-MAIN-2024-22/segments/.../x.warc.gz" are served here.
CC_PREFIX = "https://data.commoncrawl.org/"
HTML_TYPES = ("text/html", "application/xhtml+xml", "application/xml+html")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024  # pages over 10 MB are almost never prose; skip unread
# Bumped when the same file yields other pages (2: damaged files are read around); part of the data
# stage's task fingerprint, so a resume does not mix an older reader's output with this one's.
READER_VERSION = 2


@dataclass
class Page:
    """One web document on its way through the pipeline."""

    id: str
    url: str
    date: str
    html: bytes | None = None  # raw HTTP payload (None for WET conversion records)
    charset: str | None = None  # charset declared in the HTTP Content-Type header
    text: str | None = None  # decoded HTML string, or extracted text (WET) when html is None
    meta: dict = field(default_factory=dict)


def open_stream(path: str) -> IO[bytes]:
    """A binary stream for a local path, an https:// URL, or a Common Crawl path (streamed, not
    downloaded first)."""
    if path.startswith(("http://", "https://")) or path.startswith("crawl-data/"):
        url = path if path.startswith("http") else CC_PREFIX + path
        return _ForwardStream(urllib.request.urlopen(url, timeout=60))  # noqa: S310 (user-given crawl URL)
    return open(path, "rb")


class _ForwardStream(io.RawIOBase):
    """An HTTP response as fastwarc 2 wants a stream: it asks for tell() on a seekable stream (and
    panics on a socket's UnsupportedOperation), but only ever reads forward.

    To resynchronise after damage the reader goes back to the start of the last record, so the bytes
    from there on are kept in a window: `release(pos)` says bytes before `pos` are not needed again,
    and at most `WINDOW` bytes are kept. Seeking forward reads into the window; seeking back before
    it raises io.UnsupportedOperation (the damage is then counted and the rest of the file skipped).
    """

    WINDOW = 32 << 20  # above the compressed size of a --max_page_bytes page; bounds a worker's memory

    def __init__(self, raw):
        self.raw, self.pos = raw, 0
        self.buf, self.base = bytearray(), 0  # bytes [base, base + len(buf)) of the stream

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.pos + offset if whence == io.SEEK_CUR else -1
        if target < self.base:
            raise io.UnsupportedOperation(f"an HTTP stream cannot go back more than {self.WINDOW >> 20} MB")
        while self.base + len(self.buf) < target and self._fill(min(1 << 20, target - self.base - len(self.buf))):
            pass
        self.pos = target
        return self.pos

    def _fill(self, n: int) -> int:
        chunk = self.raw.read(n)
        self.buf += chunk
        if len(self.buf) > self.WINDOW:  # keep the newest half: older bytes can no longer be revisited
            drop = min(len(self.buf) - self.WINDOW // 2, max(0, self.pos - self.base))
            del self.buf[:drop]
            self.base += drop
        return len(chunk)

    def readinto(self, buf) -> int:
        end = self.base + len(self.buf)
        if self.pos >= end and (self.pos > end or not self._fill(max(len(buf), 1 << 16))):
            return 0
        off = self.pos - self.base
        n = min(len(buf), len(self.buf) - off)
        memoryview(buf).cast("B")[:n] = self.buf[off:off + n]
        self.pos += n
        return n

    def release(self, pos: int) -> None:
        """Bytes before `pos` will not be read again (dropped in bulk, so the copy is amortised)."""
        drop = min(pos, self.pos) - self.base
        if drop > (1 << 20) or drop > len(self.buf) // 2:
            del self.buf[:drop]
            self.base += drop

    def close(self) -> None:
        self.raw.close()
        super().close()


def _clean_uri(uri: str | None) -> str:
    # wget (and dolma's samples) write WARC-Target-URI as "<http://...>"; some tools leave spaces.
    uri = (uri or "").strip()
    if uri.startswith("<") and uri.endswith(">"):
        uri = uri[1:-1]
    return uri.strip()


def _is_html(content_type: str | None, payload_head: bytes) -> bool:
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct:
        return ct in HTML_TYPES
    head = payload_head[:1024].lstrip().lower()  # no header: sniff like a browser would
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head


def decode_html(payload: bytes, declared: str | None = None) -> tuple[str, str]:
    """Bytes -> (text, how): the declared charset, then detection, then UTF-8 with replacement.

    >>> decode_html("café".encode("latin-1"), "iso-8859-1")
    ('café', 'declared')
    >>> decode_html(b"caf\\xff\\xfe ok", None)[1] in ("detected", "replaced")
    True
    """
    if declared:
        try:
            codecs.lookup(declared)
            return payload.decode(declared), "declared"
        except (LookupError, UnicodeDecodeError, ValueError):
            pass
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        from resiliparse.parse.encoding import detect_encoding

        enc = detect_encoding(payload[:65536])
        if enc and enc.lower().replace("-", "") not in ("utf8",):
            return payload.decode(enc), "detected"
    except (LookupError, UnicodeDecodeError, ValueError, ImportError):
        pass
    return payload.decode("utf-8", errors="replace"), "replaced"


def iter_pages(path: str, counts: Counter | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Page]:
    """Pages of one WARC/WET file, read around damage. `counts` receives one key per outcome:

    records                 every record seen (all types, damaged ones included)
    candidates              response/resource/conversion records (documents entering the funnel)
    record:<type>           records of types we do not process (request, warcinfo, metadata, ...)
    skip:non_html           response/resource payloads that are not HTML (images, PDFs, JSON, ...)
    skip:empty              empty payloads (redirects, 204s)
    skip:too_large          payload over max_bytes (not read)
    skip:bad_http           a garbled HTTP head
    skip:truncated          a document cut short by the end of the file (truncated gzip or download)
    skip:bad_content_length a document whose Content-Length does not match its bytes
    skip:corrupt            a document whose gzip member does not decompress (or fastwarc cannot read)
    decode:<how>            how each WET page was decoded (declared, utf-8, detected, replaced)
    File-level keys (not documents):
    skip:unreadable_file    the file could not be opened, or holds no WARC record at all
    skip:empty_file         the file is empty
    skip:malformed_file     damage was found and read around (once per file; the keys below say what)
    file:resynced_bytes     bytes skipped to reach the next record (junk, a destroyed header)
    file:resyncs            places where reading resynchronised after such bytes
    file:gave_up            reading stopped: lying lengths so dense that reading around them would
                            re-read the file many times over (the rest of the file is not read)
    damaged:<reason>        damaged records of any type: bad_content_length, corrupt, truncated
    error:<message>         the reader's error messages
    """
    counts = counts if counts is not None else Counter()
    try:
        stream = open_stream(path)
    except OSError as e:
        counts["skip:unreadable_file"] += 1
        counts[f"error:{type(e).__name__}"] += 1
        return
    before = counts["records"]
    try:
        yield from _read(stream, path, counts, max_bytes)
    except OSError as e:
        # The file or the download failed under us (not damage in its bytes), or a stream's damage
        # lies further back than the window it keeps (io.UnsupportedOperation): count, end the file.
        counts["skip:malformed_file" if counts["records"] > before else "skip:unreadable_file"] += 1
        counts[f"error:{str(e)[:60]}"] += 1
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001
            pass


# Resynchronisation. fastwarc reads a clean file at full speed and raises (or silently swallows
# records) at the first damage; Common Crawl, datatrove and fastwarc's own tools stop there. We keep
# the fast path and only after an error, or at the end of the file, look at the bytes ourselves:
# the last record fastwarc parsed is checked against its Content-Length (each record is its own gzip
# member, ISO 28500 annex D, or is followed by CRLF CRLF in a plain WARC), then we scan for the next
# offset where a gzip member decompresses to a WARC header, or a plain WARC header starts, and
# restart fastwarc there. Every restart moves strictly forward, so a hostile file cannot loop us.

_GZIP_MAGIC = b"\x1f\x8b\x08"  # RFC 1952: ID1 ID2 and CM=8 (deflate)
_WARC_MAGIC = b"WARC/1."
_HEAD_MAX = 64 << 10  # a WARC header longer than this is not one (fastwarc's own limit is 32 KB)
_WANTED = ("response", "resource", "conversion")
_REREAD_FACTOR, _REREAD_FLOOR = 4, 64 << 20  # give up a file once restarts re-read more than this


def _read(stream, path: str, counts: Counter, max_bytes: int) -> Iterator[Page]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType as T  # noqa: N817

    wanted = T.response | T.resource | T.conversion
    if not stream.read(1):
        counts["skip:empty_file"] += 1
        return
    release = stream.release if isinstance(stream, _ForwardStream) else None
    source = os.path.basename(path)
    first_record = counts["records"]
    start: int | None = 0
    n_seen, damaged = 0, False
    resync = [0, 0]  # bytes skipped, places: counted even when a stream error ends the file
    reread, high = 0, 0  # bytes fastwarc read in all (restarts read some twice), and the furthest
    try:
        while start is not None:
            stream.seek(start)
            # The last record parsed and what reading it gave (a Page, a counts key, "" for a type
            # we do not process, None if reading its payload failed). Its page is held back until the
            # next header parses where this record said it would end; counts are kept at once and
            # undone if the record turns out damaged.
            held, out = None, None
            error = False
            try:
                for rec in ArchiveIterator(stream, parse_http=False):
                    if type(out) is Page:
                        yield out
                    n_seen += 1
                    held, out = rec, ""
                    if release is not None:
                        release(rec.stream_pos)
                    counts["records"] += 1
                    rtype = rec.record_type
                    if not (rtype & wanted):
                        counts[f"record:{_type_name(rtype)}"] += 1  # fastwarc skips its block unread
                        continue
                    counts["candidates"] += 1  # a record that may hold a document: the funnel starts here
                    out = None
                    out = _payload(rec, rtype, source, n_seen, max_bytes, T)
                    if type(out) is str:
                        counts[out] += 1
                    elif out.html is None:  # WET
                        counts[f"decode:{out.meta.pop('decode')}"] += 1
            except (OSError, ValueError, EOFError) as e:
                # fastwarc: 'Invalid WARC header', 'Gzip decompression error: ...'. A stream's own
                # error lands here too; the checks below then raise it again.
                if isinstance(e, io.UnsupportedOperation):
                    raise
                error = True
                counts[f"error:{str(e)[:60]}"] += 1
            read_to = stream.tell()  # how far fastwarc read this time
            reread, high = reread + read_to - start, max(high, read_to)
            if not error and type(out) is Page:
                # A clean end after a page read in full: fastwarc found its whole block and nothing but
                # whitespace after it, so there is nothing to check (decompressing the last member
                # again would cost ~1% of reading a small file).
                yield out
                break
            # The run of records ended, cleanly or not: check the last one, then find the next.
            pos = held.stream_pos if held is not None else start
            try:
                state, nxt, fields = _check_record(stream, pos, held.record_id if held is not None else None)
            except io.UnsupportedOperation:  # a stream that no longer holds the record (larger than its window)
                if error or held is None:
                    raise
                state, nxt, fields = "ok", None, None  # a clean end: nothing says it is damaged
            if held is not None and state == "other":
                # fastwarc's position is not this record's start (several records in one gzip member,
                # as some tools write): nothing to check it against. Trust what it read; after an error
                # go on from where it stopped, else the file is done.
                state, nxt = "ok", (pos if error else None)
            if held is not None:
                if state == "ok" and out is not None:
                    if type(out) is Page:
                        yield out
                else:  # damaged ("ok" here: intact bytes that fastwarc failed to read)
                    if type(out) is str and out:
                        counts[out] -= 1  # the reason it was counted under when read
                        if not counts[out]:
                            del counts[out]
                    _count_damaged(counts, _type_name(held.record_type), "corrupt" if state == "ok" else state)
                    damaged = True
            elif state != "other":  # a record starts at `start`, but fastwarc could not read it
                counts["records"] += 1
                rtype = (fields or {}).get(b"warc-type", b"").decode("latin-1").strip().lower() or "unknown"
                if rtype in _WANTED:
                    counts["candidates"] += 1
                else:
                    counts[f"record:{rtype}"] += 1
                _count_damaged(counts, rtype, "corrupt" if state == "ok" else state)
                damaged = True
            else:
                nxt = start  # no record starts here at all: look for one further on
            if state == "truncated" or nxt is None:
                break
            if reread > _REREAD_FACTOR * high + _REREAD_FLOOR:
                # Records whose Content-Length lies make fastwarc read far past them before the
                # damage shows; a file made of such lies would cost its size squared.
                counts["error:damage too dense to read around: gave up"] += 1
                counts["file:gave_up"] += 1
                damaged = True
                break
            start, skipped = _resync(stream, nxt, after=start)
            if skipped:
                resync[0] += skipped
                resync[1] += 1
    finally:
        if resync[1] and counts["records"] > first_record:  # (in a file of junk only, nothing resynced)
            counts["file:resynced_bytes"] += resync[0]
            counts["file:resyncs"] += resync[1]
    if counts["records"] == first_record:
        counts["skip:unreadable_file"] += 1  # no WARC record anywhere: an ARC file, HTML, junk
    elif damaged or resync[1]:
        counts["skip:malformed_file"] += 1


def _type_name(rtype) -> str:
    """'response' for WarcRecordType.response."""
    return str(rtype).split(".")[-1]


def _count_damaged(counts: Counter, rtype: str, reason: str) -> None:
    """A damaged record, already counted as a record (and candidate): name why it is lost."""
    if rtype in _WANTED:
        counts[f"skip:{reason}"] += 1
    counts[f"damaged:{reason}"] += 1


def _payload(rec, rtype, source: str, n_seen: int, max_bytes: int, T) -> Page | str:  # noqa: N803
    """Read a candidate record's payload: its Page, or the counts key of why it has none. T is
    fastwarc's WarcRecordType."""
    if rec.content_length > max_bytes:
        return "skip:too_large"  # the iterator skips the block without buffering it
    url = _clean_uri(rec.headers.get("WARC-Target-URI"))
    rid = _clean_uri(rec.headers.get("WARC-Record-ID")) or f"{source}#{n_seen}"
    date = rec.headers.get("WARC-Date") or ""
    if rtype == T.conversion:  # WET: text already extracted
        body = rec.reader.read()
        if len(body) < rec.content_length:
            return "skip:truncated"
        text, how = decode_html(body, "utf-8")
        if not text.strip():
            return "skip:empty"
        return Page(id=rid, url=url, date=date, text=text, meta={"source": "wet", "decode": how})
    content_type, charset = None, None
    if rtype == T.response:
        ctype = (rec.headers.get("Content-Type") or "").lower()
        if "application/http" not in ctype and "msgtype=response" not in ctype and ctype:
            return "skip:non_html"  # a response record that is not an HTTP message
        try:
            rec.parse_http()
        except Exception:  # noqa: BLE001 -- a garbled HTTP head is one bad record
            return "skip:bad_http"
        content_type = rec.http_content_type
        charset = rec.http_charset
    else:  # resource: the WARC Content-Type is the document's type
        content_type = rec.headers.get("Content-Type")
        if content_type and "charset=" in content_type.lower():
            charset = content_type.lower().split("charset=")[-1].split(";")[0].strip(" \"'")
    head = rec.reader.read(1024)
    if not _is_html(content_type, head):
        return "skip:non_html"
    body = head + rec.reader.read()
    # After parse_http, content_length is the HTTP body's length. fastwarc yields a record cut short
    # by the end of a truncated file silently, so we compare (the end-of-run check names the cause).
    if len(body) < rec.content_length:
        return "skip:truncated"
    if not body.strip():
        return "skip:empty"
    if _chunked(rec):
        body = _dechunk(body)
    return Page(id=rid, url=url, date=date, html=body, charset=charset)


def _parse_head(buf: bytes) -> tuple[int, dict[bytes, bytes]] | None:
    """(length, {lower-case field: value}) of the WARC header that starts `buf`, or None when
    `buf` does not start with one (version line, fields, blank line, a numeric Content-Length).

    >>> _parse_head(b"WARC/1.0\\r\\nWARC-Type: request\\r\\nContent-Length: 2\\r\\n\\r\\nhi")[0]
    51
    """
    if not buf.startswith((b"WARC/1.0\r\n", b"WARC/1.1\r\n")):
        return None
    end = buf.find(b"\r\n\r\n", 8, _HEAD_MAX)
    if end < 0:
        return None
    fields = {}
    for line in buf[10:end].split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if line[:1] in (b" ", b"\t"):  # a folded continuation line (RFC 2616 style), allowed by ISO 28500
            continue
        if not sep or not name.strip():
            return None
        fields[name.strip().lower()] = value.strip()
    if not fields.get(b"content-length", b"").isdigit():
        return None
    return end + 4, fields


def _head_at(stream, pos: int) -> tuple[bool, int, dict[bytes, bytes]] | None:
    """(gzip?, length of the header and of the CR/LF before it, fields) when a WARC record starts at
    `pos`: a gzip member whose data begins with a WARC header (some writers begin a member with the
    previous record's CRLF CRLF), or a plain header. Else None. Reads 4 KB at a time, and only up
    to the header's end: a decoy costs little, and damage further into the member is not ours."""
    stream.seek(pos)
    raw = stream.read(4096)
    gz = raw.startswith(_GZIP_MAGIC)
    d, head, n = zlib.decompressobj(31), bytearray(), len(raw)
    while raw:
        if gz:
            try:
                head += d.decompress(raw)
            except zlib.error:
                return None
        else:
            head += raw
        start = head[:8].lstrip(b"\r\n")
        if not (start.startswith(_WARC_MAGIC) or _WARC_MAGIC.startswith(bytes(start))):
            return None
        if head.find(b"\r\n\r\n", 8) >= 0 or len(head) >= _HEAD_MAX or n >= _HEAD_MAX or (gz and d.eof):
            break
        raw = stream.read(4096)
        n += len(raw)
    lead = len(head[:8]) - len(head[:8].lstrip(b"\r\n"))
    parsed = _parse_head(bytes(head[lead:lead + _HEAD_MAX]))
    return (gz, lead + parsed[0], parsed[1]) if parsed else None


def _check_record(stream, pos: int, rid: str | None) -> tuple[str, int | None, dict | None]:
    """Is the record at `pos` what its Content-Length says? Returns (state, next, fields):

    ok                  it ends where its Content-Length says (then CR/LF, the member's end, or
                        another record in the same member); next = where the next one should start
    bad_content_length  its bytes end elsewhere; next = its gzip member's end, or (plain) the offset
                        of the next record header after its own header
    corrupt             its gzip member does not decompress; next = pos + 1
    truncated           the file ends inside it; next = None
    other               no record of that id starts at pos; next = None
    """
    head = _head_at(stream, pos)
    if head is None:
        return "other", None, None
    gz, hlen, fields = head
    if rid is not None and _clean_uri(fields.get(b"warc-record-id", b"").decode("latin-1")) != _clean_uri(rid):
        return "other", None, fields
    clen = int(fields[b"content-length"])
    if gz:
        return (*_check_member(stream, pos, hlen + clen), fields)
    end = pos + hlen + clen  # a plain record: its block, then CRLF CRLF
    stream.seek(end - 1)
    tail = stream.read(5)  # the block's last byte and the four after it
    if tail[1:] == b"\r\n\r\n":
        return "ok", end + 4, fields
    if tail and len(tail) < 5 and not tail[1:].strip(b"\r\n"):
        return "ok", None, fields  # the block ends the file (a terminator cut or missing)
    nxt, _ = _next_record(stream, pos + hlen)
    if nxt is not None:  # a record header inside the claimed block, or after a block shorter than claimed
        return "bad_content_length", nxt, fields
    return ("truncated" if not tail else "bad_content_length"), None, fields


def _check_member(stream, pos: int, block_end: int) -> tuple[str, int | None]:
    """Decompress the gzip member at `pos` (streaming: memory stays small) and compare its length
    with the record's header + Content-Length (`block_end`, in decompressed bytes)."""
    stream.seek(pos)
    d = zlib.decompressobj(31)
    total, consumed, after = 0, 0, b""
    while not d.eof:
        data = stream.read(1 << 18)
        if not data:
            return "truncated", None
        consumed += len(data)
        while data and not d.eof:
            try:
                out = d.decompress(data, 1 << 20)
            except zlib.error:
                return "corrupt", pos + 1
            data = d.unconsumed_tail
            if total + len(out) > block_end and len(after) < 64:  # keep what follows the block
                after += out[max(0, block_end - total):][:64 - len(after)]
            total += len(out)
    member_end = pos + consumed - len(d.unused_data)
    ok = total >= block_end and (not after.strip(b"\r\n") if total - block_end <= 64
                                 else after.startswith(b"\r\n\r\n" + _WARC_MAGIC))
    return ("ok" if ok else "bad_content_length"), member_end


def _next_record(stream, pos: int) -> tuple[int | None, int]:
    """(offset of the first WARC record at or after `pos`, or None; the offset where the search
    ended, i.e. that record or the end of the file). Candidates are found with bytes.find (fast on
    junk) and each is confirmed by `_head_at`, so a stray 1f 8b 08 or "WARC/1." is passed over."""
    step = 1 << 20
    while True:
        stream.seek(pos)
        buf = stream.read(step + 16)
        limit = step if len(buf) > step else len(buf)  # the 16-byte overlap is searched next round
        # the next hit of each magic, each searched for again only once passed (a chunk full of one
        # magic must not rescan the chunk for the other at every hit)
        g, w = buf.find(_GZIP_MAGIC, 0, limit + 2), buf.find(_WARC_MAGIC, 0, limit + 6)
        while g >= 0 or w >= 0:
            i = g if w < 0 or 0 <= g < w else w
            if _maybe_head(buf, i) and _head_at(stream, pos + i) is not None:
                return pos + i, pos + i
            if i == g:
                g = buf.find(_GZIP_MAGIC, i + 1, limit + 2)
            else:
                w = buf.find(_WARC_MAGIC, i + 1, limit + 6)
        if len(buf) <= step:
            return None, pos + len(buf)
        pos += step


def _maybe_head(buf: bytes, i: int) -> bool:
    """A cheap first test of a candidate at buf[i], so that a file full of decoys costs little: the
    version line, or a gzip member whose first decompressed bytes could be one."""
    if not buf.startswith(_GZIP_MAGIC, i):
        return buf.startswith((b"WARC/1.0\r\n", b"WARC/1.1\r\n"), i)
    if len(buf) > i + 3 and buf[i + 3] & 0xE0:  # RFC 1952: FLG's top 3 bits are reserved, zero
        return False
    try:
        out = zlib.decompressobj(31).decompress(memoryview(buf)[i:i + 4096], 24).lstrip(b"\r\n")
    except zlib.error:
        return False
    return out.startswith(_WARC_MAGIC) or (len(out) < 7 and _WARC_MAGIC.startswith(out))


def _resync(stream, pos: int, after: int) -> tuple[int | None, int]:
    """(where the next record starts at or after `pos` and strictly after `after`, or None; the bytes
    skipped to get there, not counting the CR/LF that may end the previous record)."""
    pos = max(pos, after)
    stream.seek(pos)
    lead = stream.read(64)
    pos += len(lead) - len(lead.lstrip(b"\r\n"))
    nxt, end = _next_record(stream, max(pos, after + 1))
    return nxt, end - pos


def _chunked(rec) -> bool:
    if not rec.is_http_parsed:
        return False
    return "chunked" in (rec.http_headers.get("Transfer-Encoding") or "").lower()


def _dechunk(body: bytes) -> bytes:
    """Undo HTTP chunked transfer encoding (some crawlers store the wire bytes). On a malformed
    chunk stream the bytes are returned as they are."""
    out, pos = [], 0
    try:
        while pos < len(body):
            nl = body.index(b"\r\n", pos)
            size = int(body[pos:nl].split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return b"".join(out)
            out.append(body[nl + 2:nl + 2 + size])
            pos = nl + 2 + size + 2
        return b"".join(out)
    except ValueError:
        return body


def parse_date(date: str) -> str:
    """WARC dates as ISO 8601 strings ('' when missing or unparsable)."""
    try:
        return datetime.fromisoformat(date.replace("Z", "+00:00")).isoformat() if date else ""
    except ValueError:
        return ""


def expand_inputs(patterns: list[str], setting: str | os.PathLike = "") -> list[str]:
    """Local paths/globs (relative ones looked up in the data dir too, as `chatforge.common.data_path`
    does; `setting` is the --data_dir setting), URLs and Common Crawl paths, in the given order,
    duplicates removed. A Common Crawl path whose file is in the data dir (`chatforge data download cc`
    puts it there) is that local file: read from disk, not streamed again. Raises FileNotFoundError
    naming an entry with no match."""
    import glob

    from chatforge.common import ChatforgeError, data_dir, data_path

    setting = str(setting) if setting else ""
    out: list[str] = []
    for p in patterns:
        if p.startswith("crawl-data/") and (data_dir(setting) / p).is_file():
            out.append(str(data_dir(setting) / p))
            continue
        if p.startswith(("http://", "https://", "crawl-data/")):
            out.append(p)
            continue
        try:  # an existing file is that file, even when its name holds glob characters ("a[1].warc.gz")
            hits = [str(data_path(p, setting))]
        except ChatforgeError:
            hits = []
        if not hits and any(ch in p for ch in "*?["):
            hits = sorted(glob.glob(p)) or sorted(glob.glob(str(data_dir(setting) / p)))
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise FileNotFoundError(p)
        out.extend(hits)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]
