"""GRPO building blocks (chatforge/losses.py, "Policy gradient (GRPO)") on small tensors against values
computed by hand: group-normalised rewards, the naive and clipped policy-gradient losses, the k3 KL,
the dispatcher, and one micro-batch step with gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from chatforge.losses import (compute_group_normalized_rewards, compute_grpo_clip_loss, compute_kl_k3,
                              compute_naive_policy_gradient_loss, compute_policy_gradient_loss,
                              grpo_microbatch_train_step, masked_mean)
from sft_helpers import one_thread  # noqa: F401  (autouse fixture)


def close(t, expected):
    torch.testing.assert_close(t.detach().float(), torch.tensor(expected, dtype=torch.float32))
    return True


def exact(reply, truth):
    return (float(reply == truth), "correct" if reply == truth else "wrong")


def test_group_normalized_rewards_by_hand():
    # two groups of 3: rewards [1, 0, 0] and [1, 1, 0]
    responses = ["a", "x", "y", "b", "b", "z"]
    truths = ["a", "a", "a", "b", "b", "b"]
    adv, raw, meta = compute_group_normalized_rewards(exact, responses, truths, 3, 1e-6, normalize_by_std=False)
    assert raw.tolist() == [1, 0, 0, 1, 1, 0]
    # group means 1/3 and 2/3
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3])
    # unbiased std of [1, 0, 0]: sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3) = 0.57735; the same for [1, 1, 0]
    adv, _, meta = compute_group_normalized_rewards(exact, responses, truths, 3, 1e-6, normalize_by_std=True)
    s = math.sqrt(1 / 3) + 1e-6
    assert adv.tolist() == pytest.approx([2 / 3 / s, -1 / 3 / s, -1 / 3 / s, 1 / 3 / s, 1 / 3 / s, -2 / 3 / s])
    assert meta["keep"].tolist() == [True] * 6 and meta["groups_dropped"] == 0
    assert meta["reasons"] == {"correct": 3, "wrong": 3}
    assert meta["reward_mean"] == pytest.approx(0.5) and meta["reward_max"] == 1 and meta["reward_min"] == 0


def test_equal_reward_groups_are_dropped_and_have_zero_advantage():
    # group 0 all right, group 1 all wrong, group 2 mixed; the std division must not make 0/0 = nan
    adv, raw, meta = compute_group_normalized_rewards(lambda r, g: float(r), [1, 1, 0, 0, 1, 0], [None] * 6, 2,
                                                      normalize_by_std=True)
    assert meta["keep"].tolist() == [False, False, False, False, True, True]
    assert meta["groups_dropped"] == 2
    assert adv[:4].tolist() == [0, 0, 0, 0] and torch.isfinite(adv).all()
    # std of [1, 0] (unbiased) is sqrt(0.5); advantages +-0.5 / (sqrt(0.5) + eps)
    assert adv[4:].tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6)])
    # reward functions may return a dict, and a group of one sample has no spread (no nan)
    adv, raw, meta = compute_group_normalized_rewards(lambda r, g: {"reward": 2.0}, ["a"], ["b"], 1)
    assert adv.tolist() == [0.0] and raw.tolist() == [2.0] and meta["groups_dropped"] == 1
    with pytest.raises(ValueError, match="groups of 4"):
        compute_group_normalized_rewards(exact, ["a"] * 6, ["a"] * 6, 4)


def test_naive_policy_gradient_loss_and_its_gradient():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    a = torch.tensor([[2.0], [-1.0]])
    loss = compute_naive_policy_gradient_loss(a, logp)
    assert close(loss, [[2.0, 4.0], [-0.5, -0.1]])
    loss.sum().backward()
    assert logp.grad.tolist() == [[-2.0, -2.0], [1.0, 1.0]]  # d(-A logp)/dlogp = -A


def test_grpo_clip_loss_by_hand_and_gradients_on_clipped_tokens():
    eps = 0.2
    old = torch.zeros(2, 3)
    # ratios exp(logp - old): row 0 (A = +1): 1.5 (clipped at 1.2), 1.1 (inside), 0.5 (below: not clipped for A > 0)
    #                         row 1 (A = -1): 1.5 (not clipped for A < 0), 0.9 (inside), 0.5 (clipped at 0.8)
    ratios = torch.tensor([[1.5, 1.1, 0.5], [1.5, 0.9, 0.5]])
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([[1.0], [-1.0]])
    loss, meta = compute_grpo_clip_loss(adv, logp, old, eps)
    expected = [[-1.2, -1.1, -0.5], [1.5, 0.9, 0.8]]  # -min(r A, clip(r) A)
    assert close(loss, expected)
    assert meta["clipped"].tolist() == [[True, False, False], [False, False, True]]
    assert close(meta["ratio"], ratios.tolist())
    loss.sum().backward()
    # unclipped token: d(-r A)/dlogp = -r A (r = e^(logp - old)); clipped token: 0
    assert close(logp.grad, [[0.0, -1.1, -0.5], [1.5, 0.9, 0.0]])


def test_kl_k3_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.3]])
    ref = torch.tensor([[-1.0, -1.0, -2.3]])
    kl = compute_kl_k3(logp, ref)
    # d = ref - logp = [0, 1, -2]: e^d - d - 1 = [0, e - 2, e^-2 + 1]
    assert close(kl, [[0.0, math.e - 2, math.exp(-2) + 1]])
    assert (compute_kl_k3(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()


def test_policy_gradient_loss_dispatch():
    logp = torch.tensor([[-1.0, -2.0]])
    raw, adv = torch.tensor([[3.0]]), torch.tensor([[0.5]])
    loss, meta = compute_policy_gradient_loss(logp, "no_baseline", raw_rewards=raw)
    assert loss.tolist() == [[3.0, 6.0]] and meta == {}
    loss, _ = compute_policy_gradient_loss(logp, "reinforce_with_baseline", raw_rewards=raw, advantages=adv)
    assert loss.tolist() == [[0.5, 1.0]]
    loss, meta = compute_policy_gradient_loss(logp, "grpo_clip", advantages=adv, old_log_probs=logp, cliprange=0.2)
    assert loss.tolist() == [[-0.5, -0.5]] and meta["clipped"].tolist() == [[False, False]]  # ratio 1
    with pytest.raises(ValueError, match="needs old_log_probs"):
        compute_policy_gradient_loss(logp, "grpo_clip", advantages=adv, cliprange=0.2)
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        compute_policy_gradient_loss(logp, "ppo", advantages=adv)


def test_microbatch_step_token_level_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([[1.0], [-2.0]])
    loss, meta = grpo_microbatch_train_step(logp, mask, 2, "reinforce_with_baseline", advantages=adv)
    # per token -A logp: [1, 2, .] and [-8, ., .]; token-level mean (1 + 2 - 8) / 3 = -5/3; / 2 accumulation
    assert meta["loss"].item() == pytest.approx(-5 / 3) and loss.item() == pytest.approx(-5 / 6)
    assert meta["response_tokens"].item() == 3
    assert close(logp.grad, [[-1 / 6, -1 / 6, 0.0], [2 / 6, 0.0, 0.0]])
    # with a KL term: k3 at d = ref - logp
    logp2 = logp.detach().clone().requires_grad_(True)
    ref = logp.detach() + torch.tensor([[1.0, 0.0, 5.0], [-1.0, 0.0, 0.0]])
    loss, meta = grpo_microbatch_train_step(logp2, mask, 1, "reinforce_with_baseline", advantages=adv, kl_coef=0.1,
                                            ref_log_probs=ref)
    k1, k2 = math.e - 2, math.exp(-1)  # d = 1 and d = -1 (d = 0 gives 0; the masked d = 5 must not count)
    assert meta["kl"].item() == pytest.approx((k1 + k2) / 3)
    assert meta["loss"].item() == pytest.approx(-5 / 3 + 0.1 * (k1 + k2) / 3)
    assert meta["pg_loss"].item() == pytest.approx(-5 / 3)
    with pytest.raises(ValueError, match="needs ref_log_probs"):
        grpo_microbatch_train_step(logp2.detach(), mask, 1, "no_baseline", raw_rewards=adv, kl_coef=0.1)


def test_microbatch_step_clip_fraction_and_empty_mask():
    logp = torch.tensor([[math.log(1.5), 0.0]], requires_grad=True)
    _, meta = grpo_microbatch_train_step(logp, torch.tensor([[1, 1]]), 1, "grpo_clip", advantages=torch.tensor([[1.0]]),
                                         old_log_probs=torch.zeros(1, 2), cliprange=0.2)
    assert meta["clip_fraction"].item() == pytest.approx(0.5)
    # no response token at all: loss 0 and zero gradient, not nan
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, meta = grpo_microbatch_train_step(logp, torch.zeros(1, 2), 1, "no_baseline", raw_rewards=torch.ones(1, 1))
    assert loss.item() == 0.0 and logp.grad.tolist() == [[0.0, 0.0]] and meta["response_tokens"].item() == 0


@pytest.mark.parametrize("loss_type", ["reinforce_with_baseline", "grpo_clip"])
def test_two_accumulated_microbatches_equal_one_batch(loss_type):
    """Gradients of a real (tiny) policy: two micro-batches with gradient_accumulation_steps=2 give the
    gradient of one step over both (token-level with equal token counts, and a constant normaliser with
    any counts), and a KL term to a reference."""
    torch.manual_seed(0)
    B, T, V = 4, 5, 7
    lin = torch.nn.Linear(V, V)
    x = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    adv = torch.randn(B, 1)
    old = torch.randn(B, T) * 0.1 - 2.0
    ref = torch.randn(B, T) * 0.1 - 2.0

    def logp(rows):
        return torch.log_softmax(lin(x[rows]), -1).gather(-1, labels[rows, :, None]).squeeze(-1)

    def grads(masks, groups, c):
        lin.zero_grad()
        for rows in groups:
            grpo_microbatch_train_step(logp(rows), masks[rows], len(groups), loss_type, advantages=adv[rows],
                                       old_log_probs=old[rows], cliprange=0.2, kl_coef=0.05, ref_log_probs=ref[rows],
                                       normalize_constant=c)
        return [p.grad.clone() for p in lin.parameters()]

    equal = torch.tensor([[1, 1, 1, 0, 0]] * 2 + [[1, 0, 1, 1, 0]] * 2)  # 6 tokens in each half
    ragged = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
    halves = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    whole = [torch.arange(B)]
    for mask, c in ((equal, None), (ragged, 3.0)):
        for g1, g2 in zip(grads(mask, halves, c), grads(mask, whole, c)):
            torch.testing.assert_close(g1, g2)
    # and the token-level whole-batch loss is the masked mean of the per-token loss (reference formula)
    per_token, _ = compute_policy_gradient_loss(logp(whole[0]), loss_type, advantages=adv, old_log_probs=old,
                                                cliprange=0.2)
    per_token = per_token + 0.05 * compute_kl_k3(logp(whole[0]), ref)
    loss, _ = grpo_microbatch_train_step(logp(whole[0]), ragged, 1, loss_type, advantages=adv, old_log_probs=old,
                                         cliprange=0.2, kl_coef=0.05, ref_log_probs=ref, backward=False)
    torch.testing.assert_close(loss, masked_mean(per_token, ragged))
