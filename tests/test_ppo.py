"""PPO (chatforge/ppo.py): GAE, whitening, the KL-penalised reward and the clipped policy and value losses
against hand computations; the value head; PPO steps through the shared Trainer with an exact resume; the
LoRA reference (adapters off); and `chatforge rlhf ppo` end to end on a tiny random checkpoint."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch

from chatforge.engine import Engine
from chatforge.ppo import PolicyWithValue, PpoSettings, PpoSource, ValueCheckpointer, clipped_policy_loss, \
    clipped_value_loss, gae, kl_penalized_rewards, ppo_loss, ppo_optimizer, whiten, with_value_head
from chatforge.train_loop import LoopConfig, Trainer
from rl_helpers import digit_task, small_gpt
from sft_helpers import one_thread, real_tokenizer  # noqa: F401  (one_thread: an autouse fixture)



@pytest.fixture(scope="module")
def tok(shared_data):
    return real_tokenizer(str(shared_data))


# ----------------------------------------------------------------------------------------------
# The math, by hand


def test_gae_by_hand_with_padding_and_a_gap():
    # row 0: prompt token, three reply tokens, right padding; row 1: a gap (tool output) inside the reply
    rewards = torch.tensor([[9.0, 0.1, -0.2, 1.0, 7.0], [0.0, 0.5, 99.0, 2.0, 99.0]])
    values = torch.tensor([[5.0, 0.5, 0.4, 0.3, 9.0], [0.2, 0.1, 99.0, 0.3, 99.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0, backwards: d3 = 1 - 0.3 = 0.7; d2 = -0.2 + 0.9*0.3 - 0.4 = -0.33, A2 = -0.33 + 0.72*0.7 = 0.174;
    # d1 = 0.1 + 0.9*0.4 - 0.5 = -0.04, A1 = -0.04 + 0.72*0.174 = 0.08528
    # row 1 (position 2 skipped): A3 = 2 - 0.3 = 1.7; d1 = 0.5 + 0.9*0.3 - 0.1 = 0.67, A1 = 0.67 + 0.72*1.7 = 1.894;
    # d0 = 0 + 0.9*0.1 - 0.2 = -0.11, A0 = -0.11 + 0.72*1.894 = 1.25368
    want = torch.tensor([[0.0, 0.08528, 0.174, 0.7, 0.0], [1.25368, 1.894, 0.0, 1.7, 0.0]])
    assert torch.allclose(adv, want, atol=1e-6)
    assert torch.allclose(ret, torch.where(mask, want + values, torch.zeros(())), atol=1e-6)
    # gamma = lam = 1: the advantage is the reward still to come minus the value (Monte Carlo)
    a1, r1 = gae(rewards[:1], values[:1], mask[:1], 1.0, 1.0)
    assert torch.allclose(a1, torch.tensor([[0.0, 0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.3, 0.0]]), atol=1e-6)
    assert torch.allclose(r1, torch.tensor([[0.0, 0.9, 0.8, 1.0, 0.0]]), atol=1e-6)
    # lam = 0: one-step TD errors
    a0, _ = gae(rewards[:1], values[:1], mask[:1], 1.0, 0.0)
    assert torch.allclose(a0, torch.tensor([[0.0, 0.1 + 0.4 - 0.5, -0.2 + 0.3 - 0.4, 0.7, 0.0]]), atol=1e-6)


def test_whiten_by_hand():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # reply tokens 1, 3, 5: mean 3, population variance 8/3
    s = math.sqrt(8 / 3)
    assert torch.allclose(whiten(x, m), torch.tensor([[-2 / s, 0.0, 0.0], [2 / s, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(whiten(x, m, shift_mean=False), torch.tensor([[3 - 2 / s, 3.0, 0.0], [3 + 2 / s, 0.0, 0.0]]),
                          atol=1e-6)


def test_kl_penalty_goes_into_the_reward():
    logp = torch.tensor([[-5.0, -1.0, -2.0, -0.5, -9.0], [-1.0, -1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.0, -1.5, -1.0, -0.5, -1.0], [-2.0, -2.0, -2.0, -2.0, -2.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)  # row 1: no reply token
    rewards, kl = kl_penalized_rewards(logp, ref, mask, torch.tensor([3.0, 4.0]), kl_coef=0.1)
    # row 0: kl = logp - ref on reply tokens = (0.5, -1, 0); reward = -0.1 * kl, the score 3 on the last reply token
    assert torch.allclose(kl[0], torch.tensor([0.0, 0.5, -1.0, 0.0, 0.0]))
    assert torch.allclose(rewards[0], torch.tensor([0.0, -0.05, 0.1, 3.0, 0.0]))
    assert torch.equal(rewards[1], torch.zeros(5)) and torch.equal(kl[1], torch.zeros(5))
    # kl_coef 0: only the score
    r0, _ = kl_penalized_rewards(logp, ref, mask, torch.tensor([3.0, 4.0]), 0.0)
    assert torch.equal(r0[0], torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0]))


def test_clipped_policy_loss_by_hand():
    adv = torch.tensor([[2.0, 2.0, -1.0, 5.0]])
    old = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    logp = torch.tensor([[0.1, 0.5, -0.5, 3.0]], requires_grad=True)
    loss, frac = clipped_policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: ratio e^0.1 = 1.105 inside [0.8, 1.2]: -ratio * A (not clipped)
    # token 1: ratio e^0.5 = 1.649 > 1.2 with A > 0: the clipped -1.2 * 2 wins (no gradient)
    # token 2: ratio e^-0.5 = 0.607 < 0.8 with A < 0: the clipped -0.8 * -1 = 0.8 wins (no gradient)
    # token 3: masked out
    want = (-math.exp(0.1) * 2 - 2.4 + 0.8) / 3
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    assert float(frac) == pytest.approx(2 / 3)
    loss.backward()
    assert logp.grad[0, 0] == pytest.approx(-math.exp(0.1) * 2 / 3, rel=1e-5)
    assert logp.grad[0, 1:].abs().sum() == 0
    # on-policy (ratio 1): the loss is -mean(A), nothing clipped; denom replaces the token count
    l1, f1 = clipped_policy_loss(old, old, adv, mask, clip=0.2, denom=6.0)
    assert float(l1) == pytest.approx(-(2 + 2 - 1) / 6) and float(f1) == 0.0


def test_clipped_value_loss_by_hand():
    old = torch.ones(1, 4)
    ret = torch.full((1, 4), 2.0)
    mask = torch.tensor([[1, 1, 1, 0]])
    v = torch.tensor([[1.1, 1.5, 0.5, 7.0]], requires_grad=True)
    loss, frac = clipped_value_loss(v, old, ret, mask, clip=0.2)
    # v 1.1: inside old +- 0.2, 0.5 * 0.9^2 = 0.405
    # v 1.5: clipped to 1.2, whose error 0.8 is larger than 0.5: 0.5 * 0.64 = 0.32, clipped (no gradient)
    # v 0.5: moved away from the target; clipped 0.8 errs less than 0.5 does: 0.5 * 1.5^2 = 1.125, the gradient flows
    assert float(loss.detach()) == pytest.approx((0.405 + 0.32 + 1.125) / 3, rel=1e-6)
    assert float(frac) == pytest.approx(1 / 3)
    loss.backward()
    assert v.grad[0, 0] == pytest.approx((1.1 - 2) / 3, rel=1e-5) and v.grad[0, 1] == 0
    assert v.grad[0, 2] == pytest.approx((0.5 - 2) / 3, rel=1e-5) and v.grad[0, 3] == 0


# ----------------------------------------------------------------------------------------------
# The value head and PPO through the shared loop


def test_value_head_shapes_and_start(tok):
    gpt = small_gpt(tok.vocab_size)
    model = PolicyWithValue(gpt)
    ids = torch.randint(0, tok.vocab_size, (3, 7))
    logits, values = model(ids, values=True)
    assert logits.shape == (3, 7, tok.vocab_size) and values.shape == (3, 7) and values.dtype == torch.float32
    assert torch.allclose(logits, gpt(ids), atol=1e-6)  # the same forward as the policy's own
    assert torch.equal(model(ids), gpt(ids))
    assert torch.equal(values, torch.zeros(3, 7))  # zero init
    values.sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def _ppo(model, tok, task, settings, ref, steps, lr=3e-3):
    """(trainer, source): PPO of PolicyWithValue `model` on `task` through train_loop.Trainer."""
    src = PpoSource(Engine(model.backbone, tok, tools={}), tok, task, task.items("train"), settings, policy=model,
                    ref_model=ref)
    opt = ppo_optimizer(torch.optim.AdamW(model.backbone.parameters(), lr=lr), model, value_lr=1e-2)
    t = Trainer(model, opt, ppo_loss(settings), src, LoopConfig(num_steps=steps, grad_accum=settings.micro_batches),
                say=lambda s: None)
    return t, src


def test_ppo_steps_through_the_trainer(tok):
    """One rollout gives `epochs` optimizer steps: the first on-policy (ratio 1: nothing clipped, approx KL 0,
    KL to the reference 0), later ones off it; the value head learns; the engine samples with the trained weights."""
    task = digit_task()
    model = with_value_head(small_gpt(tok.vocab_size))
    ref = copy.deepcopy(model.backbone).eval().requires_grad_(False)
    s = PpoSettings(prompts=3, group_size=2, micro_batches=2, epochs=2, max_tokens=6, seed=1, kl_coef=0.1)
    t, src = _ppo(model, tok, task, s, ref, steps=4, lr=3e-2)
    r1 = t.train_step()
    assert src.rollouts == 1 and len(src.queue) == 2  # the second epoch's two micro-batches wait
    assert r1["clip_fraction"] == 0.0 and r1["approx_kl"] == 0.0 and r1["kl"] == pytest.approx(0.0, abs=1e-6)
    for k in ("reward", "vf_loss", "pg_loss", "value_mean", "return_mean", "entropy", "non_score_reward"):
        assert math.isfinite(r1[k]), k
    r2 = t.train_step()
    assert src.rollouts == 1 and r2["approx_kl"] > 0  # the same rollout, the policy moved
    assert float(model.head.weight.detach().abs().sum()) > 0
    t.train_step()
    assert src.rollouts == 2 and t.train_step()["kl"] > 0  # a new rollout from the moved policy: KL to the start


def test_ppo_resumes_exactly(tok, tmp_path):
    """Stopped mid-rollout (step 2 of a rollout's 3) and resumed from its checkpoint: the same weights,
    value head and optimizer path as the uninterrupted run."""
    from chatforge.checkpoint import load_checkpoint

    task = digit_task()
    start = small_gpt(tok.vocab_size)
    s = PpoSettings(prompts=2, group_size=2, micro_batches=1, epochs=3, max_tokens=5, seed=3, kl_coef=0.05)

    def ref():
        return copy.deepcopy(start).eval().requires_grad_(False)

    full = with_value_head(copy.deepcopy(start))
    t, _ = _ppo(full, tok, task, s, ref(), steps=6)
    t.run()

    part = with_value_head(copy.deepcopy(start))
    t, _ = _ppo(part, tok, task, s, ref(), steps=2)
    t.checkpointer = ValueCheckpointer(tmp_path / "ck")
    t.run()
    assert (tmp_path / "ck" / "value_head.safetensors").exists()
    gpt, info = load_checkpoint(tmp_path / "ck")
    resumed = with_value_head(gpt, tmp_path / "ck")
    t, src = _ppo(resumed, tok, task, s, ref(), steps=6)
    t.resume(info)
    assert len(src.queue) == 1  # the rest of the interrupted rollout
    t.run()
    a, b = full.state_dict(), resumed.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(full.head.weight, torch.zeros_like(full.head.weight))


def test_lora_reference_is_the_base_with_adapters_off(tok):
    """With LoRA the KL reference is the policy with its adapters off: the rollout's KL and advantages are
    those a frozen copy of the base model gives, and the adapters are on again afterwards."""
    from chatforge.lora import AdaptersOff, apply_lora, lora_parameters

    task = digit_task()
    base = small_gpt(tok.vocab_size)
    policy = copy.deepcopy(base)
    apply_lora(policy, 4, 16.0, 0.0, ["c_q", "c_v", "mlp.c_proj"])
    model = with_value_head(policy)
    s = PpoSettings(prompts=2, group_size=2, epochs=1, max_tokens=5, seed=4, kl_coef=0.1)
    t, src = _ppo(model, tok, task, s, AdaptersOff(policy), steps=1)
    r = t.train_step()
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0: the adapted model is the base
    with torch.no_grad():
        for p in lora_parameters(policy):
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, tok.vocab_size, (2, 6))
    before = policy(ids)
    off = PpoSource(src.engine, tok, task, task.items("train"), s, policy=model, ref_model=AdaptersOff(policy))
    copy_ref = PpoSource(src.engine, tok, task, task.items("train"), s, policy=model,
                         ref_model=base.eval().requires_grad_(False))
    for x in (off, copy_ref):
        x.rollouts = 5  # the same sampling seed for both
        x._new_rollout()
    assert off.last["kl"] > 1e-4 and off.last["kl"] == pytest.approx(copy_ref.last["kl"], rel=1e-5)
    assert torch.allclose(off.queue[0]["advantages"], copy_ref.queue[0]["advantages"], atol=1e-5)
    assert torch.equal(policy(ids), before)  # adapters on again


@pytest.mark.slow
def test_ppo_learns_a_known_rule(tok):
    """Controlled experiment (GRPO's in test_grpo.py, with PPO): the reward is 1 when the reply holds a digit.
    A near-uniform random policy rarely writes one; after PPO the greedy replies to held-out prompts do."""
    from chatforge.grpo import evaluate_task

    task = digit_task()
    model = with_value_head(small_gpt(tok.vocab_size, depth=2))
    s = PpoSettings(prompts=6, group_size=8, epochs=2, max_tokens=4, seed=0)
    t, src = _ppo(model, tok, task, s, None, steps=50, lr=1e-2)
    val = task.items("val")
    before = evaluate_task(src.engine, tok, task, val, max_tokens=4, use_tools=False)
    rewards = [t.train_step()["reward"] for _ in range(50)]
    after = evaluate_task(src.engine, tok, task, val, max_tokens=4, use_tools=False)
    assert before["pass@1"] <= 0.25, before
    assert after["pass@1"] == 1.0, (after, rewards)
    assert sum(rewards[-10:]) / 10 > sum(rewards[:10]) / 10 + 0.3, rewards


def test_monitor_says_whether_the_judge_and_the_reward_model_agree():
    from chatforge.rlhf_grpo import HackingMonitor

    m = HackingMonitor(patience=9)
    for step, rm, judge in [(0, 0.2, 0.4), (10, 1.4, 1.2), (20, 2.0, 0.5)]:
        m.update(step, rm, judge)
    assert m.describe().startswith("they disagree: after step 10 the reward model rose (1.400 -> 2.000) while the "
                                   "judge fell (1.200 -> 0.500)")
    m = HackingMonitor()
    for step, rm, judge in [(0, 0.2, 0.4), (10, 1.4, 1.2)]:
        m.update(step, rm, judge)
    assert m.describe().startswith("they agree")
    m.update(20, 1.0, 1.0)  # both fell: not hacking
    assert m.describe().startswith("no divergence") and HackingMonitor().describe() == "no evaluation"


# ----------------------------------------------------------------------------------------------
# `chatforge rlhf ppo` end to end


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tok, shared_data):
    """runs/r: a random depth-1 GPT (context 128) with the real tokenizer as its sft stage, and a reward
    model and judge (a few steps on polite pairs) trained by `rlhf rm` / `rlhf judge`."""
    from chatforge.checkpoint import save_checkpoint
    from chatforge.common import write_json
    from chatforge.stages import rlhf

    root = tmp_path_factory.mktemp("ppo")
    tok.save(root / "tok")
    sft = root / "runs" / "r" / "sft"
    save_checkpoint(sft / "checkpoint", small_gpt(tok.vocab_size), tokenizer_dir=root / "tok", meta={"stage": "sft"})
    write_json(sft / "DONE", {"stage": "sft"})
    for action in ("rm", "judge"):
        rlhf.run(_cfg(root, shared_data, action=action))
    return root


def _cfg(root, shared, run="r", **kw):
    from chatforge.config import RlhfConfig

    base = dict(run=run, runs_dir=str(root / "runs"), data_dir=str(shared), threads=1, rm_data=["polite"],
                train_pairs=100, eval_pairs=20, controlled_pairs=300, batch_size=8, rm_steps=4, rm_lr=3e-3, lr_frac=1.0,
                grpo_data=["polite"], ppo_steps=2, ppo_epochs=2, prompts_per_step=2, group_size=2, max_tokens=8,
                eval_every=1, eval_prompts=3, checkpoint_every=1, warmdown_ratio=0.0)
    base.update(kw)
    return RlhfConfig(**base)


def _copy_run(root, run):
    dst = root / "runs" / run
    for part in ("sft", "rlhf/rm", "rlhf/judge"):
        if not (dst / part).exists():
            shutil.copytree(root / "runs" / "r" / part, dst / part)


def test_rlhf_ppo_stage_runs_and_resumes_exactly(run_root, shared_data):
    from safetensors.torch import load_file

    from chatforge.checkpoint import load_checkpoint
    from chatforge.stages import rlhf

    root = run_root
    s = rlhf.run(_cfg(root, shared_data, action="ppo"))["ppo"]
    out = root / "runs" / "r" / "rlhf" / "ppo"
    for f in ("DONE", "summary.json", "metrics.jsonl", "monitor.json", "hacking.png", "best/model.safetensors",
              "checkpoint/model.safetensors", "checkpoint/value_head.safetensors"):
        assert (out / f).exists(), f
    assert s["algo"] == "ppo" and s["steps"] == 4 and s["rollouts"] == 2 and s["optimizer_steps_per_rollout"] == 2
    assert [h["step"] for h in s["monitor"]["history"]] == [0, 2, 4]  # --eval_every counts rollouts
    assert s["judge_vs_rm"].startswith(("they agree", "they disagree", "no divergence"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for k in ("reward", "kl", "vf_loss", "pg_loss", "clip_fraction", "approx_kl", "tokens_per_s"):
        assert all(k in r for r in steps), k
    assert all("judge_score" in r and "rm_score" in r for r in records if r.get("event") == "eval")
    _, info = load_checkpoint(out / "checkpoint")  # the policy alone loads as a plain GPT
    assert info["config"]["action"] == "ppo"
    assert rlhf.run(_cfg(root, shared_data, action="ppo"))["ppo"]["steps"] == 4  # complete: a no-op

    # stopped after the first rollout's checkpoint and resumed: the uninterrupted run's weights and value head
    _copy_run(root, "split")
    rlhf.run(_cfg(root, shared_data, "split", action="ppo", ppo_steps=1))
    (root / "runs" / "split" / "rlhf" / "ppo" / "DONE").unlink()
    s2 = rlhf.run(_cfg(root, shared_data, "split", action="ppo"))["ppo"]
    assert s2["steps"] == 4
    for f in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(out / "checkpoint" / f), load_file(root / "runs" / "split" / "rlhf" / "ppo" / "checkpoint" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f


def test_rlhf_ppo_bad_settings(tmp_path):
    from chatforge.config import ConfigError
    from chatforge.stages import rlhf

    for bad, flag in ((dict(ppo_epochs=0), "--ppo_epochs"), (dict(lam=1.5), "--lam"), (dict(gamma=-1), "--lam"),
                      (dict(clip=0), "--value_lr"), (dict(vf_coef=-0.1), "--vf_coef"), (dict(ppo_steps=-1), "--ppo_steps")):
        with pytest.raises(ConfigError, match=flag):
            rlhf.run(_cfg(tmp_path, tmp_path, action="ppo", **bad))


def test_rlhf_ppo_with_lora_and_a_kl_budget(run_root, shared_data):
    from safetensors.torch import load_file

    from chatforge.stages import rlhf

    root = run_root
    _copy_run(root, "lora")
    s = rlhf.run(_cfg(root, shared_data, "lora", action="ppo", lora_rank=4, lora_lr=3e-2))["ppo"]
    ck = root / "runs" / "lora" / "rlhf" / "ppo" / "checkpoint"
    assert (ck / "lora_adapters.safetensors").exists() and (ck / "value_head.safetensors").exists()
    records = [json.loads(x) for x in (ck.parent / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in records if "loss" in r and "event" not in r]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0  # the adapters-off base is the reference
    assert s["steps"] == 4
    # LoRA resumes exactly too: the source weights + the saved adapters, the value head, the optimizer
    _copy_run(root, "lora_split")
    lora = dict(action="ppo", lora_rank=4, lora_lr=3e-2)
    rlhf.run(_cfg(root, shared_data, "lora_split", ppo_steps=1, **lora))
    (root / "runs" / "lora_split" / "rlhf" / "ppo" / "DONE").unlink()
    rlhf.run(_cfg(root, shared_data, "lora_split", **lora))
    for f in ("model.safetensors", "value_head.safetensors", "lora_adapters.safetensors"):
        a, b = load_file(ck / f), load_file(root / "runs" / "lora_split" / "rlhf" / "ppo" / "checkpoint" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    # a budget the first rollout's update exceeds: stop after one more step
    s = rlhf.run(_cfg(root, shared_data, "lora", action="ppo", lora_rank=4, lora_lr=3e-2, force=True, ppo_steps=3,
                      kl_budget=1e-12))["ppo"]
    assert s["stopped_early"] and s["steps"] == 5
