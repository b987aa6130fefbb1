"""Reading web crawls: WARC (and WET) records -> `Page`s with decoded HTML, with every skip counted.

We read with `fastwarc` (resiliparse's WARC reader, about 2x faster than warcio on gzip). What we keep:

- `response` records with an HTTP payload whose Content-Type is HTML (or, when the server sent none,
  whose bytes look like HTML) -> a Page with `html` set;
- `resource` records of an HTML type (wget and archive tools store pages that way);
- `conversion` records (WET files: Common Crawl's own text extraction) -> a Page with `text` set,
  which skips our HTML extraction step.

Everything else is counted, never fatal: other record types by type, non-HTML payloads, empty
payloads, pages over `max_bytes` (never read into memory), records cut short by a truncated file,
and files whose next header is malformed (the rest of such a file cannot be resynchronised safely,
so reading stops there and the reason names it).

Text decoding follows the order browsers roughly use: the charset the server declared, then
detection (resiliparse's `detect_encoding`, which also reads <meta charset>), then UTF-8 with
replacement characters, so undecodable bytes never stop a run.
"""

from __future__ import annotations

import codecs
import io
import os
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Iterator

# Common Crawl paths such as "crawl-data/CC-MAIN-2024-22/segments/.../x.warc.gz" are served here.
CC_PREFIX = "https://data.commoncrawl.org/"
HTML_TYPES = ("text/html", "application/xhtml+xml", "application/xml+html")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024  # pages over 10 MB are almost never prose; skip unread


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
    panics on a socket's UnsupportedOperation), but only ever reads forward. Seeking forward reads
    and discards; seeking back is an error."""

    def __init__(self, raw):
        self.raw, self.pos = raw, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.pos + offset if whence == io.SEEK_CUR else -1
        if target < self.pos:
            raise io.UnsupportedOperation("an HTTP stream can only seek forward")
        while self.pos < target and self.read(min(1 << 20, target - self.pos)):
            pass
        return self.pos

    def readinto(self, buf) -> int:
        n = self.raw.readinto(buf)
        self.pos += n
        return n

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
    """Pages of one WARC/WET file. `counts` receives one key per outcome:

    records                 every record seen (all types)
    candidates              response/resource/conversion records (documents entering the funnel)
    record:<type>           records of types we do not process (request, warcinfo, metadata, ...)
    skip:non_html           response/resource payloads that are not HTML (images, PDFs, JSON, ...)
    skip:empty              empty payloads (redirects, 204s)
    skip:too_large          payload over max_bytes (not read)
    skip:truncated          a record cut short by the end of the file (truncated gzip or download)
    skip:malformed_file     a malformed header: the rest of the file is skipped (counted once)
    skip:unreadable_file    the file could not be opened or is not a WARC at all
    decode:<how>            how each kept page was decoded (declared, utf-8, detected, replaced)
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    counts = counts if counts is not None else Counter()
    wanted = WarcRecordType.response | WarcRecordType.resource | WarcRecordType.conversion
    try:
        stream = open_stream(path)
    except OSError as e:
        counts["skip:unreadable_file"] += 1
        counts[f"error:{type(e).__name__}"] += 1
        return
    n_seen = 0
    try:
        it = ArchiveIterator(stream, parse_http=False)
        for rec in it:
            n_seen += 1
            counts["records"] += 1
            rtype = rec.record_type
            if not (rtype & wanted):
                counts[f"record:{str(rtype).split('.')[-1]}"] += 1
                continue
            counts["candidates"] += 1  # a record that may hold a document: the funnel starts here
            if rec.content_length > max_bytes:
                counts["skip:too_large"] += 1  # the iterator skips the block without buffering it
                continue
            url = _clean_uri(rec.headers.get("WARC-Target-URI"))
            rid = _clean_uri(rec.headers.get("WARC-Record-ID")) or f"{os.path.basename(path)}#{n_seen}"
            date = rec.headers.get("WARC-Date") or ""
            if rtype == WarcRecordType.conversion:  # WET: text already extracted
                body = rec.reader.read()
                if len(body) < rec.content_length:
                    counts["skip:truncated"] += 1
                    continue
                text, how = decode_html(body, "utf-8")
                if not text.strip():
                    counts["skip:empty"] += 1
                    continue
                counts[f"decode:{how}"] += 1
                yield Page(id=rid, url=url, date=date, text=text, meta={"source": "wet"})
                continue
            content_type, charset = None, None
            if rtype == WarcRecordType.response:
                ctype = (rec.headers.get("Content-Type") or "").lower()
                if "application/http" not in ctype and "msgtype=response" not in ctype and ctype:
                    counts["skip:non_html"] += 1  # a response record that is not an HTTP message
                    continue
                try:
                    rec.parse_http()
                except Exception:  # noqa: BLE001 -- a garbled HTTP head is one bad record
                    counts["skip:bad_http"] += 1
                    continue
                content_type = rec.http_content_type
                charset = rec.http_charset
            else:  # resource: the WARC Content-Type is the document's type
                content_type = rec.headers.get("Content-Type")
                if content_type and "charset=" in content_type.lower():
                    charset = content_type.lower().split("charset=")[-1].split(";")[0].strip(" \"'")
            head = rec.reader.read(1024)
            if not _is_html(content_type, head):
                counts["skip:non_html"] += 1
                continue
            body = head + rec.reader.read()
            # After parse_http, content_length is the HTTP body's length. fastwarc yields a record
            # cut short by the end of a truncated file silently, so we compare.
            if len(body) < rec.content_length:
                counts["skip:truncated"] += 1
                continue
            if not body.strip():
                counts["skip:empty"] += 1
                continue
            if _chunked(rec):
                body = _dechunk(body)
            yield Page(id=rid, url=url, date=date, html=body, charset=charset)
    except (OSError, ValueError, EOFError) as e:
        # fastwarc raises OSError('Invalid WARC header') on a malformed header or a non-WARC file
        # (ARC, HTML, garbage). Nothing after it can be trusted; count it and end this file.
        counts["skip:malformed_file" if n_seen else "skip:unreadable_file"] += 1
        counts[f"error:{str(e)[:60]}"] += 1
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001
            pass


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
    duplicates removed. Raises FileNotFoundError naming an entry with no match."""
    import glob

    from chatforge.common import ChatforgeError, data_dir, data_path

    setting = str(setting) if setting else ""
    out: list[str] = []
    for p in patterns:
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
