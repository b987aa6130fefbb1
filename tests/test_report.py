"""The report card (chatforge/report.py, `chatforge report RUN`): every section from a run's artifacts,
"not run yet" for stages without them, GPU cost estimates, plots as real PNG files, Markdown that
lines up in a terminal and a self-contained HTML page, and bad eval files / runs as clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from chatforge import evaluate as E
from chatforge.cli import main
from chatforge.common import ChatforgeError, write_json
from chatforge.report import GpuSetup, render_html, render_markdown, Table, Para, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval(label: str, stage: str, tasks: dict, complete: bool = True, limit: int = 0) -> dict:
    return {"format": E.EVAL_FORMAT, "checkpoint": f"runs/r/{stage}/checkpoint", "label": label,
            "id": {"step": 1, "stage": stage}, "chat": stage != "pretrain", "settings": {"limit": limit},
            "tasks": tasks, "core": E.core_summary(tasks), "complete": complete}


def ok(**kw) -> dict:
    return {"status": "ok", **kw}


@pytest.fixture
def run(tmp_path) -> Path:
    """A run with data, tokenizer and pretrain artifacts (the formats those stages write), an
    evaluated base and SFT checkpoint, and nothing for RL / RLHF."""
    root = tmp_path / "runs" / "r"
    meta = {"git_revision": "abc123", "versions": {"torch": "2.13.0"}, "host": "box", "started": "2026-01-01T00:00:00"}
    for stage in ("data", "tokenizer", "pretrain", "sft"):
        write_json(root / stage / "meta.json", {**meta, "stage": stage})
    write_json(root / "data" / "stats.json", {
        "files": 2, "docs_in": 100, "docs_out": 40, "pii": {"emails": 3},
        "steps": {"read": {"in": 100, "out": 90, "dropped": {"non_html": 10}},
                  "lang": {"in": 90, "out": 40, "dropped": {"other_language": 45, "low_score": 5}}}})
    write_json(root / "data" / "DONE", {"stage": "data", "seconds": 12.0, "docs_in": 100, "docs_out": 40})
    write_json(root / "tokenizer" / "report.json", {"vocab_size": 4096, "held_out": {
        "web": {"file": "text/c4_demo.jsonl", "bytes": 2000, "chatforge": {"tokens": 600, "bytes_per_token": 3.333},
                "gpt2": {"tokens": 500, "bytes_per_token": 4.0}}}})
    write_json(root / "tokenizer" / "DONE", {"stage": "tokenizer", "seconds": 1.5, "chars": 1000, "vocab_size": 4096})
    lines = [{"event": "baseline", "unigram_bpb": 3.05}]
    lines += [{"step": s, "loss": 8.0 - s / 10, "smooth_loss": 8.1 - s / 10} for s in range(1, 21)]
    lines += [{"event": "eval", "step": s, "val_bpb": 2.5 - s / 100} for s in (10, 20)]
    (root / "pretrain").mkdir(parents=True, exist_ok=True)
    (root / "pretrain" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{\"step\": 21, \"lo")
    # 1.8e18 FLOPs: one hour on one GPU of 1e15 FLOP/s at 50% MFU.
    write_json(root / "pretrain" / "DONE", {"stage": "pretrain", "seconds": 400.0, "tokens": 1_800_000_000,
                                            "flops_per_token": 1e9, "step": 20, "device": "cpu"})
    (root / "sft" / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 2.0 / s}) for s in range(1, 6)))
    (root / "pretrain" / "checkpoint").mkdir()
    (root / "pretrain" / "checkpoint" / "config.json").write_text("{}")
    base_tasks = {"bpb": ok(bpb=1.6927, unigram_bpb=3.0535), "arc_easy": ok(accuracy=0.3, centered=0.0667),
                  "hellaswag": {"status": "missing", "reason": "eval/hellaswag/x not found"}}
    sft_tasks = {"bpb": ok(bpb=1.75), "arc_easy": ok(accuracy=0.31, centered=0.08), "gsm8k": ok(accuracy=0.125),
                 "probe_spelling": ok(accuracy=0.2), "probe_spelling_tools": ok(accuracy=0.6),
                 "probe_identity": ok(accuracy=0.5), "probe_reverse": {"status": "missing", "reason": "x"},
                 "probe_fictional": ok(accuracy=0.9, refusal_rate=0.9, groups={"heldout": {"accuracy": 0.75}}),
                 "probe_known_facts": ok(accuracy=0.1, refusal_rate=0.3)}
    write_json(root / "eval" / "base" / "eval.json", _eval("base", "pretrain", base_tasks, limit=100))
    write_json(root / "eval" / "sft" / "eval.json", _eval("sft", "sft", sft_tasks))
    return root


def setups():
    return [GpuSetup("1 x G", 1, 1e15, 2.0), GpuSetup("8 x G", 8, 1e15, 2.0)]


def table_rows(md: str, first_cell: str) -> list[str]:
    return [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith(f"| {first_cell} ")).split("|")[1:-1]]


def test_report_sections(run):
    paths = write_report(run, gpu_setups=setups(), mfu=0.5)
    md = paths["md"].read_text()
    # header: revision, per-stage rows, "not run yet", the cost estimate (1 h on 1 GPU = $2, 7.5 min on 8)
    assert "`abc123`" in md and "torch 2.13.0" in md
    assert table_rows(md, "pretrain")[:4] == ["pretrain", "done", "6.7 min", "1,800,000,000 tokens, 20 steps"]
    assert table_rows(md, "pretrain")[4:] == ["1.00 h, $2.00", "7.5 min, $2.00"]
    assert table_rows(md, "rl")[1] == "not run yet" and table_rows(md, "sft")[1] == "incomplete"
    # data funnel and tokenizer
    assert table_rows(md, "lang") == ["lang", "90", "40", "50", "other_language 45, low_score 5"]
    assert "100 documents in, 40 kept (40.0%)" in md and "emails 3" in md
    assert table_rows(md, "web") == ["web", "text/c4_demo.jsonl", "2,000", "3.33", "4.00"]
    # curves: pretrain and SFT plotted (a cut-off last metrics line is skipped), RL / RLHF not run
    assert paths["pretrain"].read_bytes()[:8] == PNG_MAGIC and paths["sft"].read_bytes()[:8] == PNG_MAGIC
    assert "![Pretraining curves](pretrain.png)" in md and "**RL**: not run yet." in md and "rl" not in paths
    # metrics by stage
    assert table_rows(md, "metric") == ["metric", "BASE", "SFT", "RL", "RLHF"]
    assert table_rows(md, "val bits/byte") == ["val bits/byte", "1.6927", "1.7500", "-", "-"]
    assert table_rows(md, "CORE (centred, mean)")[1:3] == ["0.0667 (1/9)", "0.0800 (1/9)"]
    assert table_rows(md, "HellaSwag (acc)")[1] == "missing"
    assert table_rows(md, "GSM8K")[1:3] == ["-", "0.125"]
    assert "BASE: 100 examples per task" in md and "RL: not run yet." in md
    assert "hellaswag: eval/hellaswag/x not found" in md
    # probes: without / with tools, a probe that could not run says so; identity and hallucination
    assert table_rows(md, "spelling")[1:3] == ["-", "0.200 / 0.600"]
    assert table_rows(md, "word reversal")[2] == "missing / -"
    assert table_rows(md, "identity (names itself, its maker)")[1:3] == ["-", "0.500"]
    assert table_rows(md, "withheld fictional people (refuses)")[2] == "0.900 (unseen 0.75)"
    assert table_rows(md, "well-known facts (answers)")[2] == "0.100 (refused 0.30)"
    assert table_rows(md, "fictional people in pretraining (answers)")[2] == "-"


def test_stage_results_read_each_stage_summary(run):
    """The stages' own before / after (the RL task, the reward model, DPO) from their summary.json files,
    in the formats rl, rlhf rm and rlhf dpo write; chance is called where the interval includes 50%."""
    write_json(run / "rl" / "summary.json", {
        "task": "arithmetic1",
        "before": {"pass@1": 0.078125, "pass@1_low": 0.034, "pass@1_high": 0.17, "n": 64, "pass@k": 0.17, "k": 4},
        "after": {"pass@1": 0.84375, "pass@1_low": 0.736, "pass@1_high": 0.913, "n": 64, "pass@k": 0.875, "k": 4}})
    write_json(run / "rl" / "DONE", {"stage": "rl", "seconds": 250.0, "steps": 30, "task": "arithmetic1"})
    write_json(run / "rlhf" / "rm" / "summary.json", {"accuracy": {
        "polite": {"accuracy": 1.0, "accuracy_low": 0.963, "accuracy_high": 1.0, "n": 100},
        "hh": {"accuracy": 0.432, "accuracy_low": 0.337, "accuracy_high": 0.532, "n": 95}}})
    write_json(run / "rlhf" / "dpo" / "summary.json", {
        "before": {"hh": {"implicit_accuracy": 0.0, "implicit_accuracy_low": 0.0, "implicit_accuracy_high": 0.039,
                          "margin": 0.0, "n": 95}},
        "after": {"hh": {"implicit_accuracy": 0.6, "implicit_accuracy_low": 0.499, "implicit_accuracy_high": 0.693,
                         "margin": 0.096, "n": 95}}})
    assert "rlhf_grpo" not in write_report(run)  # the optional GRPO action has not run: no panel, no line
    assert "rlhf_ppo" not in write_report(run)  # nor PPO
    lines = [{"step": s, "reward": 0.1 * s, "kl": 0.01 * s} for s in (1, 2)]
    lines += [{"event": "eval", "step": s, "rm_score": 0.5 * s, "judge_score": 1.0 - 0.1 * s} for s in (0, 2)]
    (run / "rlhf" / "grpo").mkdir(parents=True)
    (run / "rlhf" / "grpo" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    paths = write_report(run)
    md = paths["md"].read_text()
    assert paths["rlhf_grpo"].read_bytes()[:8] == PNG_MAGIC and "(rlhf_grpo.png)" in md
    (run / "rlhf" / "ppo").mkdir(parents=True)
    (run / "rlhf" / "ppo" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    paths = write_report(run)
    assert paths["rlhf_ppo"].read_bytes()[:8] == PNG_MAGIC and "(rlhf_ppo.png)" in paths["md"].read_text()
    assert "## What each training stage measured" in md
    assert table_rows(md, "RL")[1:] == ["arithmetic1: held-out pass@1 (greedy)", "7.8% [3.4%, 17.0%] of 64",
                                        "84.4% [73.6%, 91.3%] of 64"]
    rows = [ln for ln in md.splitlines() if ln.startswith("| RLHF ")]
    assert "polite (above chance)" in rows[0] and "100.0% [96.3%, 100.0%] of 100" in rows[0]
    assert "hh (not above chance)" in rows[1] and "43.2% [33.7%, 53.2%] of 95" in rows[1]
    assert "0.0% [0.0%, 3.9%] of 95" in rows[2] and "60.0% [49.9%, 69.3%] of 95" in rows[2]
    assert [c.strip() for c in rows[3].split("|")[2:5]] == ["DPO, held-out hh: implicit reward margin", "0.000", "0.096"]
    assert table_rows(md, "rl")[3] == "30 steps on arithmetic1"


def test_markdown_lines_up_and_html_is_self_contained(run):
    paths = write_report(run, gpu_setups=setups())
    md = paths["md"].read_text()
    table = []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            assert len({len(t) for t in table}) == 1, table  # every row of a table has the same width
            table = []
    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<table>") == md.count("\n|:")
    assert '<img src="pretrain.png"' in page and "http://" not in page and "https://" not in page
    assert "<script" not in page
    blocks = [Para("a <b> & `code`"), Table(["x", "y"], [["<i>", "1"]])]
    assert "a &lt;b&gt; &amp; <code>code</code>" in render_html(blocks, "t")
    assert "<td class=\"l\">&lt;i&gt;</td>" in render_html(blocks, "t")
    assert render_markdown(blocks).splitlines()[2:5] == ["| x   |   y |", "|:----|----:|", "| <i> |   1 |"]


def test_partial_and_broken_eval_files(run):
    write_json(run / "eval" / "sft" / "eval.json", _eval("sft", "sft", {"bpb": ok(bpb=1.8)}, complete=False))
    md = write_report(run)["md"].read_text()
    assert table_rows(md, "metric")[2] == "SFT (partial)" and "SFT: partial eval file (interrupted)" in md
    (run / "eval" / "sft" / "eval.json").write_text('{"format": 1, "tasks": {"bpb": {"st')
    with pytest.raises(ChatforgeError, match=r"eval/sft/eval.json is not valid JSON.*rerun `chatforge eval`"):
        write_report(run)


def test_checkpoint_not_evaluated_and_missing_runs(tmp_path, run):
    import shutil

    shutil.rmtree(run / "eval" / "base")
    md = write_report(run)["md"].read_text()
    assert "BASE: checkpoint present, not evaluated yet (`chatforge eval --run r pretrain`)" in md
    assert main(["report", "nope", "--runs_dir", str(run.parent)]) == 2
    (tmp_path / "runs" / "empty").mkdir()
    assert main(["report", "empty", "--runs_dir", str(run.parent)]) == 2


def test_report_command(run, capsys):
    assert main(["report", "r", "--runs_dir", str(run.parent)]) == 0
    out = capsys.readouterr().out
    assert "## Metrics by stage" in out and "report: wrote" in out
    assert (run / "report" / "report.html").exists() and (run / "report" / "DONE").exists()
    capsys.readouterr()
    assert main(["report", str(run), "--show", "no"]) == 0  # a run folder works too
    out = capsys.readouterr()
    assert "## Metrics" not in out.out and "report: wrote" in out.out
    assert main(["report", "missing-run", "--runs_dir", str(run.parent)]) == 2
    err = capsys.readouterr().err
    assert "run 'missing-run' not found" in err and f"runs in {run.parent}: r" in err


def test_report_of_a_real_evaluation(tmp_path, shared_data):
    """eval.json as evaluate_checkpoint writes it goes into the table unchanged."""
    from chatforge.checkpoint import save_checkpoint
    from chatforge.tokenizer import Tokenizer
    from engine_helpers import corpus, random_model

    tok_dir = tmp_path / "tok"
    Tokenizer.train(corpus(), vocab_size=512).save(tok_dir)
    root = tmp_path / "runs" / "t"
    save_checkpoint(root / "pretrain" / "checkpoint", random_model(512, max_seq_len=128), tokenizer_dir=tok_dir,
                    meta={"stage": "pretrain"})
    res = E.evaluate_checkpoint(root / "pretrain" / "checkpoint", ["copa", "bpb"], root / "eval" / "base" / "eval.json",
                                data_dir=str(shared_data), limit=4, bpb_text=["text/c4_demo.jsonl"], bpb_tokens=512,
                                progress=False, log=lambda s: None)
    md = write_report(root)["md"].read_text()
    assert table_rows(md, "COPA (acc)")[1] == f"{res['tasks']['copa']['accuracy']:.3f}"
    assert table_rows(md, "val bits/byte")[1] == f"{res['tasks']['bpb']['bpb']:.4f}"
    assert table_rows(md, "CORE (centred, mean)")[1] == f"{res['core']['score']:.4f} (1/9)"


def test_speedrun_ends_with_commands_for_the_latest_checkpoint(tmp_path):
    from chatforge.report import latest_checkpoint
    from chatforge.stages.speedrun import next_steps

    root = tmp_path / "runs" / "t"
    assert latest_checkpoint(root) is None and "no checkpoint yet" in next_steps(root)
    for stage in ("pretrain", "sft"):
        (root / stage / "checkpoint").mkdir(parents=True)
        (root / stage / "checkpoint" / "config.json").write_text("{}")
        text = next_steps(root)
        assert latest_checkpoint(root) == root / stage / "checkpoint"
        assert f"chatforge chat {root / stage / 'checkpoint'}" in text
        assert f"chatforge serve {root / stage / 'checkpoint'}" in text
        assert ("base model" in text) == (stage == "pretrain")


def _fake_done(root, stages):
    for s in stages:
        (root / s).mkdir(parents=True, exist_ok=True)
        (root / s / "DONE").write_text("{}")


def test_speedrun_plan_from_only_and_dry_run(tmp_path, capsys):
    """--dry_run lists every stage and whether it runs (complete ones are skipped), with the pretraining
    plan; --from STAGE redoes that stage and every later one, --only STAGE just that one; a stage name
    that is not in the pipeline is one error listing the pipeline."""
    from chatforge.cli import build_parser
    from chatforge.common import ChatforgeError
    from chatforge.config import PIPELINE, SpeedrunConfig
    from chatforge.stages import speedrun

    root = tmp_path / "runs" / "tiny"
    _fake_done(root, ["data", "facts", "tokenizer", "pretrain"])

    def plan(**kw):
        cfg = SpeedrunConfig(preset="tiny", runs_dir=str(tmp_path / "runs"), dry_run=True, **kw)
        assert speedrun.run(cfg) is None  # a dry run trains nothing
        out = capsys.readouterr().out
        return {line.split()[1]: line for line in out.splitlines() if re.match(r"\s+\d+\. ", line)}, out

    stages, out = plan()
    assert list(stages) == PIPELINE
    assert all("complete, skipped" in stages[s] for s in ("data", "facts", "tokenizer", "pretrain"))
    assert all("complete" not in stages[s] for s in ("index", "sft", "rl"))
    assert "parameters: 5,311,232" in out and "total FLOPs" in out and "expected wall time" in out
    stages, _ = plan(from_stage="tokenizer")
    assert "complete" in stages["facts"] and all("complete" not in stages[s] for s in PIPELINE[2:])
    stages, _ = plan(only="pretrain")
    assert list(stages) == ["pretrain"] and "complete" not in stages["pretrain"]
    with pytest.raises(ChatforgeError, match="pipeline: data, facts"):
        speedrun.run(SpeedrunConfig(preset="tiny", runs_dir=str(tmp_path / "runs"), only="pretrian"))
    args = build_parser().parse_args(["speedrun", "--from", "sft", "--dry_run"])
    assert args.from_stage == "sft" and args.dry_run == "true"


def test_speedrun_progress_line_estimates_time_left():
    from chatforge.stages.speedrun import TINY_SECONDS, eta, fmt_s

    assert fmt_s(75) == "1:15" and fmt_s(3725) == "1:02:05"
    assert eta("gpu", ["sft"], 0, 0) == ""  # only the tiny preset has measured stage times
    assert eta("tiny", ["sft", "rl"], 0, 0) == f", about {fmt_s(TINY_SECONDS['sft'] + TINY_SECONDS['rl'])} left"
    # this machine took twice the table's time so far: twice the table's time left
    assert eta("tiny", ["sft"], 2 * TINY_SECONDS["pretrain"], TINY_SECONDS["pretrain"]) == \
        f", about {fmt_s(2 * TINY_SECONDS['sft'])} left"


def test_speedrun_warns_when_other_jobs_load_the_cpu():
    import os
    import subprocess
    import sys
    import time

    from chatforge.hardware import cpu_busy_share
    from chatforge.stages.speedrun import busy_note

    assert busy_note(None, 2) is None and busy_note(0.1, 2) is None  # no /proc/stat, or a blip
    assert "about 1.0 of this machine's 2 cores" in busy_note(0.5, 2)  # one core taken by another job
    assert busy_note(0.2, 16) is None and "6.4 of this machine's 16" in busy_note(0.4, 16)
    # a real busy process next to the measurement: at least most of one core reads as busy
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        share = cpu_busy_share(1.0)
    finally:
        spin.kill()
        spin.wait()
    cores = os.cpu_count() or 1
    assert share is not None and share * cores > 0.7, share
