"""The whole road in one command on the `ci` preset (the tiny preset's stages at toy sizes, ~20 s):
every stage's artifacts and the report card, and a run killed with SIGKILL inside every stage that,
restarted, finishes with the same weights and scores as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatforge.config import PIPELINE

pytestmark = pytest.mark.slow

CHECKPOINTS = ["pretrain", "sft", "rl", "rlhf/rm", "rlhf/dpo"]


def _start(runs: Path, shared: Path) -> subprocess.Popen:
    env = dict(os.environ, CHATFORGE_DATA_DIR=str(shared), PYTHONUNBUFFERED="1")
    # its own session, so a kill reaches the data stage's worker processes too
    return subprocess.Popen([sys.executable, "-m", "chatforge", "speedrun", "--preset", "ci", "--runs_dir", str(runs),
                             "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(p: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_data):
    """One uninterrupted run: (run folder, its output, seconds each stage took)."""
    runs = tmp_path_factory.mktemp("road") / "runs"
    out = _finish(_start(runs, shared_data))
    seconds = {m[1]: float(m[2]) for m in re.finditer(r"=== speedrun: (\w+) done in ([\d.]+)s ===", out)}
    return runs / "ci", out, seconds


def test_whole_road_artifacts_and_report(reference):
    root, out, seconds = reference
    assert set(seconds) == set(PIPELINE), seconds  # every stage ran (none was complete before)
    for stage in ("data", "facts", "tokenizer", "pretrain", "index", "sft", "rl", "rlhf"):
        assert (root / stage / "DONE").exists(), stage
    for ck in CHECKPOINTS:
        assert (root / ck / "checkpoint" / "model.safetensors").exists(), ck
    assert (root / "rlhf" / "rm" / "checkpoint" / "reward_head.safetensors").exists()
    for label in ("base", "sft", "rl", "rlhf"):
        ev = json.loads((root / "eval" / label / "eval.json").read_text())
        assert ev["complete"] and ev["tasks"]["bpb"]["status"] == "ok", label
    md = (root / "report" / "report.md").read_text()
    for stage in ("data", "tokenizer", "pretrain", "index", "sft", "rl", "rlhf", "eval"):
        assert re.search(rf"^\| {stage} +\| done ", md, re.M), stage
    assert "## What each training stage measured" in md and "## Metrics by stage" in md
    assert "not run yet" not in md and (root / "report" / "report.html").exists()
    # the speedrun ends with the card and the commands for the most trained checkpoint
    assert f"chat with it:  chatforge chat {root / 'rlhf' / 'dpo' / 'checkpoint'}" in out
    assert "stage 10/10 report" in out


def _weights(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {ck: load_file(root / ck / "checkpoint" / "model.safetensors") for ck in CHECKPOINTS}


def _scores(root: Path) -> dict:
    out = {}
    for label in ("base", "sft", "rl", "rlhf"):
        ev = json.loads((root / "eval" / label / "eval.json").read_text())
        out[label] = {k: {kk: v.get(kk) for kk in ("accuracy", "bpb")} for k, v in ev["tasks"].items()}
    return out


def test_killed_in_every_stage_resumes_to_the_same_result(reference, tmp_path, shared_data):
    """For each stage that takes time: start the speedrun, wait for that stage's banner, let it run a
    random share of its reference time, SIGKILL the whole process group (no handler runs: a power cut).
    Then one more run to the end. Complete stages are skipped, the killed one resumes from its last
    checkpoint or redoes its unfinished part; the result must equal the uninterrupted run's."""
    ref_root, _, seconds = reference
    runs = tmp_path / "runs"
    rng = random.Random(7)
    killed = []
    for i, stage in enumerate(PIPELINE, 1):
        if seconds[stage] < 0.3:  # nothing to interrupt
            continue
        p = _start(runs, shared_data)
        banner = f"stage {i}/{len(PIPELINE)} {stage} "
        for line in p.stdout:
            if banner in line:
                break
        if p.poll() is None:
            time.sleep(rng.uniform(0.1, 0.9) * seconds[stage])
            os.killpg(p.pid, signal.SIGKILL)
            killed.append(stage)
        p.wait()
        p.stdout.close()
    assert {"data", "pretrain", "sft", "rlhf"} <= set(killed), killed
    _finish(_start(runs, shared_data))
    root = runs / "ci"
    ref, got = _weights(ref_root), _weights(root)
    for ck in CHECKPOINTS:
        assert ref[ck].keys() == got[ck].keys(), ck
        assert all(torch.equal(ref[ck][k], got[ck][k]) for k in ref[ck]), f"{ck} differs after kills in {killed}"
    assert _scores(root) == _scores(ref_root)
    shards = sorted(p.name for p in (root / "data" / "shards").iterdir())
    assert shards == sorted(p.name for p in (ref_root / "data" / "shards").iterdir())
