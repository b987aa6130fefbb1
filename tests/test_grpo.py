"""GRPO (chatforge/grpo.py) and the `chatforge rl` stage: rollouts as micro-batches, the step-level
token mean, inner epochs on the sampling policy's log-probs, exact resume of the batch source, the
engine sampling with the weights just trained, a controlled experiment whose answer is known, and the
stage end to end on a tiny checkpoint."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from chatforge.common import ChatforgeError
from chatforge.config import ConfigError, RlConfig
from chatforge.engine import Engine
from chatforge.grpo import GrpoSettings, RolloutSource, evaluate_task, grpo_loss, reply_text, wilson_interval
from chatforge.tools import Tool
from chatforge.train_loop import LoopConfig, Trainer
from engine_helpers import ScriptedModel, train_tokenizer
from rl_helpers import digit_task, small_gpt
from sft_helpers import one_thread, real_tokenizer  # noqa: F401  (one_thread: an autouse fixture)



def _source(model, tok, task, settings, **kw):
    return RolloutSource(Engine(model, tok, tools={}), tok, task, task.items("train"), settings, **kw)


def _trainer(model, source, settings, lr=3e-3, steps=10):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return Trainer(model, opt, grpo_loss(settings), source,
                   LoopConfig(num_steps=steps, grad_accum=settings.micro_batches, grad_clip=1.0), say=lambda s: None)


# ----------------------------------------------------------------------------------------------
# Building blocks


def test_wilson_interval_known_values():
    # Brown, Cai & DasGupta's worked case and the edges
    lo, hi = wilson_interval(10, 20)
    assert (round(lo, 4), round(hi, 4)) == (0.2993, 0.7007)
    assert wilson_interval(0, 10)[0] == 0.0 and 0.27 < wilson_interval(0, 10)[1] < 0.28
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_reply_text_leaves_out_tool_output():
    """The verifier reads the model's own words: a reply that calls python and stops earns nothing
    for the number the tool printed."""
    tok = train_tokenizer(512)
    sp = tok.special
    script = ([sp("<|python_start|>")] + tok.encode("print(6*7)") + [sp("<|python_end|>")] + tok.encode("Done.")
              + [sp("<|assistant_end|>")])
    model = ScriptedModel(script, tok.vocab_size, sp("<|output_start|>"), sp("<|output_end|>"))
    eng = Engine(model, tok, tools={"python": Tool("python", "py", lambda code: "42\n")})
    [c] = eng.generate([tok.render_prompt([{"role": "user", "content": "6*7?"}])], temperature=0, max_tokens=60)
    assert "42" in c.text  # the engine's text shows the tool output ...
    own = reply_text(tok, c)
    assert "42" not in own and "Done." in own and "6*7" in own  # ... the model's own words do not


def test_micro_batches_keep_the_step_token_mean(real_tok):
    """One rollout split into 1 or 3 micro-batches gives the same gradient: every reply token of the
    step weighs the same (DAPO's token-level loss), whatever micro-batch it lands in."""
    tok, task = real_tok, digit_task()
    grads = []
    for micro in (1, 3):
        model = small_gpt(tok.vocab_size)
        s = GrpoSettings(prompts=4, group_size=4, micro_batches=micro, max_tokens=6, seed=3, resample=5,
                         normalize_by_std=False)
        src = _source(model, tok, task, s)
        loss_fn = grpo_loss(s)
        for _ in range(micro):
            loss, _ = loss_fn(model, src.next_batch())
            (loss / micro).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert not src.queue
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_rollout_micro_batch_contents(real_tok):
    tok, task = real_tok, digit_task()
    s = GrpoSettings(prompts=4, group_size=4, micro_batches=2, max_tokens=6, seed=1, resample=5)
    src = _source(small_gpt(tok.vocab_size), tok, task, s)
    mb = src.next_batch()
    B, T = mb["input_ids"].shape
    assert mb["labels"].shape == mb["response_mask"].shape == (B, T)
    assert mb["advantages"].shape == mb["rewards"].shape == (B,)
    assert set(mb["rewards"].tolist()) <= {0.0, 1.0}
    st = mb["stats"]
    assert 0 <= st["reward"] <= 1 and st["response_length"] > 0 and st["rollout_tries"] >= 1
    assert src.reward_stats.counts  # every reply was scored and its reason counted
    # the kept rows hold every group with a learning signal (here at least one, after the retries)
    assert mb["advantages"].abs().sum() > 0 or st["groups_dropped"] == 1.0


def test_second_epoch_uses_the_sampling_policy_log_probs(real_tok):
    """epochs=2: step 1 records the sampling policy's log-probs in the rollout; step 2 (after the
    update) takes the clipped ratio against them, so the ratio moves away from 1 and may clip."""
    tok, task = real_tok, digit_task()
    model = small_gpt(tok.vocab_size)
    s = GrpoSettings(prompts=4, group_size=4, micro_batches=1, epochs=2, max_tokens=6, seed=2, resample=5,
                     cliprange=0.01)
    src = _source(model, tok, task, s)
    t = _trainer(model, src, s, lr=3e-2, steps=2)
    r1 = t.train_step()
    assert r1["clip_fraction"] == 0.0  # on-policy: ratio exactly 1
    assert len(src.queue) == 1 and "old_log_probs" in src.queue[0]
    rollouts = src.rollouts
    r2 = t.train_step()
    assert src.rollouts == rollouts  # the same rollout, not a new one
    assert r2["clip_fraction"] > 0  # the policy moved: some ratios left [0.99, 1.01]
    with pytest.raises(ValueError, match="grpo_clip"):
        GrpoSettings(epochs=2, loss_type="reinforce_with_baseline").check()


def test_kl_to_the_frozen_reference(real_tok):
    """kl_coef > 0: the rollout carries the reference's log-probs; the k3 KL is 0 while the policy is the
    reference and positive once it has moved. Without a reference the source refuses to start."""
    tok, task = real_tok, digit_task()
    model = small_gpt(tok.vocab_size)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    s = GrpoSettings(prompts=4, group_size=4, max_tokens=6, seed=6, resample=5, kl_coef=0.1)
    src = _source(model, tok, task, s, ref_model=ref)
    t = _trainer(model, src, s, lr=3e-2, steps=2)
    assert t.train_step()["kl"] == pytest.approx(0.0, abs=1e-6)
    assert t.train_step()["kl"] > 1e-6
    with pytest.raises(ValueError, match="reference"):
        _source(model, tok, task, s)


def test_batch_source_resumes_exactly(real_tok):
    """The state (item position, rollout count, the unused micro-batches of an epoch) survives a JSON
    round trip: the resumed source returns the same batches as the uninterrupted one."""
    tok, task = real_tok, digit_task()
    s = GrpoSettings(prompts=3, group_size=4, micro_batches=2, epochs=2, max_tokens=6, seed=5, resample=5)
    model = small_gpt(tok.vocab_size)
    a = _source(model, tok, task, s)
    t = _trainer(model, a, s, steps=1)
    t.train_step()  # one epoch of the first rollout: two micro-batches of it are left
    state = json.loads(json.dumps(a.state_dict()))
    b = _source(copy.deepcopy(model), tok, task, s)
    b.load_state_dict(state)
    for _ in range(6):  # the rest of rollout 1, then two more rollouts
        x, y = a.next_batch(), b.next_batch()
        for k in ("input_ids", "labels", "response_mask", "advantages", "rewards"):
            assert torch.equal(x[k], y[k]), k
        assert ("old_log_probs" in x) == ("old_log_probs" in y)
        if "old_log_probs" in x:
            assert torch.equal(x["old_log_probs"], y["old_log_probs"])


def test_engine_samples_with_the_weights_just_trained(real_tok):
    """The rollout engine holds the model being trained: after an optimizer step its greedy replies are
    a fresh engine's on the updated weights (its packed CPU copy of the weights was rebuilt)."""
    tok, task = real_tok, digit_task()
    model = small_gpt(tok.vocab_size)
    s = GrpoSettings(prompts=4, group_size=4, max_tokens=6, seed=4, resample=5)
    src = _source(model, tok, task, s)
    prompt = tok.render_prompt(task.items("val")[0].messages)
    src.engine.generate([prompt], max_tokens=8, temperature=0)
    version = src.engine._weights.version if src.engine._weights is not None else None
    _trainer(model, src, s, lr=5e-2, steps=1).train_step()
    [mine] = src.engine.generate([prompt], max_tokens=8, temperature=0)
    [fresh] = Engine(copy.deepcopy(model).eval(), tok, tools={}).generate([prompt], max_tokens=8, temperature=0)
    assert mine.tokens == fresh.tokens
    if version is not None:  # the CPU inference layout is in use: it was rebuilt after the update
        assert src.engine._weights.version != version


@pytest.mark.slow
def test_grpo_learns_a_known_rule(real_tok):
    """Controlled experiment: the reward is 1 when the reply holds a digit. A near-uniform random
    policy rarely writes one; after GRPO the greedy replies to held-out prompts do."""
    tok, task = real_tok, digit_task()
    model = small_gpt(tok.vocab_size, depth=2)
    s = GrpoSettings(prompts=6, group_size=8, micro_batches=1, max_tokens=4, seed=0, resample=3)
    src = _source(model, tok, task, s)
    val = task.items("val")
    before = evaluate_task(src.engine, tok, task, val, max_tokens=4, use_tools=False)
    t = _trainer(model, src, s, lr=1e-2, steps=25)
    rewards = [t.train_step()["reward"] for _ in range(25)]
    after = evaluate_task(src.engine, tok, task, val, max_tokens=4, use_tools=False, k=4)
    assert before["pass@1"] <= 0.25, before
    assert after["pass@1"] == 1.0, (after, rewards)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, rewards


# ----------------------------------------------------------------------------------------------
# The stage


@pytest.fixture(scope="module")
def real_tok(shared_data):
    return real_tokenizer(str(shared_data))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, real_tok):
    """runs/r/sft/checkpoint: a random depth-1 GPT with the real tokenizer, marked done."""
    from chatforge.checkpoint import save_checkpoint
    from chatforge.common import write_json

    root = tmp_path_factory.mktemp("rl")
    tok_dir = root / "tok"
    real_tok.save(tok_dir)
    sft = root / "runs" / "r" / "sft"
    save_checkpoint(sft / "checkpoint", small_gpt(real_tok.vocab_size), tokenizer_dir=tok_dir, meta={"stage": "sft"})
    write_json(sft / "DONE", {"stage": "sft"})
    return root


def _cfg(root, shared, run="r", **kw) -> RlConfig:
    base = dict(run=run, runs_dir=str(root / "runs"), data_dir=str(shared), threads=1, task="digit",
                prompts_per_step=2, group_size=4, max_tokens=8, device_batch_size=4, num_steps=4, eval_items=4,
                eval_k=2, gsm8k_items=2, gsm8k_max_tokens=8, eval_every=2, checkpoint_every=2, use_tools=False,
                lr_frac=1.0)
    base.update(kw)
    return RlConfig(**base)


def _share(root, run):
    dst = root / "runs" / run / "sft"
    if not dst.exists():
        shutil.copytree(root / "runs" / "r" / "sft", dst)


@pytest.mark.slow
def test_rl_stage_runs_and_resumes_exactly(sft_run, shared_data):
    """The stage end to end (artifacts, metrics, before/after), a rerun is a no-op, and a run stopped
    after its step-2 checkpoint and resumed ends with the weights of the uninterrupted 4-step run."""
    from chatforge.stages import rl

    from chatforge.tasks.rl import REGISTERED, register_task

    root = sft_run
    register_task("digit", digit_task)  # a task of one's own, with a reward the random model sometimes earns
    try:
        _stage_runs_and_resumes(root, shared_data, rl)
    finally:
        REGISTERED.pop("digit")


def _stage_runs_and_resumes(root, shared_data, rl):
    from safetensors.torch import load_file

    from chatforge.checkpoint import load_checkpoint

    s = rl.run(_cfg(root, shared_data, gsm8k_items=2))
    out = root / "runs" / "r" / "rl"
    for f in ("DONE", "summary.json", "metrics.jsonl", "reward.png", "before.json", "checkpoint/model.safetensors"):
        assert (out / f).exists(), f
    _, info = load_checkpoint(out / "checkpoint")
    assert info["config"]["stage"] == "rl" and info["config"]["step"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("reward", "correct", "response_length", "entropy", "clip_fraction", "pg_loss"):
        assert all(key in r for r in steps), key
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4] and all("pass@1" in r and "pass@k" in r for r in evals)
    assert evals[0]["pass@1"] == s["before"]["pass@1"]  # the curve starts at the source's score
    for key in ("before", "after", "before_gsm8k", "after_gsm8k"):
        assert 0 <= s[key]["pass@1"] <= 1 and s[key]["pass@1_low"] <= s[key]["pass@1"] <= s[key]["pass@1_high"]
    assert s["after"]["n"] == 4 and s["after_gsm8k"]["n"] == 2
    # every sampled reply scored and its reason counted (a rollout whose groups all tie is sampled again)
    assert s["rollouts"] >= 4 and sum(s["reward_reasons"].values()) == s["rollouts"] * 2 * 4
    assert rl.run(_cfg(root, shared_data))["steps"] == 4  # complete: a no-op

    _share(root, "split")
    rl.run(_cfg(root, shared_data, "split", num_steps=2))
    (root / "runs" / "split" / "rl" / "DONE").unlink()  # as if stopped after the step-2 checkpoint
    s2 = rl.run(_cfg(root, shared_data, "split"))
    assert s2["steps"] == 4 and "before" in s2  # the first run's measurement is kept
    a = load_file(out / "checkpoint" / "model.safetensors")
    b = load_file(root / "runs" / "split" / "rl" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    src = load_file(root / "runs" / "r" / "sft" / "checkpoint" / "model.safetensors")
    assert any(not torch.equal(a[k], src[k]) for k in src)


def test_rl_bad_settings_and_inputs(sft_run, shared_data, tmp_path):
    from chatforge.stages import rl

    root = sft_run
    with pytest.raises(ConfigError, match="--group_size"):
        rl.run(_cfg(root, shared_data, group_size=1))
    with pytest.raises(ConfigError, match="--epochs"):
        rl.run(_cfg(root, shared_data, epochs=2, loss_type="no_baseline"))
    with pytest.raises(ChatforgeError, match="unknown RL task"):
        rl.run(_cfg(root, shared_data, "bad", task="nosuch", source=str(root / "runs/r/sft/checkpoint")))
    with pytest.raises(ChatforgeError, match="stage 'sft'"):
        rl.run(_cfg(root, shared_data, "nosft"))
    # a task file with broken records: they are skipped and counted, the good ones train
    f = tmp_path / "tasks.jsonl"
    good = [json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(10)]
    f.write_text("\n".join(good + ["not json", json.dumps({"question": "no answer"}), "[1, 2]"]) + "\n")
    s = rl.run(_cfg(root, shared_data, "file", task="arithmetic1", task_file=str(f), num_steps=1, eval_every=0,
                    checkpoint_every=0, gsm8k_items=0, eval_k=0, source=str(root / "runs/r/sft/checkpoint")))
    assert s["train_items"] == 8 and s["eval_items"] == 2 and s["steps"] == 1


@pytest.mark.slow
def test_rl_stage_under_torchrun(sft_run, shared_data):
    """Two gloo processes: each rank samples its own prompts (its own seed), gradients are averaged,
    rank 0 evaluates and writes the checkpoint, which loads on one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from chatforge.checkpoint import load_checkpoint

    root = sft_run
    _share(root, "two")
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "chatforge",
           "--", "rl", "--run", "two", "--runs_dir", str(root / "runs"), "--data_dir", str(shared_data), "--task",
           "arithmetic1", "--prompts_per_step", "2", "--group_size", "4", "--max_tokens", "6", "--num_steps", "2",
           "--eval_items", "2", "--eval_k", "0", "--gsm8k_items", "0", "--use_tools", "false", "--threads", "1"]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = root / "runs" / "two" / "rl"
    _, info = load_checkpoint(out / "checkpoint")
    assert info["train_state"]["world_size"] == 2 and info["config"]["step"] == 2
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "reward" in r and "event" not in r] == [1, 2]
