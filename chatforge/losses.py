"""Losses for post-training, as small public functions on tensors: SFT's, and RL's policy-gradient
losses (GRPO, section "Policy gradient (GRPO)" at the end).

The building blocks follow the decomposition of Stanford CS336 assignment 5 (alignment), which is also
how TRL and verl structure SFT / GRPO: tokenize (prompt, response) pairs into ids, shifted labels and a
response mask; take the per-token log-probability of each label under the model (and the entropy of
the model's distribution); reduce with a masked mean or a masked sum over a constant; one micro-batch
step scales the loss for gradient accumulation and calls backward.

Shapes: B rows, T positions, V vocabulary. Position t of `input_ids` predicts `labels[t]`, which is
token t+1 of the concatenated prompt + response; `response_mask[t]` is 1 when that label is a
response token.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def tokenize_prompt_and_output(prompts: Sequence[str | Sequence[int]], outputs: Sequence[str | Sequence[int]],
                               tokenizer, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Encode each prompt and output separately (strings with `tokenizer.encode`, lists of ids as
    they are), concatenate, right-pad to the longest pair with pad_id (any id: padding sits after
    the real tokens, so causal attention never lets them see it, and its labels are masked out), and shift:

        input_ids     (B, L-1)  ids[:-1]
        labels        (B, L-1)  ids[1:]
        response_mask (B, L-1)  1 where labels[t] is an output token, else 0 (prompt and padding)

    where L is the longest prompt + output. Worked example, prompt [5, 6], output [7, 8, 9]:
    ids [5, 6, 7, 8, 9] -> input_ids [5, 6, 7, 8], labels [6, 7, 8, 9], response_mask [0, 1, 1, 1].
    """
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")

    def ids(x):
        return list(tokenizer.encode(x)) if isinstance(x, str) else list(x)

    pairs = [(ids(p), ids(o)) for p, o in zip(prompts, outputs)]
    L = max((len(p) + len(o) for p, o in pairs), default=0)
    if L < 2:
        raise ValueError("every prompt + output pair is shorter than 2 tokens; nothing to predict")
    full = torch.full((len(pairs), L), pad_id, dtype=torch.long)  # (B, L)
    resp = torch.zeros((len(pairs), L), dtype=torch.bool)  # (B, L): token is part of the output
    for b, (p, o) in enumerate(pairs):
        full[b, :len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        resp[b, len(p):len(p) + len(o)] = True
    return {"input_ids": full[:, :-1], "labels": full[:, 1:], "response_mask": resp[:, 1:]}


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at every position: logits (..., V) -> (...), in nats.

    H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v, computed from the logits in float32
    (no log of a probability that underflows to 0). Uniform logits over V give log V.
    """
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (z.softmax(dim=-1) * z).sum(dim=-1)


def get_response_log_probs(model, input_ids: torch.Tensor, labels: torch.Tensor,
                           return_token_entropy: bool = False) -> dict[str, torch.Tensor]:
    """Per-token log p(labels[t] | input_ids[..t]) under `model` (B, T), and with
    return_token_entropy the entropy of each position's distribution (B, T).

    `model(input_ids)` must return logits (B, T, V) or an object with `.logits` (transformers models),
    so the same function scores our GPT and a Hugging Face reference. Labels of -1 (ignored positions)
    are looked up as id 0; mask them out with the response mask. The log-softmax runs in float32.
    """
    out = model(input_ids)
    logits = getattr(out, "logits", out)  # (B, T, V)
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    log_probs = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    result = {"log_probs": log_probs}
    if return_token_entropy:
        result["token_entropy"] = compute_entropy(logits)  # (B, T)
    return result


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `tensor` over the positions where mask is 1, over all elements (dim None) or along dim.

    >>> masked_mean(torch.tensor([[1., 2.], [3., 4.]]), torch.tensor([[1, 0], [1, 1]]))
    tensor(2.6667)

    A slice with no unmasked element divides 0 by 0 and gives nan, on purpose: a silent 0 would hide
    an empty batch.
    """
    m = mask.to(tensor.dtype)
    return (tensor * m).sum(dim=dim) / m.sum(dim=dim)


def masked_normalize(tensor: torch.Tensor, mask: torch.Tensor, normalize_constant: float = 1.0,
                     dim: int | None = None) -> torch.Tensor:
    """Sum of `tensor` where mask is 1, divided by a constant (Dr. GRPO's fixed normalizer; SFT's
    "sum over tokens / a fixed token budget").

    >>> masked_normalize(torch.tensor([[1., 2.], [3., 4.]]), torch.tensor([[1, 0], [1, 1]]), 2.0, dim=-1)
    tensor([0.5000, 3.5000])
    """
    return (tensor * mask.to(tensor.dtype)).sum(dim=dim) / normalize_constant


def sft_microbatch_train_step(policy_log_probs: torch.Tensor, response_mask: torch.Tensor,
                              gradient_accumulation_steps: int, normalize_constant: float | None = None,
                              backward: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The negative log-likelihood of the response tokens of one micro-batch, scaled for gradient
    accumulation, with backward() called on it (unless backward=False). policy_log_probs, response_mask: (B, T).

    normalize_constant None: per token. loss = sum(-log p * mask) / sum(mask) / accumulation steps:
        every response token of the micro-batch weighs the same.
    normalize_constant c: by a constant (CS336's definition). loss = mean over rows of
        (sum over the row of -log p * mask) / c, / accumulation steps: a fixed divisor does not
        depend on how long this micro-batch's responses happen to be. Passing c = N / (B * G), with N the
        response tokens of the whole optimizer step, B rows per micro-batch and G accumulation steps,
        makes the step's summed gradient an exact per-token mean over all its micro-batches (the
        per-token mode weighs micro-batches equally instead, whatever their token counts).

    Returns (loss as backpropagated, metadata): "nll" (the unscaled loss), "response_tokens", and
    "mean_log_prob" (per response token, for logging), all detached.
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    nll = -policy_log_probs  # (B, T)
    if normalize_constant is None:
        unscaled = masked_mean(nll, response_mask)  # scalar
    else:
        unscaled = masked_normalize(nll, response_mask, normalize_constant, dim=-1).mean()  # (B,) -> scalar
    loss = unscaled / gradient_accumulation_steps
    if backward:
        loss.backward()
    with torch.no_grad():
        meta = {"nll": unscaled.detach(), "response_tokens": response_mask.sum().detach(),
                "mean_log_prob": masked_mean(policy_log_probs.detach(), response_mask)}
    return loss, meta


# ----------------------------------------------------------------------------------------------
# Policy gradient (GRPO)
#
# GRPO (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300) samples G replies per prompt
# and uses the group's mean reward as the baseline instead of a learned value function. Dr. GRPO (Liu
# et al. 2025, https://arxiv.org/abs/2503.20783) argues against dividing by the group std (it weighs
# too-easy and too-hard questions up) and against per-sequence length normalisation, so both are
# switches here (normalize_by_std; the micro-batch step's normalize_constant). The clipped surrogate is
# PPO's (Schulman et al. 2017, https://arxiv.org/abs/1707.06347); the KL penalty uses Schulman's k3
# estimator (http://joschu.net/blog/kl-approx.html), as GRPO does. Shapes: N = rollouts (prompts x G),
# B rows of a micro-batch, T positions; per-sequence quantities are (B, 1) and broadcast over T.

LOSS_TYPES = ("no_baseline", "reinforce_with_baseline", "grpo_clip")


def _reward_value(r) -> tuple[float, str]:
    """A reward function's result as (reward, reason): a number, a (reward, reason) pair, or a dict
    with "reward" (and optionally "reason")."""
    if isinstance(r, dict):
        return float(r["reward"]), str(r.get("reason", ""))
    if isinstance(r, (tuple, list)):
        return float(r[0]), str(r[1]) if len(r) > 1 else ""
    return float(r), ""


def compute_group_normalized_rewards(reward_fn: Callable, rollout_responses: Sequence, repeated_ground_truths: Sequence,
                                     group_size: int, advantage_eps: float = 1e-6, normalize_by_std: bool = True,
                                     ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Reward every rollout and turn the rewards into group-relative advantages.

    rollout_responses[i] and repeated_ground_truths[i] (N of each, N = prompts x group_size, the
    group_size samples of one prompt adjacent) go to reward_fn(response, ground_truth), which returns
    a number, a (reward, reason) pair or a dict with "reward" (chatforge.tasks.rl's reward functions
    return pairs). Per group g of rewards r_g (G,):

        advantage = r - mean(r_g)                                  normalize_by_std False (Dr. GRPO)
        advantage = (r - mean(r_g)) / (std(r_g) + advantage_eps)   normalize_by_std True (GRPO)

    std is the unbiased sample std (torch.std, as TRL's GRPO). Returns (advantages (N,), raw_rewards
    (N,), metadata): metadata["keep"] (N,) bool is False for every row of a group whose rewards are
    all equal (its advantages are 0: no learning signal, only cost, so the caller drops it, as DAPO's
    dynamic sampling does); "groups_dropped", "reward_mean", "reward_std", "reward_max", "reward_min"
    (floats over all rollouts), and "reasons" (a Counter of the reasons reward_fn gave).

    >>> adv, raw, meta = compute_group_normalized_rewards(lambda r, g: float(r == g), ["1", "2", "3", "3"],
    ...                                                   ["1", "1", "3", "3"], 2, normalize_by_std=False)
    >>> adv.tolist(), raw.tolist(), meta["keep"].tolist()
    ([0.5, -0.5, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0], [True, True, False, False])
    """
    n = len(rollout_responses)
    if len(repeated_ground_truths) != n:
        raise ValueError(f"{n} responses but {len(repeated_ground_truths)} ground truths")
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} responses do not split into groups of {group_size}")
    reasons: Counter = Counter()
    values = []
    for resp, gt in zip(rollout_responses, repeated_ground_truths):
        value, reason = _reward_value(reward_fn(resp, gt))
        values.append(value)
        if reason:
            reasons[reason] += 1
    raw = torch.tensor(values, dtype=torch.float32)  # (N,)
    grouped = raw.view(-1, group_size)  # (N/G, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (N/G, G)
    if normalize_by_std:
        # one sample has no spread: its std is nan in torch; its advantage is 0 either way
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + advantage_eps)
    same = (grouped == grouped[:, :1]).all(dim=1, keepdim=True).expand_as(grouped)  # (N/G, G)
    meta = {"keep": (~same).reshape(-1), "groups_dropped": int(same[:, 0].sum()),
            "reward_mean": raw.mean().item(), "reward_std": raw.std().item() if n > 1 else 0.0,
            "reward_max": raw.max().item(), "reward_min": raw.min().item(), "reasons": reasons}
    return centred.reshape(-1), raw, meta


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages: torch.Tensor,
                                       policy_log_probs: torch.Tensor) -> torch.Tensor:
    """REINFORCE's per-token loss -A * log p(token) (B, T), A (B, 1) the sequence's reward or
    advantage broadcast over its tokens. Its gradient is -A * grad log p: minimising it raises the
    probability of replies with positive A."""
    return -raw_rewards_or_advantages * policy_log_probs


def compute_grpo_clip_loss(advantages: torch.Tensor, policy_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                           cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) (B, T),
    ratio = exp(log p - log p_old), A (B, 1), old_log_probs (B, T) from the policy that sampled.

    metadata: "clipped" (B, T) bool, True where the clipped term is the smaller one (strictly), so the
    token's gradient is zero: ratio > 1 + eps with A > 0, or ratio < 1 - eps with A < 0; "ratio" (B, T).
    Both detached.
    """
    ratio = torch.exp(policy_log_probs - old_log_probs)  # (B, T)
    unclipped = ratio * advantages  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * advantages  # (B, T)
    loss = -torch.minimum(unclipped, clipped)
    return loss, {"clipped": (clipped < unclipped).detach(), "ratio": ratio.detach()}


def compute_kl_k3(policy_log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) (B, T): Schulman's k3 = exp(d) - d - 1 with
    d = log p_ref - log p_policy, evaluated at tokens sampled from the policy. Never negative (e^d >= 1 + d),
    unbiased, lower variance than -d; 0 where the two agree."""
    d = ref_log_probs - policy_log_probs  # (B, T)
    return torch.exp(d) - d - 1.0


def compute_policy_gradient_loss(policy_log_probs: torch.Tensor, loss_type: str,
                                 raw_rewards: torch.Tensor | None = None, advantages: torch.Tensor | None = None,
                                 old_log_probs: torch.Tensor | None = None, cliprange: float | None = None,
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token loss (B, T) of one of LOSS_TYPES, and its metadata:

        no_baseline              -raw_reward * log p              (raw_rewards (B, 1))
        reinforce_with_baseline  -advantage * log p               (advantages (B, 1))
        grpo_clip                compute_grpo_clip_loss           (advantages, old_log_probs, cliprange)
    """
    def need(value, name):
        if value is None:
            raise ValueError(f"loss_type {loss_type!r} needs {name}")
        return value

    if loss_type == "no_baseline":
        return compute_naive_policy_gradient_loss(need(raw_rewards, "raw_rewards"), policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        return compute_naive_policy_gradient_loss(need(advantages, "advantages"), policy_log_probs), {}
    if loss_type == "grpo_clip":
        return compute_grpo_clip_loss(need(advantages, "advantages"), policy_log_probs,
                                      need(old_log_probs, "old_log_probs"), need(cliprange, "cliprange"))
    raise ValueError(f"unknown loss_type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")


def grpo_microbatch_train_step(policy_log_probs: torch.Tensor, response_mask: torch.Tensor,
                               gradient_accumulation_steps: int, loss_type: str,
                               raw_rewards: torch.Tensor | None = None, advantages: torch.Tensor | None = None,
                               old_log_probs: torch.Tensor | None = None, cliprange: float | None = None,
                               kl_coef: float = 0.0, ref_log_probs: torch.Tensor | None = None,
                               normalize_constant: float | None = None, backward: bool = True,
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch of policy-gradient training: the per-token loss of `loss_type` plus
    kl_coef * k3 KL to the reference, reduced over the response tokens, scaled for gradient
    accumulation, backward() called (unless backward=False). Tensors (B, T); rewards, advantages (B, 1).

    Reduction (the mask keeps sampled reply tokens only: prompt, padding and tool output are 0):
    normalize_constant None: token-level (DAPO, https://arxiv.org/abs/2503.14476): sum over every
        response token of the micro-batch / their number, so a long reply's tokens weigh as much as a
        short one's (the per-sequence mean of the original GRPO weighs short replies' tokens up).
    normalize_constant c: sum over the row / c, mean over rows (Dr. GRPO's constant normaliser; with
        c = N / (B * G) the step's summed gradient is an exact per-token mean, as in sft_microbatch_train_step).
    A micro-batch with no response token gives loss 0 (with a gradient of zeros), not nan: it is
    counted in metadata["response_tokens"] rather than poisoning the step.

    kl_coef 0 needs no ref_log_probs (keep no reference model in memory). Returns (loss as
    backpropagated, metadata, all detached): "loss" (unscaled), "pg_loss", "kl" (masked mean k3, when
    kl_coef > 0), "clip_fraction" (grpo_clip: share of response tokens clipped), "response_tokens".
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    per_token, pg_meta = compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards, advantages,
                                                      old_log_probs, cliprange)  # (B, T)
    pg_per_token = per_token
    if kl_coef:
        if ref_log_probs is None:
            raise ValueError("kl_coef > 0 needs ref_log_probs (the frozen reference's log-probs)")
        kl = compute_kl_k3(policy_log_probs, ref_log_probs)  # (B, T)
        per_token = per_token + kl_coef * kl
    mask = response_mask.to(per_token.dtype)
    n_tokens = mask.sum()

    def reduce(t):
        if normalize_constant is None:
            return (t * mask).sum() / n_tokens.clamp(min=1.0)
        return masked_normalize(t, mask, normalize_constant, dim=-1).mean()

    unscaled = reduce(per_token)
    loss = unscaled / gradient_accumulation_steps
    if backward:
        loss.backward()
    with torch.no_grad():
        meta = {"loss": unscaled.detach(), "pg_loss": reduce(pg_per_token.detach()), "response_tokens": n_tokens.detach()}
        if kl_coef:
            meta["kl"] = (kl.detach() * mask).sum() / n_tokens.clamp(min=1.0)  # per response token
        if "clipped" in pg_meta:
            meta["clip_fraction"] = (pg_meta["clipped"].to(mask.dtype) * mask).sum() / n_tokens.clamp(min=1.0)
    return loss, meta


# ----------------------------------------------------------------------------------------------
# Preferences (reward models, DPO)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """The reward model's pairwise loss, mean over pairs: -log sigmoid(r_chosen - r_rejected), both (B,).

    Bradley & Terry 1952: P(chosen preferred) = sigmoid(r_chosen - r_rejected); InstructGPT's reward model
    (https://arxiv.org/abs/2203.02155, eq. 1). logsigmoid keeps it finite for large margins. Two pairs
    with margins 0 and 2: (log 2 + log(1 + e^-2)) / 2.

    >>> round(float(bradley_terry_loss(torch.tensor([1., 3.]), torch.tensor([1., 1.]))), 4)
    0.41
    """
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7) from
    the summed log-probabilities of each reply, all (B,):

        implicit reward  r(y) = beta * (log pi(y|x) - log pi_ref(y|x))
        loss             -log sigmoid(r(chosen) - r(rejected)), mean over pairs

    Returns (loss, {"chosen_rewards", "rejected_rewards", "margins" (B,) detached}). With the policy equal
    to the reference every margin is 0 and the loss is log 2."""
    chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.float())  # (B,)
    rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.float())  # (B,)
    margins = chosen - rejected  # (B,)
    return -F.logsigmoid(margins).mean(), {"chosen_rewards": chosen.detach(), "rejected_rewards": rejected.detach(),
                                           "margins": margins.detach()}
