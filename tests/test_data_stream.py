"""WARC input streamed over HTTPS (the Common Crawl case), against a local HTTPS server with a
self-signed certificate: the pages are those of the local file, `crawl-data/...` paths resolve to the
crawl's base URL, a download cut mid-record is counted as truncated while the run goes on, and a
damaged file is read around on the forward-only stream as on a local file."""

from __future__ import annotations

import http.server
import shutil
import ssl
import subprocess
import threading
import zlib
from collections import Counter

import pytest

from chatforge.data import warc

WARC = "web/dolma-sample-0000.warc.gz"


@pytest.fixture(scope="module")
def https_server(tmp_path_factory, shared_data):
    """Serves a folder over https://localhost:PORT/ with a throwaway certificate that the test trusts
    through SSL_CERT_FILE (OpenSSL's default verify paths read it), so verification stays on."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed: cannot make a test certificate")
    root = tmp_path_factory.mktemp("https")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    site = root / "site"
    (site / "crawl-data" / "CC-TEST" / "warc").mkdir(parents=True)
    body = (shared_data / WARC).read_bytes()
    (site / "crawl-data" / "CC-TEST" / "warc" / "a.warc.gz").write_bytes(body)
    (site / "cut.warc.gz").write_bytes(body[: len(body) // 2])  # a download that stops half-way
    (site / "junk.warc.gz").write_bytes(with_junk(body))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(site), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://localhost:{server.server_address[1]}/", cert
    server.shutdown()


def with_junk(body: bytes) -> bytes:
    """The WARC with 700 junk bytes after every 10th gzip member."""
    out, pos, i = [], 0, 0
    while pos < len(body):
        d = zlib.decompressobj(31)
        d.decompress(body[pos:])
        end = len(body) - len(d.unused_data)
        out.append(body[pos:end] + (bytes(range(7, 250)) * 3)[:700] * (i % 10 == 9))
        pos, i = end, i + 1
    return b"".join(out)


def pages(path: str, counts: Counter | None = None) -> list[tuple[str, str, int]]:
    return [(p.id, p.url, len(p.html or b"")) for p in warc.iter_pages(path, counts)]


def test_https_url_streams_the_same_pages_as_the_file(https_server, monkeypatch, shared_data):
    base, cert = https_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    local = pages(str(shared_data / WARC))
    assert len(local) > 10
    assert pages(base + "crawl-data/CC-TEST/warc/a.warc.gz") == local
    # a Common Crawl path is fetched from the crawl's base URL
    monkeypatch.setattr(warc, "CC_PREFIX", base)
    assert pages("crawl-data/CC-TEST/warc/a.warc.gz") == local
    assert warc.expand_inputs(["crawl-data/CC-TEST/warc/a.warc.gz", base + "x.warc.gz"]) == [
        "crawl-data/CC-TEST/warc/a.warc.gz", base + "x.warc.gz"]


def test_https_download_cut_short_is_counted_and_skipped(https_server, monkeypatch, shared_data):
    base, cert = https_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    counts: Counter = Counter()
    got = pages(base + "cut.warc.gz", counts)
    full = pages(str(shared_data / WARC))
    assert 0 < len(got) < len(full) and got == full[:len(got)]  # what arrived is intact
    assert counts["skip:truncated"] == 1


def test_damaged_file_is_read_around_on_a_stream(https_server, monkeypatch, shared_data):
    """Resynchronising needs to look back at the last record's bytes: the stream keeps them in a
    window, so a junk-ridden download gives every page of the clean file, junk counted."""
    base, cert = https_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    counts: Counter = Counter()
    assert pages(base + "junk.warc.gz", counts) == pages(str(shared_data / WARC))
    assert counts["file:resynced_bytes"] == 700 * 4 and counts["file:resyncs"] == 4  # 48 records: 4 junk runs
    # When the last record's bytes are no longer in the window (a record larger than it), reading
    # stops at the damage, counted; what came before is intact.
    def forget(self, pos):
        del self.buf[:self.pos - self.base]
        self.base = self.pos

    monkeypatch.setattr(warc._ForwardStream, "release", forget)
    counts = Counter()
    got, clean = pages(base + "junk.warc.gz", counts), pages(str(shared_data / WARC))
    assert 0 < len(got) < len(clean) and got == clean[:len(got)]
    assert counts["skip:malformed_file"] == 1 and any("cannot go back" in k for k in counts)
    # ... while a clean file whose last record cannot be looked at again is not reported as damaged
    counts = Counter()
    assert pages(base + "crawl-data/CC-TEST/warc/a.warc.gz", counts) == clean
    assert not [k for k in counts if k.startswith(("skip:malformed", "error:", "file:"))]


def test_untrusted_certificate_and_missing_url_are_counted_not_fatal(https_server, monkeypatch):
    base, _ = https_server
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", "/nonexistent")  # trust nothing: verification must fail
    counts: Counter = Counter()
    assert pages(base + "crawl-data/CC-TEST/warc/a.warc.gz", counts) == []
    assert counts["skip:unreadable_file"] == 1


def test_data_stage_over_https_keeps_what_the_local_file_keeps(https_server, monkeypatch, tmp_path, shared_data):
    import pyarrow.parquet as pq

    from chatforge.config import DataConfig, resolve_config
    from chatforge.stages import data

    base, cert = https_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setattr(warc, "CC_PREFIX", base)
    kept = {}
    for name, source in [("local", str(shared_data / WARC)), ("remote", "crawl-data/CC-TEST/warc/a.warc.gz")]:
        cfg = resolve_config(DataConfig, overrides=dict(
            inputs=[source], runs_dir=str(tmp_path), run=name, workers=1, data_dir=str(shared_data),
            languages=[], lang_threshold=0.0))
        stats = data.run(cfg)
        shards = sorted((tmp_path / name / "data" / "shards").glob("*.parquet"))
        kept[name] = [i for f in shards for i in pq.read_table(f).column("id").to_pylist()]
        assert stats["docs_out"] == len(kept[name])
    assert kept["remote"] == kept["local"] and len(kept["local"]) > 0
