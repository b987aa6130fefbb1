"""Pretraining: optimizer groups, schedule, data loader (determinism, sharding, resume), the stage end
to end (checkpoint, resume reproducing losses step for step, NaN detection, torchrun with 2 gloo
processes), `sample` on the result, and each bad input as one clear error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.cli import main
from chatforge.common import ChatforgeError, write_json
from chatforge.config import PretrainConfig, resolve_config
from chatforge.dataloader import PackedLoader, TokenStream, build_token_shards, eval_windows, train_token_counts
from chatforge.model import GPT, ModelConfig
from chatforge.optim import build_optimizer, lr_multiplier, muon_momentum
from chatforge.bpb import unigram_bpb
from chatforge.plan import derive_settings, describe_plan, estimate_rows
from chatforge.corpus import iter_documents
from chatforge.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = ["text/tinyshakespeare.txt.gz", "text/c4_demo.jsonl"]
# A model and run small enough for seconds on 2 cores: depth 2 (width 128), 64-token context.
SMALL = ["--depth", "2", "--max_seq_len", "64", "--device_batch_size", "8", "--total_batch_size", "1024",
         "--eval_tokens", "4096", "--val_fraction", "0.05", "--max_chars", "400000", "--threads", "1"]


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, shared_data) -> Path:
    """A 512-token BPE trained on a slice of the corpus, laid out as a complete tokenizer stage."""
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    docs = iter_documents(CORPUS, str(shared_data), 10_000, 300_000)
    Tokenizer.train(docs, vocab_size=512).save(d)
    write_json(d / "DONE", {"stage": "tokenizer"})
    return d


@pytest.fixture
def runs(tmp_path, tokenizer_dir, shared_data, monkeypatch):
    """A runs folder whose run 'r' has the tokenizer stage done; returns a CLI helper."""
    monkeypatch.setenv("CHATFORGE_DATA_DIR", str(shared_data))
    shutil.copytree(tokenizer_dir, tmp_path / "runs" / "r" / "tokenizer")

    def cli(*argv, run="r"):
        return main(["pretrain", "--run", run, "--runs_dir", str(tmp_path / "runs"),
                     "--corpus", ",".join(CORPUS), *SMALL, *map(str, argv)])

    cli.root = tmp_path / "runs"
    cli.dir = tmp_path / "runs" / "r" / "pretrain"
    return cli


def losses(metrics: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run's records for the same step: the last one)."""
    out = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "event" not in r:
            out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir, shared_data):
    """One finished 12-step run shared by the sample / export / bad-input tests."""
    root = tmp_path_factory.mktemp("trained") / "runs"
    shutil.copytree(tokenizer_dir, root / "r" / "tokenizer")
    rc = main(["pretrain", "--run", "r", "--runs_dir", str(root), "--data_dir", str(shared_data),
               "--corpus", ",".join(CORPUS), *SMALL, "--num_iterations", "12", "--eval_every", "6",
               "--sample_every", "12", "--checkpoint_every", "6"])
    assert rc == 0
    return root / "r" / "pretrain"


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def test_optimizer_groups_and_state():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_depth(2, vocab_size=256, max_seq_len=16))
    opt = build_optimizer(model.param_groups(), model.config.n_embd)
    muon, adamw = opt.optimizers["muon"], opt.optimizers["adamw"]
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    adam_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not muon_params & adam_params
    assert muon_params | adam_params == {id(p) for p in model.parameters()}  # every parameter once
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert id(model.wte.weight) in adam_params and id(model.lm_head.weight) in adam_params
    kinds = {g["kind"]: g["lr"] for g in adamw.param_groups}
    scale = (128 / 768) ** -0.5  # AdamW LRs scale with 1/sqrt(width / 768)
    assert kinds["embedding"] == pytest.approx(0.2 * scale) and kinds["lm_head"] == pytest.approx(0.004 * scale)
    assert muon.param_groups[0]["lr"] == 0.02 and muon.param_groups[0]["adjust_lr_fn"] == "original"

    x = torch.randint(0, 256, (2, 16))
    model(x, x).backward()
    opt.step()
    # save and restore as pretraining does (torch.distributed.checkpoint, state keyed by parameter name)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True)
    state = get_optimizer_state_dict(model, list(opt.optimizers.values()), options=full)
    model2 = GPT(ModelConfig.from_depth(2, vocab_size=256, max_seq_len=16))
    opt2 = build_optimizer(model2.param_groups(), 128)
    set_optimizer_state_dict(model2, list(opt2.optimizers.values()), state, options=full)
    buf = muon.state[muon.param_groups[0]["params"][0]]["momentum_buffer"]
    assert torch.equal(opt2.optimizers["muon"].state[model2.param_groups()["matrix"][0]]["momentum_buffer"], buf)
    exp_avg = adamw.state[model.wte.weight]["exp_avg"]
    assert torch.equal(opt2.optimizers["adamw"].state[model2.wte.weight]["exp_avg"], exp_avg)

    opt.set_lr(0.5)
    assert all(g["lr"] == pytest.approx(0.5 * g["initial_lr"]) for g in opt.param_groups)


def test_schedule():
    lrs = [lr_multiplier(s, 100, warmup_steps=10, warmdown_steps=20, final_lr_frac=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[50] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after warmup
    assert 0.1 < lrs[-1] < 0.2 and lrs[79] == 1.0 and lrs[80] < 1.0
    assert muon_momentum(0) == 0.85 and muon_momentum(300) == 0.95


def test_derived_settings_follow_depth():
    cfg = resolve_config(PretrainConfig, overrides={"depth": 20})
    plan = derive_settings(cfg, vocab_size=32768, world=8)
    assert plan.model_config.n_embd == 1280 and plan.total_batch_size == 524288  # nanochat's d20 batch
    # Counted by hand, d20 (width 1280, 10 heads of 128, SwiGLU 64*ceil(8*1280/3/64) = 3456), vocab 32768:
    #   per block: q,k,v,o 4*1280^2 = 6,553,600 + gate,up,down 3*1280*3456 = 13,271,040
    #              + 2 RMSNorms 2*1280 + q/k norms 2*128 = 19,827,456; x 20 blocks = 396,549,120
    #   embedding + untied head 2*32768*1280 = 83,886,080; final norm 1,280  -> 480,436,480
    # 20 tokens per parameter at 524,288 tokens a step: 9,608,729,600 / 524,288 = 18,327.2 -> 18,327 steps
    assert plan.num_params == 480_436_480
    assert plan.grad_accum == 1 and plan.num_iterations == 18_327
    small = derive_settings(resolve_config(PretrainConfig, overrides={"depth": 4}), 32768, 1)
    assert small.total_batch_size < plan.total_batch_size and small.num_params < plan.num_params
    text = describe_plan(plan, torch.device("cpu"), None)
    assert "parameters:" in text and "FLOPs/token" in text and "8 x H100" in text and "$" in text
    # overrides win
    cfg = resolve_config(PretrainConfig, overrides={"depth": 4, "n_embd": 384, "total_batch_size": 65536,
                                                    "num_iterations": 7})
    plan = derive_settings(cfg, 4096, 1)
    assert plan.model_config.n_embd == 384 and plan.num_iterations == 7 and plan.grad_accum == 1


@pytest.mark.parametrize("preset", ["tiny", "gpu", "8xh100"])
def test_presets_plan(preset):
    cfg = resolve_config(PretrainConfig, preset=preset)
    world = 8 if preset == "8xh100" else 1
    plan = derive_settings(cfg, vocab_size=4096 if preset == "tiny" else 32768, world=world)
    assert plan.num_iterations > 0 and plan.total_batch_size % (plan.device_batch_size * plan.seq_len * world) == 0
    if preset != "tiny":
        (_, hours, dollars), *_ = estimate_rows(plan, None)
        assert 0.1 < hours < 24 and dollars > 0


# ----------------------------------------------------------------------------------------------
# Data loader


def rows(loader, steps, accum=1):
    out = []
    for _ in range(steps * accum):
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])
        out.append(x)
    return torch.cat(out)


def test_loader_deterministic_sharded_resumable():
    stream = TokenStream.from_array(np.arange(1000), vocab_size=1000)
    a = rows(PackedLoader(stream, 4, 8, seed=1, grad_accum=2), 20, accum=2)
    b = rows(PackedLoader(stream, 4, 8, seed=1, grad_accum=2), 20, accum=2)
    assert torch.equal(a, b)  # same seed, same batches
    assert not torch.equal(a, rows(PackedLoader(stream, 4, 8, seed=2, grad_accum=2), 20, accum=2))
    # 2 ranks x 4 rows see exactly the rows of 1 rank x 4 rows x 2 accumulation steps, split by rank
    r0 = PackedLoader(stream, 4, 8, rank=0, world_size=2, seed=1)
    r1 = PackedLoader(stream, 4, 8, rank=1, world_size=2, seed=1)
    ranks = torch.cat([torch.cat([r0.next_batch()[0], r1.next_batch()[0]]) for _ in range(20)])
    assert torch.equal(ranks, a)  # epochs end on step boundaries, so this holds across epochs too
    # resume mid-run (past an epoch boundary: 124 windows / 8 per step -> 15 steps per epoch)
    full = PackedLoader(stream, 4, 8, seed=1, grad_accum=2)
    first = rows(full, 17, accum=2)
    state = json.loads(json.dumps(full.state_dict()))
    assert state["epoch"] == 1
    rest = rows(full, 5, accum=2)
    resumed = PackedLoader(stream, 4, 8, seed=1, grad_accum=2)
    resumed.load_state_dict(state)
    assert torch.equal(rows(resumed, 5, accum=2), rest) and first.shape[0] == 17 * 8
    # within an epoch no window repeats
    epoch0 = a[:15 * 8]
    assert len({tuple(r.tolist()) for r in epoch0}) == 15 * 8
    with pytest.raises(ChatforgeError, match="fewer than one optimizer step"):
        PackedLoader(TokenStream.from_array(np.arange(50), 50), 4, 8, grad_accum=2)


def test_token_shards(tmp_path, tokenizer_dir, shared_data):
    tok = Tokenizer.load(tokenizer_dir)
    out = tmp_path / "tokens"
    index = build_token_shards(out, tok, CORPUS, data_dir=str(shared_data), max_chars=200_000,
                               val_fraction=0.1, shard_tokens=20_000, log=lambda *a: None)
    assert len(index["train"]["shards"]) > 1  # several shards, read back as one stream
    train = TokenStream(out, index, "train")
    val = TokenStream(out, index, "val")
    assert len(train) == index["train"]["tokens"] and len(val) == index["val"]["tokens"]
    all_train = train.window(0, len(train))
    # every document starts with BOS: as many BOS tokens as documents
    assert all_train[0] == tok.bos_id and (all_train == tok.bos_id).sum() == index["train"]["documents"]
    assert index["val"]["documents"] == (index["train"]["documents"] + index["val"]["documents"]) // 10
    # the held-out documents are every 10th one, in corpus order
    docs = list(iter_documents(CORPUS, str(shared_data), 100_000, 200_000))
    expect = [tok.bos_id] + tok.encode(docs[9]) + [tok.bos_id] + tok.encode(docs[19])
    assert val.window(0, len(expect)).tolist() == expect
    # reused when nothing changed
    mtime = (out / "index.json").stat().st_mtime_ns
    assert build_token_shards(out, tok, CORPUS, data_dir=str(shared_data), max_chars=200_000, val_fraction=0.1,
                              shard_tokens=20_000, log=lambda *a: None)["fingerprint"] == index["fingerprint"]
    assert (out / "index.json").stat().st_mtime_ns == mtime
    w = eval_windows(val, 16, 1600, rank=1, world_size=2)
    assert len(w) == 50 and w[0] == 1
    # the train split's token counts are stored with the shards: the unigram baseline reads them
    # instead of re-reading the whole train split on every (re)start
    counts = train_token_counts(out)
    assert counts.shape == (tok.vocab_size,) and counts.sum() == len(train)
    assert np.array_equal(counts, np.bincount(all_train, minlength=tok.vocab_size))
    token_bytes = np.asarray(tok.token_bytes())
    uniform = np.full(tok.vocab_size, 7)  # every token equally likely: log2(V) bits per text token
    y = val.window(1, 16)
    expected = np.log2(tok.vocab_size) * (token_bytes[y] > 0).sum() / token_bytes[y].sum()
    assert unigram_bpb(uniform, val, [0], 16, token_bytes) == pytest.approx(expected)
    # a missing shard is one clear error
    (out / index["train"]["shards"][1]["file"]).unlink()
    with pytest.raises(ChatforgeError, match="token shard .* is missing"):
        TokenStream(out, index, "train")


# ----------------------------------------------------------------------------------------------
# The stage


def test_stage_checkpoint_and_sample(trained, capsys):
    ckpt = trained / "checkpoint"
    for name in ("model.safetensors", "config.json", "optimizer.pt", "state.json", "tokenizer"):
        assert (ckpt / name).exists(), name
    for name in ("DONE", "metrics.jsonl", "loss.png", "config.json", "tokens/index.json"):
        assert (trained / name).exists(), name
    done = json.loads((trained / "DONE").read_text())
    assert done["step"] == 12 and done["val_bpb"] < done["unigram_bpb"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 12 and set(state["data"]) >= {"epoch", "position"} and "torch" in state["rng"]
    recs = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all({"lr", "tokens_per_s", "loss"} <= r.keys() for r in steps)
    assert [r["step"] for r in recs if r.get("event") == "eval"] == [6, 12]
    assert any(r.get("event") == "samples" for r in recs)

    # a complete stage is skipped
    capsys.readouterr()
    assert main(["pretrain", "--run", "r", "--runs_dir", str(trained.parent.parent)]) == 0
    assert "complete" in capsys.readouterr().out

    # sample: streamed completion; same seed, same text
    assert main(["sample", str(ckpt), "--prompt", "ROMEO:", "--max_tokens", "12", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first) > len("ROMEO:\n")
    assert main(["sample", str(ckpt), "--prompt", "ROMEO:", "--max_tokens", "12", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first
    fewshot = trained / "fewshot.txt"
    fewshot.write_text("Q: 1+1?\nA: 2\nQ: 2+2?\nA:")
    assert main(["sample", str(ckpt), "--prompt_file", str(fewshot), "--temperature", "0",
                 "--max_tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Q: 1+1?")

    # export: the CLI subcommand writes a transformers folder
    out = trained / "hf"
    assert main(["export", str(ckpt), "--format", "hf", str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


def test_bad_inputs_one_clear_error(trained, tmp_path, tokenizer_dir, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("CHATFORGE_DATA_DIR", str(shared_data))
    root = trained.parent.parent
    ckpt = trained / "checkpoint"

    def err(*argv, cmd="pretrain"):
        capsys.readouterr()
        assert main([cmd, *map(str, argv)]) == 2
        e = capsys.readouterr().err
        assert "Traceback" not in e and e.count("error:") == 1
        return e

    # a copy of the trained run, not yet DONE, so resume checks run
    shutil.copytree(trained, root / "b" / "pretrain")
    shutil.copytree(tokenizer_dir, root / "b" / "tokenizer")
    (root / "b" / "pretrain" / "DONE").unlink()
    base = ["--run", "b", "--runs_dir", root, "--corpus", ",".join(CORPUS), *SMALL, "--num_iterations", 14]

    # a token shard cut short (a full disk, an interrupted copy): one line naming the file
    shard = root / "b" / "pretrain" / "tokens" / "train_00000.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[:len(good) // 2])
    e = err(*base)
    assert f"token file {shard} is damaged" in e and "tokenize the corpus again" in e
    shard.write_bytes(good)
    # checkpoint from another architecture (depth 3 vs 2)
    assert "different architecture" in err(*base, "--depth", 3)
    # context longer than the checkpoint supports
    assert "longer than the 64 tokens" in err(*base, "--max_seq_len", 128)
    # batch that does not divide across ranks
    assert "does not divide across ranks" in err(*base, "--total_batch_size", 1000)
    # missing data file
    assert "'text/nope.txt' not found" in err(*base[:4], "--corpus", "text/nope.txt", *SMALL)
    # empty dataset
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "produced no documents" in err(*base[:4], "--corpus", empty, *SMALL)
    # tokenizer / model vocab mismatch: swap in a 600-token tokenizer
    shutil.rmtree(root / "b" / "tokenizer")
    docs = iter_documents(CORPUS, str(shared_data), 10_000, 200_000)
    Tokenizer.train(docs, vocab_size=600).save(root / "b" / "tokenizer")
    write_json(root / "b" / "tokenizer" / "DONE", {})
    assert "vocabulary of 512 tokens" in err(*base)
    # no tokenizer stage
    assert "tokenizer" in err("--run", "nothing", "--runs_dir", root, *SMALL)
    # sample: a Hugging Face folder instead of a checkpoint; a prompt longer than the context
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "Hugging Face" in err(hf, "--prompt", "x", cmd="sample")
    assert "context is 64" in err(ckpt, "--prompt", "to be or not " * 40, cmd="sample")


@pytest.mark.parametrize("flag,value,expect", [
    ("threads", "-1", "--threads -1: must be at least 0"),
    ("matrix_lr", "-1", "--matrix_lr -1.0: must be a finite number >= 0"),
    ("matrix_lr", "nan", "--matrix_lr nan: must be a finite number >= 0"),
    ("embedding_lr", "inf", "--embedding_lr inf: must be a finite number >= 0"),
    ("num_iterations", "-5", "--num_iterations -5: must be at least 0 (0 = derived from the token budget)"),
    ("total_batch_size", "-8", "--total_batch_size -8: must be at least 0"),
    ("eval_every", "-1", "--eval_every -1: must be at least 0"),
    ("warmup_ratio", "nan", "--warmup_ratio nan: must be between 0 and 1"),
    ("grad_clip", "nan", "--grad_clip nan: must be a finite number >= 0"),
    ("val_fraction", "0.9", "--val_fraction 0.9: must be in (0, 0.5]"),
    ("device_batch_size", "0", "--device_batch_size 0: must be at least 1"),
])
def test_bad_settings_one_clear_error(tmp_path, capsys, flag, value, expect):
    """Each bad value is one error line naming the flag, before anything runs (no run folder is made);
    before, --num_iterations -5 silently started a 90,290-step run and --matrix_lr -1 died in torch."""
    rc = main(["pretrain", "--run", "x", "--runs_dir", str(tmp_path / "runs"), "--preset", "tiny",
               f"--{flag}", value])
    e = capsys.readouterr().err
    assert rc == 2 and e.count("\n") == 1 and "Traceback" not in e and expect in e, e
    assert not (tmp_path / "runs").exists()


def test_malformed_records_are_counted_and_reported(tmp_path, tokenizer_dir):
    """A long job skips bad records and says how many (the tokenizer stage does the same)."""
    corpus = tmp_path / "c.jsonl"
    good = [json.dumps({"text": f"document number {i} about the weather"}) for i in range(6)]
    corpus.write_text("\n".join([good[0], "{not json", good[1], json.dumps({"text": 5}), *good[2:],
                                  json.dumps({"id": 5})]) + "\n")
    lines = []
    index = build_token_shards(tmp_path / "tok", Tokenizer.load(tokenizer_dir), [corpus], val_fraction=0.5,
                               log=lines.append)
    assert index["bad_records"] == 3 and index["train"]["documents"] + index["val"]["documents"] == 6
    assert "3 malformed records skipped" in lines[-1]


def test_nan_stops_with_clear_message_and_keeps_checkpoint(runs, capsys):
    # An absurd output-head learning rate overflows the logits' gradients at step 2.
    rc = runs("--num_iterations", 10, "--checkpoint_every", 1, "--eval_every", 0, "--sample_every", 0,
              "--unembedding_lr", 1e30)
    assert rc == 2
    e = capsys.readouterr().err
    assert "training diverged" in e and "is nan at step 2" in e and "last good checkpoint" in e
    state = json.loads((runs.dir / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1 and not (runs.dir / "DONE").exists()


# ----------------------------------------------------------------------------------------------
# Resume and distributed: subprocesses, a few seconds each


def _cmd(runs_root, run, *extra):
    return [sys.executable, "-m", "chatforge", "pretrain", "--run", run, "--runs_dir", str(runs_root),
            "--corpus", ",".join(CORPUS), *SMALL, "--eval_every", "10", "--sample_every", "0",
            "--checkpoint_every", "0", *map(str, extra)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses(runs):
    root = runs.root
    shutil.copytree(root / "r" / "tokenizer", root / "s" / "tokenizer")
    n = 60
    full = subprocess.run(_cmd(root, "r", "--num_iterations", n), env=_env(), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]

    # same run, SIGTERM once a few steps are done: it checkpoints and exits; a rerun resumes
    proc = subprocess.Popen(_cmd(root, "s", "--num_iterations", n), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = root / "s" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(losses(metrics)) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    state_file = root / "s" / "pretrain" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    stopped = state["step"]
    assert 5 <= stopped < n and "rerun the same command to resume" in out
    # a checkpoint whose data position belongs to other token shards is refused, not silently resumed
    state_file.write_text(json.dumps({**state, "token_index": "shards-of-another-corpus"}))
    other = subprocess.run(_cmd(root, "s", "--num_iterations", n), env=_env(), capture_output=True, text=True)
    assert other.returncode != 0 and "other token shards" in other.stderr and "--force" in other.stderr
    state_file.write_text(json.dumps(state))
    again = subprocess.run(_cmd(root, "s", "--num_iterations", n), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and f"at step {stopped}" in again.stdout

    a, b = losses(root / "r" / "pretrain" / "metrics.jsonl"), losses(metrics)
    assert sorted(a) == sorted(b) == list(range(1, n + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
    da = json.loads((root / "r" / "pretrain" / "DONE").read_text())
    db = json.loads((root / "s" / "pretrain" / "DONE").read_text())
    assert db["val_bpb"] == pytest.approx(da["val_bpb"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_gloo_processes_match_one(runs, mode):
    root = runs.root
    shutil.copytree(root / "r" / "tokenizer", root / "two" / "tokenizer")
    n = 8
    # one process: 8 sequences per step as 2 accumulation steps of 4. --eval_tokens: 65 windows of 64,
    # which 2 ranks cannot share evenly (each scores 32)
    one = subprocess.run(_cmd(root, "r", "--num_iterations", n, "--device_batch_size", 4, "--eval_tokens", 4160),
                         env=_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    # two processes x 4 sequences: the same global batch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chatforge",
           "--", *_cmd(root, "two", "--num_iterations", n, "--device_batch_size", 4, "--eval_tokens", 4160)[3:]]
    if mode == "fsdp":
        cmd.append("--fsdp")
    two = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 rank(s) x 4 seqs x 64 tokens x 2 accumulation" in two.stdout
    a, b = losses(root / "r" / "pretrain" / "metrics.jsonl"), losses(root / "two" / "pretrain" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, n + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    # the unigram baseline scores exactly the windows the model scores: 64 of the 65 on 2 ranks
    # (it used to score all 65), recomputed here from the run's shards
    out = root / "two" / "pretrain"
    base = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r.get("event") == "baseline")
    assert base["val_windows"] == 64
    index = json.loads((out / "tokens" / "index.json").read_text())
    tok = Tokenizer.load(root / "two" / "tokenizer")
    expect = unigram_bpb(train_token_counts(out / "tokens"), TokenStream(out / "tokens", index, "val"),
                         np.arange(64), 64, np.asarray(tok.token_bytes()))
    assert json.loads((out / "DONE").read_text())["unigram_bpb"] == pytest.approx(expect, rel=1e-12)
    # the distributed checkpoint loads on one process
    assert main(["sample", str(root / "two" / "pretrain" / "checkpoint"), "--prompt", "A", "--max_tokens", "3"]) == 0


@pytest.mark.slow
def test_compile_on_cpu_matches_eager(runs):
    """The tiny preset compiles on CPU (Inductor's C++ backend): same losses as eager, to fp tolerance."""
    if not shutil.which(os.environ.get("CXX", "g++")):
        pytest.skip("no C++ compiler: --compile falls back to eager")
    root = runs.root
    shutil.copytree(root / "r" / "tokenizer", root / "c" / "tokenizer")
    n = 6
    eager = subprocess.run(_cmd(root, "r", "--num_iterations", n), env=_env(), capture_output=True, text=True)
    assert eager.returncode == 0, eager.stderr[-2000:]
    comp = subprocess.run(_cmd(root, "c", "--num_iterations", n, "--compile"), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert comp.returncode == 0, comp.stderr[-2000:]
    assert "torch.compile failed" not in comp.stdout
    a, b = losses(root / "r" / "pretrain" / "metrics.jsonl"), losses(root / "c" / "pretrain" / "metrics.jsonl")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-3), step
