"""HTML -> main-content text.

Two extractors, speed against precision (the user's choice, `--extractor`):

- `resiliparse` (default): lexbor's C HTML parser plus resiliparse's main-content heuristics;
  hundreds of pages per second per core.
- `trafilatura`: FineWeb's choice (`favor_precision=True`, as in FineWeb's published pipeline);
  more precise boilerplate removal, about 20x slower. Pure Python over lxml, so a per-document
  timeout guards against pathological pages. FineWeb's selection was made with trafilatura 1.x
  (datatrove pins `trafilatura>=1.8,<1.12`); 2.x lays text out differently (it joins a `<dt>` and its
  `<dd>` on one line, among others), and the line- and word-based filters then keep another set
  (bench/RESULTS.md: Jaccard 0.57 against datatrove with 2.3.1, 0.99 with 1.11). The `data` extra pins
  datatrove's range; `extractor_version` is recorded with every run and is part of its fingerprint.

Both return plain text with one block (paragraph, heading, list item) per line, which is what the
line-based quality filters (C4, FineWeb, Gopher) expect.
"""

from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager

import numpy as np

from chatforge.data.warc import decode_html

EXTRACTORS = ("resiliparse", "trafilatura")
FINEWEB_TRAFILATURA = (1, 8), (1, 12)  # the range datatrove 0.10 pins: [1.8, 1.12)


def extractor_version(extractor: str) -> str:
    """The installed version of the library behind `extractor` ('' when it is not installed).

    >>> extractor_version("resiliparse") != ""
    True
    """
    from importlib import metadata

    try:
        return metadata.version({"resiliparse": "resiliparse", "trafilatura": "trafilatura"}[extractor])
    except (KeyError, metadata.PackageNotFoundError):
        return ""


def fineweb_trafilatura(version: str) -> bool:
    """Whether a trafilatura version is in the range FineWeb's reference pipeline (datatrove) pins.

    >>> fineweb_trafilatura("1.11.0"), fineweb_trafilatura("2.3.1")
    (True, False)
    """
    try:
        v = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return FINEWEB_TRAFILATURA[0] <= v < FINEWEB_TRAFILATURA[1]


class ExtractionTimeout(Exception):
    """The extractor ran past its per-document time budget."""


class TooDeep(Exception):
    """The page nests elements deeper than `max_depth`."""


# resiliparse's main-content pass is quadratic in DOM depth (0.3 s at depth 5,000, 6 s at 20,000,
# measured), and no real page nests that deep: browsers cap the DOM at 512 levels (Blink) and lxml
# at 255 by default. So depth is checked before extraction.
MAX_DEPTH = 2000
_TAG = re.compile(rb"<(/?)([a-zA-Z][a-zA-Z0-9-]*)[^>]*?(/?)>")
_VOID_NAMES = {b"area", b"base", b"br", b"col", b"embed", b"hr", b"img", b"input", b"link", b"meta", b"param",
               b"source", b"track", b"wbr", b"p", b"li", b"option", b"td", b"tr", b"th", b"dt", b"dd"}


def nesting_depth(html: bytes, limit: int = MAX_DEPTH) -> int:
    """An upper bound on the element nesting depth, cheap for normal pages.

    First a vectorised bound: the running count of '<x' opening tags minus '</' closing tags (voids
    and unclosed <p>/<li> only inflate it). Only when that bound exceeds `limit` do we walk the tags
    in Python, ignoring void elements and elements HTML closes implicitly.

    >>> nesting_depth(b"<div><div><p>x</div></div>")
    3
    """
    buf = np.frombuffer(html, dtype=np.uint8)
    lt = np.flatnonzero(buf[:-1] == ord("<"))
    if not len(lt):
        return 0
    nxt = buf[lt + 1]
    opens = ((nxt | 0x20) >= ord("a")) & ((nxt | 0x20) <= ord("z"))
    step = opens.astype(np.int32) - (nxt == ord("/")).astype(np.int32)
    bound = int(np.cumsum(step).max())
    if bound <= limit:
        return max(bound, 0)
    depth = best = 0
    for m in _TAG.finditer(html):
        name = m.group(2).lower()
        if m.group(1):
            depth = max(0, depth - 1)
        elif name not in _VOID_NAMES and not m.group(3):
            depth += 1
            best = max(best, depth)
    return best


@contextmanager
def time_limit(seconds: float):
    """Raise ExtractionTimeout after `seconds` of wall time (SIGALRM; main thread on POSIX only,
    elsewhere no limit). Python code is interrupted at once; a long C call (lxml, lexbor) is
    interrupted when it returns to Python."""
    usable = seconds > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise ExtractionTimeout(f"extraction took more than {seconds}s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _resiliparse(html: str) -> str:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)
    # No alt texts, link targets or form fields: they read as noise in prose.
    return extract_plain_text(tree, preserve_formatting=True, main_content=True, list_bullets=True,
                              alt_texts=False, links=False, form_fields=False, noscript=False)


def _trafilatura(html: str, favor_precision: bool) -> str:
    # datatrove's Trafilatura step (FineWeb's) passes deduplicate=True, which consults a process-wide
    # LRU of text segments: a page's text then depends on which pages the same process saw before it,
    # i.e. on sharding. We keep it off; on the benchmark's input it changes no filter decision.
    import trafilatura

    return trafilatura.extract(html, favor_precision=favor_precision, include_comments=False,
                               include_tables=True, include_images=False, deduplicate=False) or ""


def _tidy(text: str) -> str:
    """Strip each line, drop empty lines, collapse runs of blank lines (extractors differ here)."""
    lines = [ln.strip() for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if ln)


def extract_text(html: bytes | str, extractor: str = "resiliparse", timeout: float = 0.0,
                 favor_precision: bool = True, charset: str | None = None, max_depth: int = MAX_DEPTH,
                 raw: bytes | None = None) -> str:
    """Main-content text of an HTML page ('' when there is none). Raises TooDeep for pages nested
    deeper than `max_depth` and ExtractionTimeout past `timeout` seconds. A caller that decoded the
    page itself passes the undecoded bytes as `raw`: the depth check reads them (no re-encoding).

    >>> extract_text(b"<html><body><nav>Home | About</nav><article><p>Hello there, reader.</p>"
    ...              b"</article></body></html>")
    'Hello there, reader.'
    """
    if isinstance(html, bytes):
        raw = html if raw is None else raw
        html, _ = decode_html(html, charset)
    if raw is None or b"\x00" in raw[:4096]:  # UTF-16/32 bytes hide each '<' behind a NUL: re-encode
        raw = html.encode("utf-8", "replace")
    if max_depth and nesting_depth(raw, max_depth) > max_depth:
        raise TooDeep(f"elements nest deeper than {max_depth}")
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; choose {' or '.join(EXTRACTORS)}")
    with time_limit(timeout):
        raw = _resiliparse(html) if extractor == "resiliparse" else _trafilatura(html, favor_precision)
    return _tidy(raw)
