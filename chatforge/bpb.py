"""Bits per byte: the tokenizer-independent language-modelling score (nanochat's `evaluate_bpb`).

    bpb = sum over scored target tokens of -ln p(token) / ln 2  /  UTF-8 bytes of those tokens

Special tokens (<|bos|>, 0 bytes) count in neither sum, so the number compares across tokenizers
and vocabularies. `unigram_bpb` scores the baseline every model must beat (token frequencies of the
train split) on exactly the same targets.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from chatforge.distributed import Dist, all_reduce_sum


@torch.no_grad()
def evaluate_bpb(model, stream, windows, seq_len: int, batch_size: int, token_bytes: torch.Tensor,
                 device="cpu", autocast=None, d: Dist | None = None) -> float:
    """Bits per byte of `model` on the validation windows this rank scores (`eval_windows`), summed
    over ranks. `model(x, y, loss_reduction="none")` must return (B, T) per-token losses in nats;
    token_bytes[id] is the UTF-8 length of a token (a float64 tensor on `device`, float32 on MPS);
    `autocast` is a context-manager factory (bf16 on CUDA) or None."""
    from chatforge.dataloader import iter_eval_batches

    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    acc = token_bytes.dtype  # float64, float32 on MPS (no float64 there)
    nats = torch.zeros((), dtype=acc, device=device)
    nbytes = torch.zeros((), dtype=acc, device=device)
    for x, y in iter_eval_batches(stream, windows, seq_len, batch_size, device):
        with autocast():
            loss = model(x, y, loss_reduction="none")  # (B, T)
        b = token_bytes[y]  # (B, T)
        nats += (loss.to(acc) * (b > 0)).sum()
        nbytes += b.sum()
    totals = all_reduce_sum(torch.stack([nats, nbytes]), d or Dist())
    model.train(was_training)
    return float(totals[0] / math.log(2) / totals[1])


def unigram_bpb(counts: np.ndarray, val_stream, windows, seq_len: int, token_bytes: np.ndarray) -> float:
    """The baseline to beat: a unigram model (train-split token frequencies `counts`, counted once
    when the shards were built, with add-one smoothing) scored on the given validation windows. Pass
    the windows of every rank (`eval_windows(..., rank=None, world_size=W)`) so it scores exactly the
    targets the model is scored on."""
    counts = counts.astype(np.float64)
    logp = np.log2(counts + 1) - np.log2(counts.sum() + counts.size)
    bits = total_bytes = 0.0
    for w in windows:
        y = val_stream.window(int(w) * seq_len + 1, seq_len)
        b = token_bytes[y]
        bits -= float((logp[y] * (b > 0)).sum())
        total_bytes += float(b.sum())
    return bits / total_bytes
