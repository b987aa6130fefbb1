"""The data stage and damaged, unreadable or empty input files: each is named on the console and
counted in stats.json; a run where no input could be read fails with one message instead of writing
DONE; a resume after a SIGKILL removes the temp files the killed run left."""

from __future__ import annotations

import gzip
import json
import re
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastwarc")

import pyarrow.parquet as pq  # noqa: E402

from chatforge.cli import main  # noqa: E402
from chatforge.config import DataConfig, resolve_config  # noqa: E402
from chatforge.stages import data as data_stage  # noqa: E402

A, B = "dolma-sample-0000.warc.gz", "dolma-sample-0001.warc.gz"
JUNK = bytes(range(32, 127)) * 5  # 475 bytes, starts with a space (not CR/LF)


def members(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(31)
        d.decompress(data[pos:])
        end = len(data) - len(d.unused_data)
        out.append(data[pos:end])
        pos = end
    return out


def kept_ids(run_dir: Path) -> list[str]:
    shards = sorted((run_dir / "shards").glob("*.parquet"))
    return [i for f in shards for i in pq.read_table(f).column("id").to_pylist()]


def args(inputs: list[Path], runs: Path, run: str, data_dir: Path) -> list[str]:
    return ["data", "process", "--inputs", ",".join(map(str, inputs)), "--runs_dir", str(runs), "--run", run,
            "--workers", "1", "--data_dir", str(data_dir), "--languages", "", "--lang_threshold", "0"]


def test_damaged_inputs_are_named_counted_and_read_around(tmp_path, shared_data, capsys):
    web = shared_data / "web"
    a = members((web / A).read_bytes())
    b = members((web / B).read_bytes())
    # B's first kept-looking response gets a Content-Length 700 bytes too large
    i = next(k for k, m in enumerate(b) if b"WARC-Type: response" in gzip.decompress(m)[:3000])
    rec = gzip.decompress(b[i])
    lying_id = re.search(rb"WARC-Record-ID: <([^>]+)>", rec).group(1).decode()
    n = re.search(rb"\r\nContent-Length: (\d+)", rec)
    rec = rec[:n.start(1)] + str(int(n.group(1)) + 700).encode() + rec[n.end(1):]
    d = tmp_path / "in"
    d.mkdir()
    (d / A).write_bytes(b"".join(m + (JUNK if k in (3, 20) else b"") for k, m in enumerate(a)))
    (d / B).write_bytes(b"".join(b[:i]) + gzip.compress(rec) + b"".join(b[i + 1:]))
    (d / "empty.warc.gz").write_bytes(b"")
    (d / "junk.warc.gz").write_bytes(JUNK * 10)
    runs = tmp_path / "runs"
    assert main(args([web / A, web / B], runs, "clean", shared_data)) == 0
    capsys.readouterr()
    assert main(args([d / A, d / B, d / "empty.warc.gz", d / "junk.warc.gz"], runs, "hostile", shared_data)) == 0
    out = capsys.readouterr().out
    assert f"{d / A}: damaged, read around: 950 bytes of junk skipped at 2 place(s); 48 record(s) read" in out
    assert f"{d / B}: damaged, read around: 1 record(s) with a wrong Content-Length lost; 33 record(s) read" in out
    assert f"{d / 'empty.warc.gz'}: empty file" in out and f"{d / 'junk.warc.gz'}: unreadable" in out
    assert "bad_content_length 1" in out  # the funnel's read row
    hostile = runs / "hostile/data"
    stats = json.loads((hostile / "stats.json").read_text())
    fe = stats["file_errors"]
    assert (fe["malformed_file"], fe["empty_file"], fe["unreadable_file"]) == (2, 1, 1)
    assert (fe["resynced_bytes"], fe["resyncs"], fe["damaged:bad_content_length"]) == (950, 2, 1)
    assert stats["steps"]["read"]["dropped"]["bad_content_length"] == 1 and len(stats["input_problems"]) == 4
    assert stats["records"] == 48 + 34
    # every record but the lying one came out, and the documents kept are the clean run's, minus it
    clean = kept_ids(runs / "clean/data")
    assert f"<{lying_id}>" in clean or lying_id in clean
    assert sorted(kept_ids(hostile)) == sorted(x for x in clean if lying_id not in x)
    assert main(["data", "inspect", str(runs / "hostile"), "-k", "1"]) == 0
    assert f"{d / 'junk.warc.gz'}: unreadable" in capsys.readouterr().out


def test_no_readable_input_fails_without_done(tmp_path, shared_data, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "empty.warc.gz").write_bytes(b"")
    (d / "junk.warc").write_bytes(JUNK * 3)
    arc = shared_data / "web/warcio-edge-cases/example.arc.gz"
    rc = main(args([d / "empty.warc.gz", d / "junk.warc", arc], tmp_path / "runs", "t", shared_data))
    assert rc == 2
    err = capsys.readouterr().err
    assert "none of the 3 input file(s) holds a readable WARC record" in err
    assert all(str(p) in err for p in (d / "empty.warc.gz", d / "junk.warc", arc))
    assert not (tmp_path / "runs/t/data/DONE").exists() and not (tmp_path / "runs/t/data/stats.json").exists()


def test_resume_after_sigkill_removes_temp_files(tmp_path, shared_data):
    """A SIGKILL skips every cleanup: the task's half-written `.NNNNN.staged.<pid>.tmp` stays. The
    resume removes it, and its output equals an uninterrupted run's."""
    inputs = [str(shared_data / "web" / A), str(shared_data / "web" / B)]
    kw = dict(inputs=inputs, runs_dir=str(tmp_path / "runs"), workers=1, data_dir=str(shared_data), languages=[],
              lang_threshold=0.0)
    code = f"""
import os, signal
from chatforge.config import DataConfig, resolve_config
from chatforge.data import pipeline
from chatforge.stages import data
real, calls = pipeline.TaskRunner.process, [0]
def process(self, page):
    calls[0] += 1
    if calls[0] == 30:  # inside the second file's task, its staged output half written
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, page)
pipeline.TaskRunner.process = process
data.run(resolve_config(DataConfig, overrides={dict(kw, run="t")!r}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    tasks = tmp_path / "runs/t/data/tasks"
    assert list(tasks.glob(".*.staged.*.tmp"))  # what the killed run left
    data_stage.run(resolve_config(DataConfig, overrides=dict(kw, run="t")))
    assert not list(tasks.glob(".*.tmp")) and (tmp_path / "runs/t/data/DONE").exists()
    data_stage.run(resolve_config(DataConfig, overrides=dict(kw, run="clean")))
    assert kept_ids(tmp_path / "runs/t/data") == kept_ids(tmp_path / "runs/clean/data")
