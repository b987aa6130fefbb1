"""Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290): the policy
learns from preference pairs directly, with no reward model and no sampling.

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

where log pi(y|x) is the summed log-probability of the reply's tokens (its <|assistant_end|> included)
and `ref` the frozen starting policy. beta * (log pi - log ref) is the policy's implicit reward; beta
sets how far it may move from the reference (small beta: far). An optional NLL term on the chosen
reply (`nll_coef`; RPO, Pang et al. 2024, https://arxiv.org/abs/2404.19733) keeps the chosen reply's
likelihood from falling while the margin grows, which plain DPO allows.

The reference: with LoRA it is the same model with its adapters switched off (lora.adapters_disabled),
so no second copy of the weights is kept; without LoRA a frozen copy made before training.

Held-out measurements (evaluate_dpo): the implicit reward margin, the preferred-reply rate (share of
pairs whose implicit reward ranks the chosen reply first; 0 before training, where every margin is 0)
and the preferred-logprob rate (share of pairs where the policy itself gives the chosen reply the
higher log-probability, meaningful before training too).
"""

from __future__ import annotations

import contextlib

import torch

from chatforge.common import ChatforgeError
from chatforge.lora import adapters_disabled
from chatforge.losses import dpo_loss, get_response_log_probs
from chatforge.pairs import batches, collate, encode_pair
from chatforge.stats import wilson_interval


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of each row's reply tokens: (2B,) for a pairs.collate batch."""
    lp = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]  # (2B, T)
    return (lp * batch["response_mask"]).sum(-1)  # (2B,)


@contextlib.contextmanager
def reference_model(policy, reference=None):
    """The model to score the reference log-probs with: `reference` when given, else `policy` with its
    LoRA adapters switched off for the duration."""
    if reference is not None:
        yield reference
    else:
        with adapters_disabled(policy):
            yield policy


@torch.no_grad()
def reference_logps(policy, reference, batch: dict) -> torch.Tensor:
    with reference_model(policy, reference) as ref:
        was = ref.training
        ref.eval()
        try:
            return sequence_logps(ref, batch)  # (2B,)
        finally:
            ref.train(was)


def dpo_pair_loss(policy, reference, tok, prompt: list[dict], chosen: str, rejected: str, beta: float = 0.1,
                  max_len: int = 0) -> torch.Tensor:
    """The DPO loss of one pair: `policy` and `reference` are chatforge GPTs (reference None: the policy
    with its LoRA adapters off), `prompt` the conversation (messages ending with a user turn), `chosen`
    and `rejected` the two replies. A scalar tensor with the policy's gradient."""
    from chatforge.tasks.preferences import PreferencePair

    enc, reason = encode_pair(tok, PreferencePair("pair", prompt, chosen, rejected), max_len or
                              policy.config.max_seq_len)
    if enc is None:
        raise ChatforgeError(f"the pair does not fit the model: {reason}")
    b = collate([enc], tok.bos_id)
    pol = sequence_logps(policy, b)  # (2,)
    ref = reference_logps(policy, reference, b)  # (2,)
    loss, _ = dpo_loss(pol[:1], pol[1:], ref[:1], ref[1:], beta)
    return loss


def dpo_train_loss(beta: float, nll_coef: float = 0.0, reference=None):
    """loss_fn(model, batch) for train_loop.Trainer over pairs.collate batches: DPO plus nll_coef x the
    per-token NLL of the chosen replies. `reference`: a frozen model, or None for LoRA's adapters-off."""
    def loss_fn(model, batch: dict):
        lp = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]  # (2B, T)
        mask = batch["response_mask"]
        pol = (lp * mask).sum(-1)  # (2B,)
        ref = reference_logps(model, reference, batch)  # (2B,)
        B = pol.size(0) // 2
        loss, m = dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], beta)
        metrics = {"margin": float(m["margins"].mean()), "accuracy": float((m["margins"] > 0).float().mean()),
                   "chosen_reward": float(m["chosen_rewards"].mean()),
                   "rejected_reward": float(m["rejected_rewards"].mean()), "n_tokens": float(batch["ids"].numel())}
        if nll_coef:
            nll = -pol[:B].sum() / mask[:B].sum().clamp(min=1)  # per reply token of the chosen replies
            loss = loss + nll_coef * nll
            metrics["nll"] = float(nll.detach())
        return loss, metrics

    return loss_fn


@torch.no_grad()
def evaluate_dpo(policy, reference, pairs, pad_id: int, beta: float, batch_size: int = 16, device=None) -> dict:
    """Held-out DPO measurements over EncodedPairs (see the module docstring): {"implicit_accuracy" (+ _low,
    _high: 95% Wilson), "margin", "preferred_logprob_rate", "chosen_logp", "rejected_logp", "loss", "n"}."""
    was = policy.training
    policy.eval()
    margins, pol_w, pol_l, losses = [], [], [], []
    try:
        for b in batches(pairs, batch_size, pad_id):
            b = {k: v.to(device) for k, v in b.items()}
            pol = sequence_logps(policy, b)
            ref = reference_logps(policy, reference, b)
            B = pol.size(0) // 2
            loss, m = dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], beta)
            margins += m["margins"].tolist()
            pol_w += pol[:B].tolist()
            pol_l += pol[B:].tolist()
            losses.append(float(loss) * B)
    finally:
        policy.train(was)
    n = len(margins)
    if n == 0:
        raise ChatforgeError("no held-out preference pairs to measure DPO on")
    right = sum(m > 0 for m in margins)
    lo, hi = wilson_interval(right, n)
    return {"implicit_accuracy": right / n, "implicit_accuracy_low": lo, "implicit_accuracy_high": hi,
            "margin": sum(margins) / n, "preferred_logprob_rate": sum(w > l for w, l in zip(pol_w, pol_l)) / n,
            "chosen_logp": sum(pol_w) / n, "rejected_logp": sum(pol_l) / n, "loss": sum(losses) / n, "n": n}


def load_policy(src, ckpt, *, resume: bool, lora_rank: int = 0, lora_alpha: float = 16.0, lora_targets=(),
                seq_len: int = 0, device="cpu"):
    """(policy, reference, info) for DPO from the checkpoint `src`, or resumed from this run's `ckpt`:

    - LoRA (lora_rank > 0): the source weights with adapters (a resumed run's loaded from ckpt); the
      reference is None, meaning the policy with its adapters off (no second copy);
    - full fine-tuning: the policy (the resumed one from ckpt) and a frozen copy of the source.

    `seq_len` longer than the checkpoint's context extends the RoPE tables of both. info: what
    load_checkpoint returned for the checkpoint to resume from (or the source)."""
    from chatforge.checkpoint import load_checkpoint
    from chatforge.finetune import extend_context, load_adapters
    from chatforge.lora import apply_lora

    model, info = load_checkpoint(ckpt if resume and not lora_rank else src)
    seq_len = max(seq_len, model.config.max_seq_len)
    extend_context(model, seq_len)
    reference = None
    if lora_rank:
        apply_lora(model, lora_rank, lora_alpha, 0.0, lora_targets)
        if resume:
            load_adapters(model, ckpt)
            info = load_checkpoint(ckpt)[1]
    else:  # a resumed run's model has moved: the reference is the source again
        import copy

        reference = extend_context(load_checkpoint(src)[0], seq_len) if resume else copy.deepcopy(model)
        reference = reference.to(device).eval().requires_grad_(False)
    return model.to(device), reference, info


def describe(before: dict, after: dict) -> str:
    """Before -> after lines per source, for the terminal."""
    lines = []
    for n, a in after.items():
        b = before.get(n, a)
        lines.append(f"  {n:<11} margin {b['margin']:.3f} -> {a['margin']:.3f}; preferred (implicit) "
                     f"{b['implicit_accuracy']:.1%} -> {a['implicit_accuracy']:.1%} [{a['implicit_accuracy_low']:.1%}, "
                     f"{a['implicit_accuracy_high']:.1%}]; preferred by log-prob {b['preferred_logprob_rate']:.1%} -> "
                     f"{a['preferred_logprob_rate']:.1%} (of {a['n']})")
    return "\n".join(lines)
