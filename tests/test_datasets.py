"""`chatforge data list / download`: the registry stays true to shared/data, downloads go through a real
HTTP server on 127.0.0.1 (the shared folder served as a mirror, or as a stand-in for the origins), and
failures (corruption, offline, HTTP errors, unknown names) give one clear message and leave nothing.

No test contacts any address other than 127.0.0.1: an autouse fixture refuses other connections.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chatforge import datasets
from chatforge.cli import main

pytestmark = pytest.mark.network


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """No proxies (they would reroute 127.0.0.1), and no connection to anything but 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"test tried to reach {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


class _Server:
    def __init__(self, directory: Path):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def serve():
    """serve(folder) -> a running HTTP server on 127.0.0.1 with .url and .requests (paths fetched)."""
    servers = []

    def start(directory: Path) -> _Server:
        servers.append(_Server(directory))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens here once the socket is closed


def sha16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and (p.name.startswith(".") or p.suffix in (".part", ".t"))]


def per_file(out: str, outcome: str) -> int:
    """How many per-file lines (`NAME  PATH  OUTCOME ...`) report this outcome (the summary line is not one)."""
    return sum(1 for line in out.splitlines() if line.split("  ")[0].strip() in datasets.REGISTRY
               and f"  {outcome}" in line)


def replace_urls(monkeypatch, name: str, urls: dict[str, str]) -> None:
    """Point some of a dataset's origin URLs at a local server (file path -> URL)."""
    ds = datasets.REGISTRY[name]
    files = tuple(dataclasses.replace(f, url=urls.get(f.path, f.url)) for f in ds.files)
    monkeypatch.setitem(datasets.REGISTRY, name, dataclasses.replace(ds, files=files))


# ----------------------------------------------------------------------------------------------
# The registry is true to shared/data (and so to MANIFEST.md)


def test_registry_matches_shared_data(shared_data):
    seen = set()
    for ds in datasets.REGISTRY.values():
        assert ds.description and ds.license and ds.files, ds.name
        for f in ds.files:
            assert f.path not in seen, f"{f.path} listed twice"
            seen.add(f.path)
            p = shared_data / f.path
            assert p.is_file(), f"{ds.name}: {f.path} not in {shared_data}"
            data = p.read_bytes()
            assert sha16(data) == f.sha256, f"{ds.name}: {f.path} sha256 {sha16(data)} != registry {f.sha256}"
            assert len(data) == f.size, f.path
            assert datasets.verify(p, f)[0]
            assert f.transform in ("", "gzip", "drop_first_line"), f.path
            if f.transform == "gzip":
                assert f.path.endswith(".gz") and not f.url.endswith(".gz"), f.path
                assert sha16(gzip.decompress(data)) == f.content_sha256, f.path
            else:
                assert not f.content_sha256, f.path
            if f.url is not None:
                assert f.url.startswith("https://"), f.url
    # every data file of the shared folder has a registry entry
    on_disk = {p.relative_to(shared_data).as_posix() for p in shared_data.rglob("*") if p.is_file()}
    on_disk -= {"README.md", "MANIFEST.md"}
    assert on_disk - seen == set(), "files in shared/data missing from the registry"


def test_required_datasets_present():
    for name in ("gsm8k", "math500", "svamp", "tinyshakespeare", "c4_demo", "wiki_demo", "oasst", "identity",
                 "self_instruct", "toolcall", "hh_rlhf", "gpt2-tokenizer", "arc", "hellaswag", "piqa",
                 "winogrande", "openbookqa", "copa", "lambada", "boolq", "humaneval", "mmlu", "dolma",
                 "whirlwind", "blocklists"):
        assert name in datasets.REGISTRY, name
    assert len(datasets.REGISTRY["oasst"].files) == 3
    assert len(datasets.REGISTRY["mmlu"].files) == 57 * 3 + 1


# ----------------------------------------------------------------------------------------------
# Downloads through the CLI


def test_download_from_mirror_then_already_present(shared_data, serve, tmp_path, capsys):
    server = serve(shared_data)
    target = tmp_path / "data"
    names = ["gsm8k", "gpt2-tokenizer", "tinyshakespeare"]
    paths = [f.path for n in names for f in datasets.REGISTRY[n].files]
    argv = ["data", "download", *names, "--data_dir", str(target), "--mirror", server.url]

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert per_file(out, "downloaded") == len(paths) and out.count("sha256 ok") == len(paths), out
    for rel in paths:
        assert (target / rel).read_bytes() == (shared_data / rel).read_bytes(), rel
    assert sorted(server.requests) == sorted("/" + p for p in paths)
    assert leftovers(target) == []

    # second run: verified as present, nothing fetched
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert per_file(out, "already present") == len(paths), out
    assert len(server.requests) == len(paths)

    # --force fetches again
    assert main(argv + ["--force"]) == 0
    assert len(server.requests) == 2 * len(paths)

    # `data list --data_dir` sees them
    assert main(["data", "list", "--data_dir", str(target)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert " yes " in rows["gsm8k"] and " yes " in rows["gpt2-tokenizer"]
    assert " missing " in rows["mmlu"] and "MIT" in rows["mmlu"]


def test_mirror_can_be_a_local_folder(shared_data, tmp_path):
    assert main(["data", "download", "svamp", "--data_dir", str(tmp_path), "--mirror", str(shared_data)]) == 0
    rel = "math/svamp/SVAMP.json"
    assert (tmp_path / rel).read_bytes() == (shared_data / rel).read_bytes()


def test_corrupted_download_is_rejected_and_not_kept(shared_data, serve, tmp_path, capsys):
    rel = "math/svamp/SVAMP.json"
    bad = bytearray((shared_data / rel).read_bytes())
    bad[100] ^= 1
    mirror = tmp_path / "mirror"
    (mirror / rel).parent.mkdir(parents=True)
    (mirror / rel).write_bytes(bytes(bad))
    server = serve(mirror)
    target = tmp_path / "data"

    assert main(["data", "download", "svamp", "--data_dir", str(target), "--mirror", server.url]) == 2
    err = capsys.readouterr().err
    assert "'svamp'" in err and rel in err and "expected sha256 5be77703a6d891ae" in err, err
    assert f"got {sha16(bytes(bad))}" in err and "not kept" in err, err
    assert "Traceback" not in err
    assert not (target / rel).exists()
    assert leftovers(target) == []


def test_present_file_with_wrong_checksum_is_replaced(shared_data, serve, tmp_path, capsys):
    rel = "math/svamp/SVAMP.json"
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text("stale")
    server = serve(shared_data)
    assert main(["data", "download", "svamp", "--data_dir", str(tmp_path), "--mirror", server.url]) == 0
    assert "checksum differs" in capsys.readouterr().out
    assert (tmp_path / rel).read_bytes() == (shared_data / rel).read_bytes()


def test_origin_download_applies_transforms(shared_data, serve, monkeypatch, tmp_path, capsys):
    """Without --mirror files come from their origins in upstream form; the local server stands in for
    GitHub and OpenAI, holding the upstream bytes (plain input.txt, vocab.bpe with its version line)."""
    origin = tmp_path / "origin"
    origin.mkdir()
    shakespeare = gzip.decompress((shared_data / "text/tinyshakespeare.txt.gz").read_bytes())
    (origin / "input.txt").write_bytes(shakespeare)
    merges = (shared_data / "tokenizers/gpt2/merges.txt").read_bytes()
    (origin / "vocab.bpe").write_bytes(b"#version: 0.2\n" + merges)
    (origin / "encoder.json").write_bytes((shared_data / "tokenizers/gpt2/vocab.json").read_bytes())
    server = serve(origin)
    replace_urls(monkeypatch, "tinyshakespeare", {"text/tinyshakespeare.txt.gz": server.url + "input.txt"})
    replace_urls(monkeypatch, "gpt2-tokenizer", {"tokenizers/gpt2/merges.txt": server.url + "vocab.bpe",
                                                 "tokenizers/gpt2/vocab.json": server.url + "encoder.json"})
    target = tmp_path / "data"
    argv = ["data", "download", "tinyshakespeare", "gpt2-tokenizer", "--data_dir", str(target)]

    assert main(argv) == 0, capsys.readouterr().err
    # tiktoken's pin of the original vocab.bpe: the stand-in really is the upstream file
    assert hashlib.sha256((origin / "vocab.bpe").read_bytes()).hexdigest().startswith("1ce1664773c50f3e")
    assert (target / "tokenizers/gpt2/merges.txt").read_bytes() == merges
    assert (target / "tokenizers/gpt2/vocab.json").read_bytes() == (origin / "encoder.json").read_bytes()
    # gzip output of Python's zlib differs from GNU gzip's; the content is what is verified
    assert gzip.decompress((target / "text/tinyshakespeare.txt.gz").read_bytes()) == shakespeare
    capsys.readouterr()
    assert main(argv) == 0
    assert per_file(capsys.readouterr().out, "already present") == 3
    assert len(server.requests) == 3


def test_offline_mirror_gives_one_clear_error(tmp_path, capsys):
    url = closed_port_url()
    assert main(["data", "download", "gsm8k", "--data_dir", str(tmp_path), "--mirror", url]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for part in ("'gsm8k'", "math/gsm8k/train.jsonl", url + "math/gsm8k/train.jsonl", "offline",
                 str(tmp_path / "math/gsm8k/train.jsonl"), "CHATFORGE_DATA_DIR", "--mirror URL"):
        assert part in err, (part, err)
    assert leftovers(tmp_path) == []


def test_offline_origin_gives_one_clear_error(monkeypatch, tmp_path, capsys):
    url = closed_port_url() + "SVAMP.json"
    replace_urls(monkeypatch, "svamp", {"math/svamp/SVAMP.json": url})
    assert main(["data", "download", "svamp", "--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'svamp'" in err and url in err and "offline" in err, err
    assert "refused" in err.lower(), err  # the underlying reason is shown


def test_http_error_names_the_status(serve, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    server = serve(empty)
    assert main(["data", "download", "copa", "--data_dir", str(tmp_path / "d"), "--mirror", server.url]) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "eval/copa/copa.jsonl" in err and "'copa'" in err, err


def test_unknown_name_lists_known_ones(tmp_path, capsys):
    assert main(["data", "download", "gms8k", "--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'gms8k'" in err and "Did you mean 'gsm8k'" in err and "mmlu" in err, err


def test_dataset_without_public_origin_needs_a_mirror(tmp_path, capsys):
    assert main(["data", "download", "python_docs", "--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no public download" in err and "--mirror" in err and "web/python-docs.warc.gz" in err, err
