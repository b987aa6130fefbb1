"""`chatforge tokenizer` end to end through the CLI: artifacts, report, completion marker, skip/force,
and bad inputs as one clear error (exit code 2, no traceback)."""

from __future__ import annotations

import json

import pytest

from chatforge.cli import main
from chatforge.common import DONE
from chatforge.tokenizer import Tokenizer


def run_cli(*argv):
    return main(["tokenizer", *map(str, argv)])


@pytest.fixture
def corpus(shared_data):
    return [str(shared_data / "text/wiki_demo.txt"), str(shared_data / "math/gsm8k/train.jsonl")]


def test_tokenizer_stage_end_to_end(tmp_path, corpus, shared_data, capsys):
    rc = run_cli("--run", "t", "--runs_dir", tmp_path, "--data_dir", shared_data, "--vocab_size", 1024,
                 "--corpus", ",".join(corpus), "--report_chars", 50_000)
    assert rc == 0
    d = tmp_path / "t" / "tokenizer"
    for name in ("tokenizer.tiktoken", "chatforge_tokenizer.json", "hf/tokenizer.json",
                 "hf/tokenizer_config.json", "report.json", "report.md", "config.json", "meta.json",
                 "metrics.jsonl", DONE):
        assert (d / name).exists(), name
    # DONE is the last file written
    newest = max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == DONE
    tok = Tokenizer.load(d)
    assert tok.vocab_size == 1024
    report = json.loads((d / "report.json").read_text())
    assert set(report["held_out"]) == {"web", "math", "chat", "code"}
    for row in report["held_out"].values():
        # a 1k vocab compresses worse than GPT-2's 50k, but far better than raw bytes
        assert 1.2 < row["chatforge"]["bytes_per_token"] < row["gpt2"]["bytes_per_token"]
    out = capsys.readouterr().out
    assert "| web |" in out and "gpt2 (vocab 50257)" in out

    # a rerun skips the complete stage; --force trains again
    done_before = (d / DONE).read_text()
    metrics_before = (d / "metrics.jsonl").read_text()
    assert run_cli("--run", "t", "--runs_dir", tmp_path, "--corpus", ",".join(corpus)) == 0
    assert "complete, skipping" in capsys.readouterr().out
    assert (d / "metrics.jsonl").read_text() == metrics_before and (d / DONE).read_text() == done_before
    assert run_cli("--run", "t", "--runs_dir", tmp_path, "--data_dir", shared_data, "--vocab_size", 512,
                   "--corpus", corpus[1], "--force", "--report_chars", 10_000) == 0
    assert Tokenizer.load(d).vocab_size == 512


def test_report_never_measures_training_text(tmp_path, shared_data, capsys):
    gsm8k_test = str(shared_data / "math/gsm8k/test.jsonl")  # the report's "math" text
    assert run_cli("--run", "h", "--runs_dir", tmp_path, "--data_dir", shared_data, "--vocab_size", 400,
                   "--corpus", gsm8k_test, "--report_chars", 5000) == 0
    report = json.loads((tmp_path / "h" / "tokenizer" / "report.json").read_text())
    assert "math" not in report["held_out"] and "web" in report["held_out"]
    assert "is in the training corpus" in capsys.readouterr().out


def test_doc_and_total_char_caps(tmp_path, corpus, shared_data):
    assert run_cli("--run", "c", "--runs_dir", tmp_path, "--data_dir", shared_data, "--vocab_size", 300,
                   "--corpus", corpus[1], "--max_chars", 100_000, "--doc_chars", 50,
                   "--report_chars", 5000) == 0
    stats = json.loads((tmp_path / "c" / "tokenizer" / "report.json").read_text())["corpus"]
    assert 100_000 <= stats["chars"] < 100_000 + 50
    assert stats["truncated"] == stats["documents"]  # every GSM8K record is longer than 50 chars


@pytest.mark.parametrize("case", ["missing", "empty", "non_utf8", "vocab_too_small", "no_corpus"])
def test_bad_input_is_one_clear_error(tmp_path, case, capsys):
    args = ["--run", "bad", "--runs_dir", tmp_path / "runs", "--vocab_size", 1000]
    if case == "missing":
        args += ["--corpus", tmp_path / "nowhere.txt"]
        expect = "nowhere.txt' not found"
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("\n\n")
        args += ["--corpus", tmp_path / "empty.jsonl"]
        expect = "holds no documents"
    elif case == "non_utf8":
        (tmp_path / "latin1.txt").write_bytes(b"na\xefve caf\xe9\n" * 100)
        args += ["--corpus", tmp_path / "latin1.txt"]
        expect = "latin1.txt' is not valid UTF-8"
    elif case == "vocab_too_small":
        (tmp_path / "ok.txt").write_text("hello world\n" * 100)
        args += ["--corpus", tmp_path / "ok.txt", "--vocab_size", 100]
        expect = "--vocab_size 100 is too small"
    else:
        expect = "no corpus"
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "bad" / "tokenizer" / DONE).exists()


def test_corpus_file_name_with_glob_characters(tmp_path, shared_data):
    """The corpus is expanded once: `[` in a file name is that file, not a glob matching another one."""
    odd = tmp_path / "corpus [v1].txt"
    odd.write_text("the cat sat on the mat.\n\n" * 200)
    (tmp_path / "corpus 1.txt").write_text("decoy " * 5000)  # what `corpus [v1].txt` matches as a glob
    assert run_cli("--run", "g", "--runs_dir", tmp_path, "--data_dir", shared_data, "--vocab_size", 280,
                   "--corpus", odd, "--report_chars", 2000) == 0
    corpus = json.loads((tmp_path / "g" / "tokenizer" / "report.json").read_text())["corpus"]
    assert corpus["files"] == 1 and corpus["documents"] == 200 and corpus["chars"] == 200 * len("the cat sat on the mat.")
