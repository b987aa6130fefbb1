"""The training loop (chatforge/train_loop.py) on its own, in-process, with a small GPT on CPU:
accumulation equals one big batch, resume reproduces an uninterrupted run bit for bit (weights,
losses, data position, RNG), SIGTERM checkpoints and stops, a NaN stops before the update and keeps
the last good checkpoint, periodic work runs on schedule, metrics aggregate, plots draw."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from chatforge.checkpoint import load_checkpoint
from chatforge.common import ChatforgeError
from chatforge.dataloader import PackedLoader, TokenStream
from chatforge.model import GPT, ModelConfig
from chatforge.optim import build_optimizer, lr_multiplier
from chatforge.plots import plot_losses, plot_metrics, read_metrics
from chatforge.train_loop import (Checkpointer, LoopConfig, NonFiniteLoss, StopFlag, Trainer, TrainingInterrupted,
                                  TrainState)

torch.set_num_threads(1)
CFG = ModelConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_kv_head=2, max_seq_len=16)


def new_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


def stream(n=4000, seed=0) -> TokenStream:
    return TokenStream.from_array(np.random.default_rng(seed).integers(0, CFG.vocab_size, n), CFG.vocab_size)


def plain_loss(model, batch):
    return model(*batch)


class Records:
    """A metrics log in memory (what StageRun.log receives)."""

    def __init__(self):
        self.rows = []

    def __call__(self, **r):
        self.rows.append(r)

    def steps(self):
        return {r["step"]: r for r in self.rows if "event" not in r}

    def events(self, name):
        return [r for r in self.rows if r.get("event") == name]


def make_trainer(model, loader, num_steps, *, grad_accum=1, log=None, sgd=False, schedule_steps=None, **kw):
    # SGD: the update is the gradient itself (Muon's bf16 Newton-Schulz would blur fp32 differences)
    total = schedule_steps or num_steps
    opt = torch.optim.SGD(model.parameters(), lr=0.5) if sgd else build_optimizer(model.param_groups(), CFG.n_embd)
    cfg = LoopConfig(num_steps=num_steps, grad_accum=grad_accum, tokens_per_step=loader.rows_per_step * CFG.max_seq_len,
                     **{k: kw.pop(k) for k in list(kw) if k in LoopConfig.__dataclass_fields__})
    return Trainer(model, opt, kw.pop("loss_fn", plain_loss), loader, cfg, device="cpu", log=log,
                   lr_schedule=lambda s: lr_multiplier(s, total, 1, total // 2), say=lambda *a: None, **kw)


# ----------------------------------------------------------------------------------------------


def test_accumulation_equals_one_big_batch():
    """4 micro-batches of 2 rows, gradients averaged, give the same update as one batch of 8 rows
    (the same rows: the loader's global order does not depend on how a step is split)."""
    s = stream()
    a, b = new_model(), new_model()
    ta = make_trainer(a, PackedLoader(s, 2, 16, grad_accum=4, seed=3), 3, grad_accum=4, sgd=True)
    tb = make_trainer(b, PackedLoader(s, 8, 16, grad_accum=1, seed=3), 3, grad_accum=1, sgd=True)
    for _ in range(3):
        ra, rb = ta.train_step(), tb.train_step()
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)
    # and a step without accumulation over only the first micro-batch is a different update
    c = new_model()
    make_trainer(c, PackedLoader(s, 2, 16, grad_accum=1, seed=3), 1, sgd=True).train_step()
    a1 = new_model()
    make_trainer(a1, PackedLoader(s, 2, 16, grad_accum=4, seed=3), 1, grad_accum=4, sgd=True).train_step()
    assert not torch.allclose(c.lm_head.weight, a1.lm_head.weight)


def noisy_loss(model, batch):
    """A loss that draws from torch's RNG (as dropout would), so resume must restore the RNG."""
    return model(*batch) * (1 + 0.1 * torch.rand(())), {"n_tokens": batch[1].numel(), "noise": torch.rand(())}


def test_resume_through_the_loop_is_exact(tmp_path):
    s, n = stream(), 8
    full_log = Records()
    full = make_trainer(new_model(), PackedLoader(s, 4, 16, grad_accum=2, seed=1), n, grad_accum=2, log=full_log,
                        loss_fn=noisy_loss)
    torch.manual_seed(42)
    full.run()

    # the same run, checkpointed at step 3 and stopped there (num_steps 3), then resumed to n
    ck = Checkpointer(tmp_path / "ck", meta={"stage": "test"}, extra_state={"tag": "x"})
    first_log = Records()
    first = make_trainer(new_model(), PackedLoader(s, 4, 16, grad_accum=2, seed=1), 3, grad_accum=2,
                         log=first_log, loss_fn=noisy_loss, checkpointer=ck, schedule_steps=n)
    torch.manual_seed(42)
    first.run()
    torch.manual_seed(999)  # whatever happens in between must not matter
    model, info = load_checkpoint(ck.path)
    assert info["train_state"]["step"] == 3 and info["train_state"]["tag"] == "x"
    assert info["config"]["stage"] == "test" and info["config"]["step"] == 3
    rest_log = Records()
    loader = PackedLoader(s, 4, 16, grad_accum=2, seed=1)
    rest = make_trainer(model, loader, n, grad_accum=2, log=rest_log, loss_fn=noisy_loss, checkpointer=ck)
    rest.resume(info)
    assert rest.state.step == 3 and loader.position == 3 * 8
    rest.run()

    a = full_log.steps()
    b = {**first_log.steps(), **rest_log.steps()}
    assert sorted(a) == sorted(b) == list(range(1, n + 1))
    for step in a:  # bit for bit: eager CPU float32, same op order
        assert b[step]["loss"] == a[step]["loss"] and b[step]["noise"] == a[step]["noise"], step
    assert b[n]["tokens"] == a[n]["tokens"] == n * 8 * 16
    for pa, pb in zip(full.model.module.parameters(), rest.model.module.parameters()):
        assert torch.equal(pa, pb)
    # per-step records carry the loss function's metrics: n_tokens summed, others averaged
    assert a[1]["n_tokens"] == 8 * 16 and 0 <= a[1]["noise"] <= 1


def test_resume_refuses_a_checkpoint_without_trainer_state(tmp_path):
    from chatforge.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "w", new_model())
    model, info = load_checkpoint(tmp_path / "w")
    t = make_trainer(model, PackedLoader(stream(), 4, 16, seed=1), 2)
    with pytest.raises(ChatforgeError, match="no optimizer/trainer state"):
        t.resume(info)


def test_sigterm_checkpoints_after_the_step_and_stops(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    before = signal.getsignal(signal.SIGTERM)

    def on_step(step):
        if step == 2:  # during the third step
            os.kill(os.getpid(), signal.SIGTERM)

    t = make_trainer(new_model(), PackedLoader(stream(), 4, 16, seed=1), 10, checkpointer=ck, on_step=on_step)
    with pytest.raises(TrainingInterrupted):
        t.run()
    assert t.state.step == 3  # the step in flight finished
    _, info = load_checkpoint(ck.path)
    assert info["train_state"]["step"] == 3 and info["train_state"]["data"]["position"] == 3 * 4
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_second_ctrl_c_aborts_at_once():
    with StopFlag(say=lambda *a: None) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_nan_stops_before_the_update_and_keeps_the_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    log = Records()

    def loss_fn(model, batch):
        loss = model(*batch)
        return loss * float("nan") if t.state.step == 2 else loss

    t = make_trainer(new_model(), PackedLoader(stream(), 4, 16, seed=1), 10, checkpointer=ck, log=log,
                     loss_fn=loss_fn, checkpoint_every=1, diverge_hint="lower --lr")
    with pytest.raises(NonFiniteLoss) as e:
        t.run()
    msg = str(e.value)
    assert "the loss is nan at step 3" in msg and f"kept at {ck.path} (step 2)" in msg and "Lower --lr" in msg
    saved, _ = load_checkpoint(ck.path)
    for p, q in zip(saved.parameters(), t.model.module.parameters()):
        assert torch.equal(p, q)  # the nan step changed nothing
    assert log.events("nonfinite")[0]["step"] == 3


def test_periodic_work_on_schedule(tmp_path):
    log = Records()
    vals = iter([3.0, 1.0, 2.0])
    ck = Checkpointer(tmp_path / "ck")

    def evaluate(t):
        return {"val": next(vals)}

    t = make_trainer(new_model(), PackedLoader(stream(), 4, 16, seed=1), 5, log=log, eval_every=2, sample_every=4,
                     checkpoint_every=2, best_metric="val", checkpointer=ck, evaluate=evaluate,
                     sample=lambda t: [f"sample at {t.state.step}"])
    s = t.run()
    assert [r["step"] for r in log.events("eval")] == [2, 4, 5]  # every 2 steps and at the end
    assert [r["samples"] for r in log.events("samples")] == [["sample at 4"], ["sample at 5"]]
    assert [r["step"] for r in log.events("checkpoint")] == [2, 4, 5]
    assert s.best == 1.0 and s.metrics == {"val": 2.0}
    _, info = load_checkpoint(ck.path)
    assert info["config"]["val"] == 2.0 and info["train_state"]["best"] == 1.0
    rec = log.steps()[5]
    assert rec["lr"] == pytest.approx(0.02 * rec["lr_mult"]) and rec["tokens_per_s"] > 0


def test_best_metric_higher_is_better():
    vals = iter([0.5, 0.7, 0.6])
    t = make_trainer(new_model(), PackedLoader(stream(), 4, 16, seed=1), 3, eval_every=1, best_metric="reward",
                     best_higher=True, evaluate=lambda t: {"reward": next(vals)})
    assert t.run().best == 0.7


def test_train_state_reads_checkpoints_from_before_the_loop():
    old = {"step": 7, "tokens_seen": 70, "loader": {"epoch": 0, "position": 28}, "val_bpb": 2.5,
           "min_val_bpb": 2.4, "smooth_loss": 1.0, "train_time": 3.0, "last_eval_step": 5}
    s = TrainState.from_dict(old)
    assert (s.step, s.tokens, s.data["position"], s.metrics, s.best) == (7, 70, 28, {"val_bpb": 2.5}, 2.4)
    assert TrainState.from_dict(json.loads(json.dumps(s.state_dict()))) == s


def test_plots(tmp_path):
    m = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"event": "eval", "step": 2, "val_bpb": 2.0},
             {"step": 2, "loss": 3.5}]  # a resumed run redid step 2: the last record wins
    m.write_text("\n".join(map(json.dumps, lines)) + "\n{cut by a cr")
    steps, events = read_metrics(m)
    assert steps[2]["loss"] == 3.5 and events["eval"][2]["val_bpb"] == 2.0
    for png in (plot_losses(m, tmp_path / "a.png", 3.0), plot_metrics(m, tmp_path / "b.png", ["loss", "eval/val_bpb"])):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# The compute dtype a stage's --dtype resolves to (chatforge.common.amp_dtype)


def test_auto_dtype_is_bf16_on_cpu_only_for_stages_that_ask_and_only_with_amx(monkeypatch):
    from chatforge import common

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert common.amp_dtype("float32", cpu, cpu_bf16=True) is None
    assert common.amp_dtype("bfloat16", cpu) is torch.bfloat16  # asked for: always
    assert common.amp_dtype("auto", cuda) is torch.bfloat16
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        assert common.cpu_has_amx() is amx
        assert common.amp_dtype("auto", cpu, cpu_bf16=True) is (torch.bfloat16 if amx else None)
        assert common.amp_dtype("auto", cpu) is None  # a stage that measured slower in bf16 keeps float32
    # without torch's private probe the CPU flags decide
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    assert common.cpu_has_amx() is (" amx_bf16" in flags)
