"""`chatforge data download cc`: Common Crawl WARC files from a local HTTP server laid out like
data.commoncrawl.org (a warc.paths.gz listing three small WARC files of real format). They land under
the same crawl-data/... path in the data dir, where the data stage reads them instead of streaming;
cut-off and corrupt files are refused and never kept under their final name; an interrupted download
resumes with an HTTP Range request; a server that is down gives one clear error.

No test contacts any address other than 127.0.0.1 (`loopback_only`, shared with test_datasets.py).
"""

from __future__ import annotations

import gzip
import re
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_datasets import closed_port_url, loopback_only  # noqa: F401  (loopback_only: an autouse fixture)

from chatforge import datasets
from chatforge.cli import main

pytestmark = pytest.mark.network

CRAWL = "CC-MAIN-2099-01"
LISTING = f"crawl-data/{CRAWL}/warc.paths.gz"
PATHS = [f"crawl-data/{CRAWL}/segments/1700000000000.{s}/warc/CC-MAIN-20990101000000-20990101010000-{i:05d}.warc.gz"
         for s, i in ((10, 0), (10, 1), (11, 2))]


def warc_file(n: int) -> bytes:
    """A small WARC as Common Crawl writes them: a warcinfo record, then responses, one gzip member each."""
    def record(rtype: str, body: bytes, extra: str = "") -> bytes:
        head = (f"WARC/1.0\r\nWARC-Type: {rtype}\r\nWARC-Date: 2099-01-01T00:00:00Z\r\n{extra}"
                f"WARC-Record-ID: <urn:uuid:00000000-0000-0000-{n:04d}-{len(body):012d}>\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        return gzip.compress(head + body + b"\r\n\r\n", mtime=0)

    out = [record("warcinfo", b"software: chatforge-test\r\n", "Content-Type: application/warc-fields\r\n")]
    for i in range(3):
        html = (f"<html><body><p>Page {i} of file {n}. " + "Some words of ordinary prose. " * 30
                + "</p></body></html>").encode()
        http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: " + \
            str(len(html)).encode() + b"\r\n\r\n" + html
        out.append(record("response", http, f"WARC-Target-URI: https://example.org/{n}/{i}\r\n"
                                            f"Content-Type: application/http; msgtype=response\r\n"))
    return b"".join(out)


class Site:
    """A server laid out like data.commoncrawl.org on 127.0.0.1. `cut[path] = n`: announce the whole
    length but send only n bytes and close (a connection that drops). `ranges`: honour Range requests,
    as Common Crawl's server does. `requests`: (path, Range header) of every GET."""

    def __init__(self, root: Path, ranges: bool = True):
        self.root, self.ranges = root, ranges
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        site = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                rel = urllib.parse.unquote(self.path.lstrip("/"))
                rng = self.headers.get("Range")
                site.requests.append((rel, rng))
                f = site.root / rel
                if not f.is_file():
                    self.send_error(404)
                    return
                data = f.read_bytes()
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng and site.ranges else 0
                if start >= len(data) > 0:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = site.cut.get(rel)
                self.wfile.write(data[start:cut])
                self.close_connection = cut is not None

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        # a short poll interval: shutdown() waits up to one, 0.5 s by default, at every test's end
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def fetched(self, rel: str) -> int:
        return sum(r == rel for r, _ in self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def write_site(root: Path, files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """The listing and the WARC files (PATHS -> real WARCs unless `files` says otherwise) under root."""
    files = files or {p: warc_file(i) for i, p in enumerate(PATHS)}
    for rel, data in {LISTING: gzip.compress("\n".join(PATHS).encode() + b"\n"), **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.fixture
def site(tmp_path):
    """site(files=None, ranges=True) -> a running Site serving write_site's folder."""
    servers = []

    def start(files: dict[str, bytes] | None = None, ranges: bool = True) -> Site:
        root = tmp_path / f"site{len(servers)}"
        write_site(root, files)
        servers.append(Site(root, ranges))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def download(target: Path, mirror: str, *more: str) -> int:
    return main(["data", "download", "cc", "--crawl", CRAWL, "--data_dir", str(target), "--mirror", mirror, *more])


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------


def test_download_two_files_to_their_crawl_paths_then_kept(site, tmp_path, capsys):
    server = site()
    target = tmp_path / "data"

    assert download(target, server.url, "--files", "2") == 0
    out = capsys.readouterr().out
    for i, rel in enumerate(PATHS[:2]):
        assert (target / rel).read_bytes() == warc_file(i), rel
        assert datasets.check_warc_gz(target / rel) == ""
        assert re.search(rf"{re.escape(rel)}  downloaded \(.* MB/s; gzip complete, WARC ok\)", out), out
    assert not (target / PATHS[2]).exists()  # the first N of the listing, in its order
    assert (target / LISTING).is_file()  # kept: a rerun needs no network
    assert "2 downloaded, 0 were there" in out, out
    assert leftovers(target) == []

    # rerun: both verified on disk, nothing fetched, not even the listing
    n = len(server.requests)
    assert download(target, server.url, "--files", "2") == 0
    out = capsys.readouterr().out
    assert out.count("already present") == 2 and "0 downloaded, 2 were there" in out, out
    assert len(server.requests) == n

    # --force fetches the listing and the files again
    assert download(target, server.url, "--files", "2", "--force") == 0
    assert len(server.requests) == n + 3
    assert capsys.readouterr().out.count("  downloaded") == 3

    # `data list` shows the cc entry as present
    assert main(["data", "list", "--data_dir", str(target)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cc "))
    assert row.split()[:2] == ["cc", "2"] and " yes " in row and "Common Crawl" in row, row


def test_the_data_stage_reads_the_local_copy(site, tmp_path):
    """The presets' `crawl-data/...` inputs resolve to the downloaded file; others are still streamed."""
    from chatforge.data.warc import expand_inputs, iter_pages

    server = site()
    target = tmp_path / "data"
    assert download(target, server.url) == 0
    assert expand_inputs([PATHS[0], PATHS[1]], target) == [str(target / PATHS[0]), PATHS[1]]
    pytest.importorskip("fastwarc")
    pages = list(iter_pages(str(target / PATHS[0])))
    assert [p.url for p in pages] == [f"https://example.org/0/{i}" for i in range(3)]


def test_origin_is_where_the_data_stage_streams_from(site, monkeypatch, tmp_path):
    """Without --mirror the files come from data.commoncrawl.org, the data stage's CC_PREFIX; a local
    server stands in for it."""
    from chatforge.data import warc

    assert datasets.CC_ORIGIN == warc.CC_PREFIX
    server = site()
    monkeypatch.setattr(datasets, "CC_ORIGIN", server.url)
    assert main(["data", "download", "cc", "--crawl", CRAWL, "--data_dir", str(tmp_path)]) == 0
    assert (tmp_path / PATHS[0]).read_bytes() == warc_file(0)
    assert [r for r, _ in server.requests] == [LISTING, PATHS[0]]


def test_mirror_can_be_a_local_folder(tmp_path):
    write_site(tmp_path / "mirror")
    assert download(tmp_path / "data", str(tmp_path / "mirror"), "--files", "3") == 0
    assert [(tmp_path / "data" / p).read_bytes() for p in PATHS] == [warc_file(i) for i in range(3)]


@pytest.mark.parametrize("damage, problem", [
    (lambda b: b[: len(b) // 2], "ends in the middle of a member"),
    (lambda b: b[:-5], "ends in the middle of a member"),
    (lambda b: gzip.compress(b"<html>not a WARC</html>"), "does not start with a WARC record"),
    (lambda b: b"<html>not gzip</html>", "not intact gzip data"),
], ids=["cut-in-half", "cut-in-trailer", "not-warc", "not-gzip"])
def test_damaged_file_on_the_server_is_refused_and_not_kept(site, tmp_path, capsys, damage, problem):
    files = {p: warc_file(i) for i, p in enumerate(PATHS)}
    files[PATHS[1]] = damage(files[PATHS[1]])
    server = site(files)
    target = tmp_path / "data"

    assert download(target, server.url, "--files", "2") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for part in (PATHS[1], server.url + PATHS[1], "not a complete WARC", problem, "not kept", "again", "--mirror"):
        assert part in err, (part, err)
    assert (target / PATHS[0]).is_file() and not (target / PATHS[1]).exists()
    assert leftovers(target) == []


@pytest.mark.parametrize("ranges", [True, False])
def test_interrupted_download_resumes_on_rerun(site, tmp_path, capsys, ranges):
    """A dropped connection keeps the bytes received under a temp name; the rerun asks for the rest
    (Range), or starts over where the server ignores Range, and the result is the whole file."""
    server = site(ranges=ranges)
    data = warc_file(0)
    half = len(data) // 2
    server.cut[PATHS[0]] = half
    target = tmp_path / "data"

    assert download(target, server.url) == 2
    err = capsys.readouterr().err.strip()
    part = target / Path(PATHS[0]).parent / f".{Path(PATHS[0]).name}.part"
    for s in (PATHS[0], f"connection closed after {half:,} of {len(data):,} bytes", "run the command again",
              "resumes", str(part)):
        assert s in err, (s, err)
    assert not (target / PATHS[0]).exists() and part.stat().st_size == half

    del server.cut[PATHS[0]]
    assert download(target, server.url) == 0
    out = capsys.readouterr().out
    assert "left by an earlier run: resuming there" in out
    assert ("starting over" in out) == (not ranges), out
    assert (target / PATHS[0]).read_bytes() == data
    assert server.requests[-1] == (PATHS[0], f"bytes={half}-")
    assert leftovers(target) == []


def test_progress_lines_in_a_log(site, monkeypatch, tmp_path, capsys):
    """Without a terminal (stderr captured, as in a log file) progress is a line with bytes and MB/s,
    every PROGRESS_EVERY_S; zero here, so every chunk prints one."""
    monkeypatch.setattr(datasets, "PROGRESS_EVERY_S", 0.0)
    server = site()
    assert download(tmp_path, server.url) == 0
    size = datasets._human(len(warc_file(0)))
    assert re.search(rf"cc +{re.escape(PATHS[0])}  {size} of {size} \(100%\), [\d.]+ MB/s", capsys.readouterr().err)


def test_present_file_that_is_cut_short_is_fetched_again(site, tmp_path, capsys):
    server = site()
    target = tmp_path / "data"
    (target / PATHS[0]).parent.mkdir(parents=True)
    (target / PATHS[0]).write_bytes(warc_file(0)[:100])
    assert download(target, server.url) == 0
    assert "present but the gzip stream ends in the middle of a member" in capsys.readouterr().out
    assert (target / PATHS[0]).read_bytes() == warc_file(0)


def test_server_down_gives_one_clear_error(tmp_path, capsys):
    url = closed_port_url()
    assert download(tmp_path, url) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for part in (url + LISTING, CRAWL, "offline", "refused", "--mirror URL", "data.commoncrawl.org",
                 str(tmp_path / "crawl-data" / CRAWL)):
        assert part in err, (part, err)
    assert leftovers(tmp_path) == [] and not list(tmp_path.rglob("*.gz"))


def test_unknown_crawl_names_the_fix(site, tmp_path, capsys):
    server = site()
    assert main(["data", "download", "cc", "--crawl", "CC-MAIN-2099-02", "--data_dir", str(tmp_path),
                 "--mirror", server.url]) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "crawl-data/CC-MAIN-2099-02/warc.paths.gz" in err and "--crawl" in err, err


def test_listing_may_not_point_outside_the_crawl(site, tmp_path, capsys):
    server = site()
    evil = [f"crawl-data/{CRAWL}/../../../escape.warc.gz"]
    (server.root / LISTING).write_bytes(gzip.compress("\n".join(evil).encode()))
    assert download(tmp_path / "data", server.url) == 2
    err = capsys.readouterr().err
    assert "is not a list of WARC paths" in err and "escape.warc.gz" in err, err
    assert not list(tmp_path.rglob("escape*")) and not (tmp_path / "data" / LISTING).exists()


@pytest.mark.parametrize("argv, message", [
    (["gsm8k", "--files", "2"], "go with the name 'cc'"),
    (["cc", "--crawl", "2024-22"], "not a Common Crawl crawl name"),
    (["cc", "--files", "0"], "1 or more"),
    (["c"], "Did you mean 'cc'"),
])
def test_bad_arguments_fail_before_any_download(tmp_path, capsys, argv, message):
    assert main(["data", "download", *argv, "--data_dir", str(tmp_path), "--mirror", closed_port_url()]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
