"""Losses for post-training, as small public functions on tensors (SFT now; RL's policy-gradient losses
join them here later).

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

from typing import Sequence

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
