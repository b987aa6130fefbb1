"""`chatforge data process` / `inspect` end to end: funnel consistency, resume, interruption, executors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastwarc")

import pyarrow.parquet as pq  # noqa: E402

from chatforge.cli import main  # noqa: E402
from chatforge.config import DataConfig, resolve_config  # noqa: E402
from chatforge.stages import data as data_stage  # noqa: E402
from tests.test_data_warc import make_nasty_warc  # noqa: E402


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> Path:
    """Real crawl samples, every edge-case file, a truncated copy and a file of nasty records."""
    d = tmp_path_factory.mktemp("warcs")
    for f in ["dolma-sample-0000.warc.gz", "dolma-sample-0001.warc.gz", "whirlwind.warc.gz", "whirlwind.warc.wet.gz"]:
        shutil.copy(shared_data / "web" / f, d / f)
    for f in (shared_data / "web/warcio-edge-cases").iterdir():
        shutil.copy(f, d / f"edge-{f.name}")
    (d / "trunc-git.warc.gz").write_bytes((shared_data / "web/git-docs.warc.gz").read_bytes()[:400_000])
    make_nasty_warc(d / "nasty.warc.gz")
    SHARED["data_dir"] = str(shared_data)
    return d


SHARED: dict[str, str] = {}


def _cfg(tmp_path, folder, **kw) -> DataConfig:
    base = dict(inputs=[str(folder / "*")], runs_dir=str(tmp_path / "runs"), run="t", workers=1,
                data_dir=SHARED["data_dir"],
                languages=[], lang_threshold=0.0, sample_dropped=3, shard_docs=20)
    base.update(kw)
    return resolve_config(DataConfig, overrides=base)


def _ids(run_dir: Path) -> list[str]:
    return [i for f in sorted((run_dir / "shards").glob("*.parquet")) for i in pq.read_table(f).column("id").to_pylist()]


def check_funnel(stats: dict) -> None:
    prev_out = None
    for name, st in stats["steps"].items():
        assert st["in"] == st["out"] + sum(st["dropped"].values()), name
        if st["in"] or name == "read":
            if prev_out is not None:
                assert st["in"] == prev_out, name
            prev_out = st["out"]
    assert stats["docs_out"] == prev_out


def test_process_and_inspect_cli(tmp_path, inputs, capsys):
    rc = main(["data", "process", "--inputs", str(inputs / "*"), "--runs_dir", str(tmp_path / "runs"),
               "--run", "cli", "--workers", "2", "--data_dir", SHARED["data_dir"], "--languages", "", "--lang_threshold", "0", "--shard_docs", "20"])
    assert rc == 0
    d = tmp_path / "runs/cli/data"
    assert (d / "DONE").exists()
    stats = json.loads((d / "stats.json").read_text())
    check_funnel(stats)
    ids = _ids(d)
    assert len(ids) == len(set(ids)) == stats["docs_out"] > 10
    read = stats["steps"]["read"]["dropped"]
    assert read["too_large"] == 1 and read["non_html"] >= 1 and read["empty"] >= 1
    assert stats["steps"]["extract"]["dropped"].get("too_deep") == 1
    assert stats["file_errors"]["unreadable_file"] == 4 and stats["file_errors"]["malformed_file"] >= 1
    table = pq.read_table(sorted((d / "shards").glob("*.parquet"))[0])
    assert table.schema.names == ["id", "url", "date", "text", "lang", "lang_score", "pii_emails", "pii_ips",
                                  "pii_phones", "source"]
    assert max(pq.read_metadata(f).num_rows for f in (d / "shards").glob("*.parquet")) <= 20
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "runs/cli"), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "| read |" in out and "random kept documents" in out and "random dropped documents" in out
    assert main(["data", "inspect", str(tmp_path / "nowhere")]) == 2
    assert main(["data", "process", "--inputs", "no/such/file.warc.gz", "--runs_dir", str(tmp_path)]) == 2
    assert "matches no file" in capsys.readouterr().err


def test_resume_skips_complete_tasks_no_duplicates(tmp_path, inputs):
    cfg = _cfg(tmp_path, inputs)
    data_stage.run(cfg)
    d = tmp_path / "runs/t/data"
    first = _ids(d)
    # rerun: complete, nothing to do
    data_stage.run(cfg)
    assert _ids(d) == first
    # lose the stage marker and two task markers (a crash): only those two tasks run again
    (d / "DONE").unlink()
    for m in sorted((d / "tasks").glob("*.json"))[:2]:
        m.unlink()
    before = (d / "metrics.jsonl").read_text().count('"event": "task"')
    data_stage.run(cfg)
    after = (d / "metrics.jsonl").read_text().count('"event": "task"')
    assert after - before == 2
    assert _ids(d) == first and len(first) == len(set(first))


def test_interrupt_leaves_no_complete_looking_output(tmp_path, inputs, monkeypatch):
    from chatforge.data import pipeline

    cfg = _cfg(tmp_path, inputs)
    real = pipeline.TaskRunner.process
    calls = {"n": 0}

    def flaky(self, page):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a task
        return real(self, page)

    monkeypatch.setattr(pipeline.TaskRunner, "process", flaky)
    with pytest.raises(KeyboardInterrupt):
        data_stage.run(cfg)
    d = tmp_path / "runs/t/data"
    assert not (d / "DONE").exists() and not list((d / "shards").glob("*.parquet"))
    markers = list((d / "tasks").glob("*.json"))
    staged = list((d / "tasks").glob("*.staged"))
    assert len(staged) == len(markers)  # the interrupted task left neither, only finished ones are marked
    assert not list((d / "tasks").glob(".*.tmp"))
    monkeypatch.setattr(pipeline.TaskRunner, "process", real)
    data_stage.run(cfg)
    clean = _cfg(tmp_path, inputs, run="clean")
    data_stage.run(clean)
    assert _ids(d) == _ids(tmp_path / "runs/clean/data")


def test_changed_settings_redo_tasks(tmp_path, inputs):
    cfg = _cfg(tmp_path, inputs, inputs=[str(inputs / "dolma-*")])
    data_stage.run(cfg)
    cfg2 = _cfg(tmp_path, inputs, inputs=[str(inputs / "dolma-*")], min_doc_words=10**7, force=False)
    (tmp_path / "runs/t/data/DONE").unlink()
    data_stage.run(cfg2)
    stats = json.loads((tmp_path / "runs/t/data/stats.json").read_text())
    assert stats["docs_out"] == 0  # the new threshold was applied, old task outputs not reused


def test_turning_dedup_on_redoes_tasks(tmp_path, inputs):
    """Tasks staged with dedup off carry no hashes; a rerun with dedup on must not reuse them (it used
    to crash on empty band keys, or drop every document as an exact duplicate of hash 0)."""
    off = _cfg(tmp_path, inputs, inputs=[str(inputs / "dolma-*")], dedup_exact=False, dedup_minhash=False)
    data_stage.run(off)
    kept_without_dedup = json.loads((tmp_path / "runs/t/data/stats.json").read_text())["docs_out"]
    (tmp_path / "runs/t/data/DONE").unlink()
    data_stage.run(_cfg(tmp_path, inputs, inputs=[str(inputs / "dolma-*")], force=False))
    stats = json.loads((tmp_path / "runs/t/data/stats.json").read_text())
    assert 0 < stats["docs_out"] <= kept_without_dedup
    assert stats["docs_out"] > kept_without_dedup // 2  # not everything dropped as "exact"


def test_stage_data_corpus_entry(tmp_path, inputs):
    from chatforge.common import ChatforgeError
    from chatforge.corpus import expand_corpus, iter_documents

    cfg = _cfg(tmp_path, inputs, inputs=[str(inputs / "dolma-*"), str(inputs / "whirlwind.warc.gz")])
    with pytest.raises(ChatforgeError, match="not complete"):
        expand_corpus(["stage:data"], "", cfg)
    data_stage.run(cfg)
    files = expand_corpus(["stage:data"], "", cfg)
    assert files and all(f.parent.name == "shards" for f in files)
    docs = list(iter_documents(["stage:data"], run=cfg))
    assert len(docs) == json.loads((tmp_path / "runs/t/data/stats.json").read_text())["docs_out"]


@pytest.mark.slow
def test_tiny_preset_funnel(tmp_path, shared_data):
    cfg = resolve_config(DataConfig, preset="tiny", overrides={"runs_dir": str(tmp_path), "workers": 2,
                                                               "data_dir": str(shared_data)})
    summary = data_stage.run(cfg)
    stats = json.loads((tmp_path / "tiny/data/stats.json").read_text())
    check_funnel(stats)
    assert stats["docs_in"] > 2500 and 200 < summary["docs_out"] < 1500
    assert stats["steps"]["lang"]["dropped"]["other_language"] > 200  # the handbook's translations
    assert stats["steps"]["dedup"]["dropped"]  # the doc sets overlap (handbook pages, identical footers)


@pytest.mark.slow
def test_ray_executor_local_instance(tmp_path, inputs):
    pytest.importorskip("ray")
    cfg = _cfg(tmp_path, inputs, executor="ray", workers=2,
               inputs=[str(inputs / "dolma-*"), str(inputs / "whirlwind.warc.gz"), str(inputs / "nasty.warc.gz")])
    data_stage.run(cfg)
    local = _cfg(tmp_path, inputs, run="local", workers=2, inputs=cfg.inputs)
    data_stage.run(local)
    assert _ids(tmp_path / "runs/t/data") == _ids(tmp_path / "runs/local/data")


def test_word_counts_follow_each_step_that_rewrites_text(tmp_path):
    """C4 drops lines and PII masking can merge words ("(415) 555-2671" -> "555-0100"): each step's
    words_out counts the text that leaves it, and the next step's words_in equals it."""
    from chatforge.data import pipeline
    from chatforge.data.warc import Page

    cfg = resolve_config(DataConfig, overrides={"runs_dir": str(tmp_path), "url_filter": False, "languages": [],
                                                "lang_threshold": 0.0, "gopher_repetition": False,
                                                "gopher_quality": False, "fineweb": False, "pii": ["phones"]})
    runner = pipeline.TaskRunner(cfg, "")
    prose = [f"Line {i} of the story goes on for a while here. It has two sentences." for i in range(6)]
    text = "\n".join(prose + ["Menu", "Call us at (415) 555-2671 or +44 20 7946 0958 today, please."])
    doc = runner.process(Page(id="x", url="https://example.org/", date="", text=text))
    steps = runner.stats["steps"]
    assert doc is not None and "555-0100" in doc.text and "Menu" not in doc.text
    assert steps["extract"]["words_out"] == len(text.split())
    assert steps["c4"]["words_out"] == len(text.split()) - 1            # the one-word line "Menu" is gone
    assert steps["pii"]["words_in"] == steps["c4"]["words_out"]
    assert steps["pii"]["words_out"] == len(doc.text.split()) == steps["c4"]["words_out"] - 4


def test_a_filter_that_raises_fails_the_run_naming_it(tmp_path, inputs, monkeypatch):
    """A bug in a filter must not turn into a silent `error:X` drop of every document: past a small
    threshold the run stops with one error naming the step, the filter and the first exception. A rare
    error (one document) is still counted and skipped."""
    from chatforge.common import ChatforgeError
    from chatforge.data import filters

    real = filters.FineWebQualityFilter.filter

    def broken(self, doc):
        return 1 / 0

    monkeypatch.setattr(filters.FineWebQualityFilter, "filter", broken)
    cfg = _cfg(tmp_path, inputs, inputs=[str(inputs / "dolma-*")])
    with pytest.raises(ChatforgeError, match=r"step 'fineweb' \(FineWebQualityFilter\) raised on 11 of the 11 "
                                             r"documents.*ZeroDivisionError: division by zero at test_data_stage"):
        data_stage.run(cfg)
    assert not (tmp_path / "runs/t/data/DONE").exists()
    assert main(["data", "process", "--runs_dir", str(tmp_path / "runs"), "--run", "cli", "--inputs",
                 str(inputs / "dolma-*"), "--workers", "1", "--languages", "", "--lang_threshold", "0"]) == 2

    seen = {"n": 0}

    def rarely_broken(self, doc):
        seen["n"] += 1
        if seen["n"] == 3:
            raise ValueError("one odd page")
        return real(self, doc)

    monkeypatch.setattr(filters.FineWebQualityFilter, "filter", rarely_broken)
    data_stage.run(_cfg(tmp_path, inputs, inputs=[str(inputs / "dolma-*")], force=True))
    stats = json.loads((tmp_path / "runs/t/data/stats.json").read_text())
    assert stats["steps"]["fineweb"]["dropped"]["error:ValueError"] == 1
    check_funnel(stats)


def test_another_extractor_version_redoes_tasks(tmp_path, inputs, monkeypatch):
    """A task made with one extractor version is not reused under another (trafilatura 1.x and 2.x give
    different text): the version is part of the settings fingerprint, and stats.json records it."""
    from chatforge.data import extract

    cfg = _cfg(tmp_path, inputs, inputs=[str(inputs / "whirlwind.warc.gz")])
    data_stage.run(cfg)
    d = tmp_path / "runs/t/data"
    before = json.loads((d / "tasks/00000.json").read_text())["fingerprint"]
    assert json.loads((d / "stats.json").read_text())["extractor_version"] == extract.extractor_version("resiliparse")
    (d / "DONE").unlink()
    monkeypatch.setattr(extract, "extractor_version", lambda name: "0.0.1")
    data_stage.run(_cfg(tmp_path, inputs, inputs=cfg.inputs, force=False))
    assert json.loads((d / "tasks/00000.json").read_text())["fingerprint"] != before
    assert json.loads((d / "stats.json").read_text())["extractor_version"] == "0.0.1"
