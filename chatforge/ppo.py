"""PPO with a value head, GAE and a KL leash to the frozen reference: InstructGPT's RLHF step.

Sources:
    PPO        Schulman et al. 2017, https://arxiv.org/abs/1707.06347 (the clipped surrogate, eq. 7)
    GAE        Schulman et al. 2016, https://arxiv.org/abs/1506.02438 (eq. 16)
    InstructGPT  Ouyang et al. 2022, https://arxiv.org/abs/2203.02155 (eq. 2: the reward model's score
               minus beta * log(pi / pi_SFT), a per-token KL penalty to the SFT policy)
    details    Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO",
               https://arxiv.org/abs/2403.17031, and OpenAI's lm-human-preferences code it reads: the score
               on the last reply token, advantages whitened over the batch, clipped value loss, 4 epochs
               over one minibatch per rollout, vf_coef 0.1 with a shared trunk

One PPO rollout (PpoSource, a train_loop batch source built on GRPO's RolloutSource):

    1. take `prompts` items; the engine samples `group_size` replies to each (rollout.rollout_batch) with
       the policy's current weights; the task (a reward model: rlhf_grpo.RewardModelTask) scores each reply
    2. one no-grad forward of the policy + value head and one of the reference, per micro-batch, give
       log pi_old, V_old and log pi_ref at every reply token
    3. per-token rewards (kl_penalized_rewards): r_t = -kl_coef * (log pi_old - log pi_ref) at every reply
       token, plus the score on the reply's last token (its <|assistant_end|>, or the last one sampled)
    4. GAE (gae) over the reply tokens gives advantages and returns; advantages are whitened over every
       reply token of the rollout (whiten)
    5. `epochs` optimizer steps on the whole rollout (each split into `micro_batches` for accumulation):
       loss = clipped_policy_loss + vf_coef * clipped_value_loss, token means over the rollout

Why several epochs through the shared loop: Trainer's step is "grad_accum micro-batches, then one
update", so a rollout queued `epochs` times gives `epochs` updates (RolloutSource's queue, as GRPO's inner
epochs do), every update on the whole rollout: lm-human-preferences' default (4 epochs, 1 minibatch).
Several minibatches per epoch (not tried) would be one more knob. The ratio of the first epoch is exactly
1: the rollout-time forward uses the very shapes of the training forward.

The value head (PolicyWithValue) is a Linear (C -> 1) on the policy's final-norm hidden states (the same
forward as the logits, GPT.forward(hidden=True), as the reward model reads its score), so policy and
value share the trunk, as in lm-human-preferences; its loss reaches the trunk scaled by vf_coef. It is
saved beside the checkpoint in VALUE_HEAD_FILE (the checkpoint itself stays a plain GPT).

Time steps: label position t of the shifted layout (rollout.rollout_batch) is the action "emit
labels[t]" taken in the state "read input_ids[..t]"; the log-prob and the value of that step are both
read at position t. gamma 1 (no discount inside one reply) and lam 0.95 are InstructGPT's / the
implementation details' defaults.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.common import ChatforgeError
from chatforge.grpo import GrpoSettings, RolloutSource, reply_text
from chatforge.losses import compute_entropy, compute_grpo_clip_loss, compute_kl_k3, get_response_log_probs, \
    masked_mean
from chatforge.reward_model import HeadCheckpointer

VALUE_HEAD_FILE = "value_head.safetensors"


# ----------------------------------------------------------------------------------------------
# The math: small public functions, each checked by hand in tests/test_ppo.py


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask.to(x.dtype)).sum()


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the positions where mask is 1 (population variance), 0 elsewhere; with
    shift_mean False the mean is added back (only the scale changes).

    >>> whiten(torch.tensor([[1., 3., 9.]]), torch.tensor([[1, 1, 0]]))
    tensor([[-1.,  1.,  0.]])
    """
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_penalized_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's reward per token: logp, ref_logp, mask (B, T), scores (B,) ->
    (rewards (B, T), kl (B, T)) with kl = logp - ref_logp on reply tokens (the k1 estimate of
    KL(pi || ref) at the sampled token, 0 elsewhere) and rewards = -kl_coef * kl, plus each row's score
    on its last reply token. A row with no reply token gets nothing.

    >>> r, kl = kl_penalized_rewards(torch.tensor([[-1., -2., -3., 0.]]), torch.tensor([[-1., -1., -1., 0.]]),
    ...                              torch.tensor([[0, 1, 1, 0]]), torch.tensor([5.]), 0.5)
    >>> r
    tensor([[0.0000, 0.5000, 6.0000, 0.0000]])
    """
    m = mask.to(logp.dtype)
    kl = (logp - ref_logp) * m  # (B, T)
    rewards = torch.zeros_like(kl) - kl_coef * kl  # (B, T); 0 - x: no -0.0 where kl is 0
    T = mask.size(1)
    last = (m * torch.arange(1, T + 1, dtype=logp.dtype, device=logp.device)).argmax(-1)  # (B,) last reply token
    has = mask.any(-1)  # (B,)
    rows = torch.arange(mask.size(0), device=logp.device)
    rewards[rows, last] += torch.where(has, scores.to(logp.dtype), torch.zeros_like(scores, dtype=logp.dtype))
    return rewards, kl


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), backwards over each row:

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last reply token: 0, the episode ended)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V                               (the value loss's targets)

    rewards, values, mask (B, T) -> (advantages, returns) (B, T), 0 where mask is 0. Positions with mask
    0 are not steps: the prompt and the padding on either side, and tool output the engine inserted
    mid-reply, are skipped (the step after a reply token is the next reply token).

    >>> a, ret = gae(torch.tensor([[0., 1.]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[1, 1]]), 1.0, 0.5)
    >>> a, ret
    (tensor([[0.2500, 0.5000]]), tensor([[0.7500, 1.0000]]))
    """
    B, T = rewards.shape
    keep = mask.bool()
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # V of the next reply token
    next_adv = torch.zeros_like(next_value)  # A of the next reply token
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        a = delta + gamma * lam * next_adv  # (B,)
        k = keep[:, t]
        adv[:, t] = torch.where(k, a, torch.zeros_like(a))
        next_value = torch.where(k, values[:, t], next_value)
        next_adv = torch.where(k, a, next_adv)
    returns = torch.where(keep, adv + values, torch.zeros_like(adv))
    return adv, returns


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip: float = 0.2, denom: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) per token, -min(ratio * A, clip(ratio, 1 +- clip) * A)
    with ratio = exp(logp - old_logp), summed over the reply tokens and divided by `denom` (None: their
    number, a token mean). All (B, T). Returns (loss, clip fraction: share of reply tokens whose clipped
    term won, i.e. with no gradient)."""
    per_token, meta = compute_grpo_clip_loss(advantages, logp, old_logp, clip)  # (B, T)
    n = mask.sum().clamp(min=1).to(logp.dtype)
    loss = masked_sum(per_token, mask) / (n if denom is None else denom)
    return loss, masked_sum(meta["clipped"].to(logp.dtype), mask).detach() / n


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2, denom: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The value loss of PPO's reference code (lm-human-preferences; Huang et al. 2024, detail "value
    clipping"): 0.5 * max((V - R)^2, (V_clipped - R)^2) with V_clipped = V_old + clamp(V - V_old, +-clip),
    so one rollout moves a value by at most `clip`. Summed over reply tokens / denom (None: a token mean).
    All (B, T). Returns (loss, share of reply tokens where the clipped term won)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)  # (B, T)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    per_token = 0.5 * torch.maximum(a, b)
    n = mask.sum().clamp(min=1).to(values.dtype)
    loss = masked_sum(per_token, mask) / (n if denom is None else denom)
    return loss, masked_sum((b > a).to(values.dtype), mask).detach() / n


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the positions where mask is 1 (nan without variance).

    >>> explained_variance(torch.tensor([[1., 3., 9.]]), torch.tensor([[0., 4., 7.]]), torch.tensor([[1, 1, 0]]))
    0.75
    """
    m = mask.to(returns.dtype)
    var = lambda x: float(masked_mean((x - masked_mean(x, m)) ** 2, m))  # noqa: E731
    v = var(returns)
    return 1.0 - var(returns - values) / v if v > 0 else float("nan")


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t]) from logits (B, T, V) -> (B, T), in float32 (as losses.get_response_log_probs)."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# The value head


class PolicyWithValue(nn.Module):
    """The policy GPT (`backbone`) and a value head on its final hidden states: one forward gives both.

        model(ids)                -> logits (B, T, V)            (the policy alone, as GPT)
        model(ids, values=True)   -> logits (B, T, V), values (B, T) float32

    The head is zero-initialised with a bias (values start at 0; unlike a reward model's score a value is
    absolute, so a bias does not cancel). Attribute names as RewardModel's, so HeadCheckpointer saves
    both the same way."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(backbone.parameters()).device)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, ids: torch.Tensor, values: bool = False):
        if not values:
            return self.backbone(ids)
        h = self.backbone(ids, hidden=True)  # (B, T, C)
        return self.backbone.lm_head(h), self.head(h).squeeze(-1).float()  # (B, T, V), (B, T)


def with_value_head(policy: nn.Module, ckpt=None) -> PolicyWithValue:
    """PolicyWithValue around `policy`, its head loaded from a PPO checkpoint folder `ckpt` when given."""
    from safetensors.torch import load_file

    model = PolicyWithValue(policy)
    if ckpt is not None:
        f = Path(ckpt) / VALUE_HEAD_FILE
        if not f.is_file():
            raise ChatforgeError(f"{f} is missing: {ckpt} is not a PPO checkpoint; pass --force to start over")
        model.head.load_state_dict(load_file(f, device=str(next(policy.parameters()).device)))
    return model


class ValueCheckpointer(HeadCheckpointer):
    """A PPO checkpoint: the policy as a plain GPT (merged, with LoRA), the value head in VALUE_HEAD_FILE."""

    def __init__(self, path, **kw):
        super().__init__(path, VALUE_HEAD_FILE, **kw)


def ppo_optimizer(policy_optimizer, model: PolicyWithValue, value_lr: float):
    """The policy's optimizer (sft_optimizer's: Muon + AdamW, or AdamW on LoRA adapters) plus AdamW on the
    value head at value_lr, stepped as one (optim.MultiOptimizer; the schedule scales every rate)."""
    from chatforge.optim import MultiOptimizer

    inner = getattr(policy_optimizer, "optimizers", None) or {"policy": policy_optimizer}
    head = torch.optim.AdamW([{"params": list(model.head.parameters()), "lr": value_lr, "initial_lr": value_lr,
                               "kind": "value_head"}], lr=value_lr, betas=(0.9, 0.95), weight_decay=0.0)
    return MultiOptimizer({**inner, "value_head": head})


# ----------------------------------------------------------------------------------------------
# Rollouts and the loss


@dataclass
class PpoSettings(GrpoSettings):
    """GRPO's rollout settings (prompts, group_size, max_tokens, temperature, micro_batches, seed, kl_coef,
    cliprange, epochs) and PPO's own. GRPO's loss_type, normalize_by_std and resample are not used."""

    epochs: int = 4  # optimizer steps per rollout (lm-human-preferences' noptepochs)
    gamma: float = 1.0  # discount between reply tokens
    lam: float = 0.95  # GAE's lambda
    vf_coef: float = 0.1  # value loss weight (shared trunk)
    value_clip: float = 0.2  # how far one rollout moves a value

    def check(self) -> None:
        super().check()
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1]: {self.gamma}, {self.lam}")
        if self.vf_coef < 0 or self.value_clip <= 0 or self.cliprange <= 0:
            raise ValueError(f"vf_coef must be >= 0, value_clip and cliprange > 0: {self}")


class PpoSource(RolloutSource):
    """A train_loop batch source for PPO: RolloutSource's sampling, item order and exact resume, with a
    PPO rollout (steps 1-4 of the module docstring) instead of GRPO's groups. Micro-batch (a dict):

        input_ids, labels           (B, T) long    prompt + reply, shifted by one
        response_mask               (B, T) bool    sampled reply tokens
        old_log_probs, old_values   (B, T) float   the sampling policy's log-probs and values
        advantages, returns         (B, T) float   whitened GAE advantages, GAE returns (value targets)
        denom                       float          the rollout's reply tokens / micro_batches (token mean)
        stats                       dict           the rollout's metrics (reward = mean score, kl, ...)

    `policy` is the PolicyWithValue being trained (the engine samples with its backbone), `ref_model`
    the frozen reference (a copy, or lora.AdaptersOff(policy) for LoRA); with kl_coef 0 it may be None.
    amp_dtype: the trainer's autocast dtype, so the rollout-time forward matches the training one."""

    def __init__(self, engine, tok, task, items, settings: PpoSettings, *, policy: PolicyWithValue, ref_model=None,
                 device=None, say=print, amp_dtype=None):
        super().__init__(engine, tok, task, items, settings, ref_model=ref_model, device=device, say=say)
        if engine.model is not policy.backbone:
            raise ValueError("the engine must sample with the policy being trained (policy.backbone)")
        self.policy, self.amp_dtype = policy, amp_dtype

    def _autocast(self):
        import contextlib

        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    @torch.no_grad()
    def _new_rollout(self) -> None:
        s, dev = self.s, self.device
        t0 = time.time()
        chosen = self._draw(s.prompts)
        batch = self._sample(chosen)
        comps = batch["completions"]
        replies = [reply_text(self.tok, c) for c in comps]
        scores = torch.tensor([self.reward_stats(r, chosen[c.prompt_index])[0] for r, c in zip(replies, comps)],
                              dtype=torch.float32)  # (N,)
        ids_all, labels_all, mask = batch["input_ids"], batch["labels"], batch["response_mask"]  # (N, L)
        N, L = mask.shape
        pieces = [list(range(N))[i::s.micro_batches] for i in range(s.micro_batches)]
        widths = []
        logp, values, ref = (torch.zeros(N, L) for _ in range(3))  # (N, L) each
        was = self.policy.training
        self.policy.eval()
        try:  # per micro-batch, trimmed: the shapes the training forward will see (epoch 1's ratio is 1)
            for piece in pieces:
                idx = torch.tensor(piece or [0])
                seen = (mask[idx] | (labels_all[idx] != self.pad_id)).any(0)  # (L,)
                T = int(seen.nonzero().max()) + 1 if seen.any() else 1
                widths.append(T)
                ids, labels = ids_all[idx, :T].to(dev), labels_all[idx, :T].to(dev)
                with self._autocast():
                    logits, v = self.policy(ids, values=True)  # (B, T, V), (B, T)
                    if self.ref_model is not None:
                        ref[idx, :T] = get_response_log_probs(self.ref_model, ids, labels)["log_probs"].float().cpu()
                logp[idx, :T] = label_log_probs(logits, labels).cpu()
                values[idx, :T] = v.cpu()
        finally:
            self.policy.train(was)
        if self.ref_model is None:
            ref = logp.clone()
        rewards, kl1 = kl_penalized_rewards(logp, ref, mask, scores, s.kl_coef)  # (N, L) each
        adv, returns = gae(rewards, values, mask, s.gamma, s.lam)
        adv = whiten(adv, mask)
        n_tok = max(1.0, float(mask.sum()))
        k3 = compute_kl_k3(logp, ref)
        stats = {"reward": float(scores.mean()), "score_std": float(scores.std()) if N > 1 else 0.0,
                 "kl": float(masked_sum(k3, mask)) / n_tok, "kl_k1": float(kl1.sum()) / n_tok,
                 "non_score_reward": float(-s.kl_coef * kl1.sum()) / N, "value_mean": float(masked_sum(values, mask)) / n_tok,
                 "return_mean": float(masked_sum(returns, mask)) / n_tok,
                 # 1 - Var(returns - values) / Var(returns) over reply tokens: 1 = a perfect value head, <= 0 = no help
                 "value_explained_var": explained_variance(values, returns, mask),
                 "response_length": sum(len(c.tokens) for c in comps) / N,
                 "truncated": sum(c.finish_reason == "length" for c in comps) / N, "rollout_s": time.time() - t0}
        self.last = dict(stats, example=replies[0][:200])
        out = []
        for piece, T in zip(pieces, widths):
            idx = torch.tensor(piece or [0])
            m = mask[idx, :T].clone()
            if not piece:  # fewer rows than micro-batches: a row with nothing to learn
                m.zero_()
            out.append({"input_ids": ids_all[idx, :T], "labels": labels_all[idx, :T], "response_mask": m,
                        "old_log_probs": logp[idx, :T], "old_values": values[idx, :T],
                        "advantages": adv[idx, :T], "returns": returns[idx, :T],
                        "denom": n_tok / s.micro_batches, "stats": stats})
        self.queue = out * s.epochs


def ppo_loss(settings: PpoSettings):
    """loss_fn(model, micro_batch) for train_loop.Trainer: `model` is the (wrapped) PolicyWithValue;
    clipped policy loss + vf_coef x clipped value loss, each a token mean over the whole rollout."""
    s = settings

    def loss_fn(model, mb: dict):
        logits, values = model(mb["input_ids"], values=True)  # (B, T, V), (B, T)
        logp = label_log_probs(logits, mb["labels"])  # (B, T)
        mask = mb["response_mask"]
        pg, clip_frac = clipped_policy_loss(logp, mb["old_log_probs"], mb["advantages"], mask, s.cliprange, mb["denom"])
        vf, vclip_frac = clipped_value_loss(values, mb["old_values"], mb["returns"], mask, s.value_clip, mb["denom"])
        n = mask.sum().clamp(min=1)
        with torch.no_grad():
            metrics = {k: v for k, v in mb["stats"].items() if isinstance(v, (int, float))}
            metrics.update(pg_loss=float(pg), vf_loss=float(vf), clip_fraction=float(clip_frac),
                           value_clip_fraction=float(vclip_frac),
                           approx_kl=float(masked_sum(compute_kl_k3(logp, mb["old_log_probs"]), mask) / n),
                           entropy=float(masked_sum(compute_entropy(logits), mask) / n),
                           n_tokens=float(mb["input_ids"].numel()))
        return pg + s.vf_coef * vf, metrics

    return loss_fn
