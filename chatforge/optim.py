"""Optimizers for training: Muon for the hidden weight matrices, AdamW for everything else, and the
warmup-stable-decay learning-rate schedule.

The split (modded-nanogpt, https://github.com/KellerJordan/modded-nanogpt; nanochat):

    group      params                                  optimizer           base lr
    matrix     2-D weights inside the blocks           torch.optim.Muon    matrix_lr       (0.02)
    embedding  input token embedding                   AdamW               embedding_lr    (0.2)
    lm_head    output head (absent when tied)          AdamW               unembedding_lr  (0.004)
    scalar     RMSNorm weights, any other 1-D param     AdamW               scalar_lr       (0.02)

Why: Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) orthogonalises the
momentum of a weight matrix with a Newton-Schulz iteration, so every direction of the update moves
at the same rate; it is defined for matrices that map hidden states to hidden states. Embedding
rows and the output head behave like independent vectors, and scalars have no matrix structure, so
they keep AdamW (the Muon authors' own recipe; `torch.optim.Muon` raises on non-2-D params).

Learning rates (nanochat `scripts/base_train.py`, tuned at width 768):
- AdamW rates scale as 1/sqrt(width / 768): wider embeddings/heads get proportionally smaller
  per-coordinate steps (the muP-style width rule, Yang et al. 2022, https://arxiv.org/abs/2203.03466).
- Muon's rate is width-free: torch's `adjust_lr_fn="original"` multiplies it by
  sqrt(max(1, fan_out / fan_in)), Keller Jordan's shape correction, which nanochat also uses.
- AdamW betas (0.8, 0.95) and eps 1e-10 (nanochat / modded-nanogpt): a shorter first-moment memory
  suits the large LRs used for embeddings.
- Muon momentum warms up from 0.85 to 0.95 over the first 300 steps (modded-nanogpt).

Both optimizers live in one `MultiOptimizer`, stepped and scheduled as one. Checkpoints save their
state with torch.distributed.checkpoint's `get_optimizer_state_dict(model, list(opt.optimizers.values()))`
(chatforge/train_loop.py, Checkpointer), which keys it by parameter name and gathers FSDP shards.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Width at which the base AdamW learning rates were tuned (nanochat d12).
REFERENCE_WIDTH = 768


def adamw_lr_scale(width: int) -> float:
    """Multiplier for the AdamW learning rates at a given model width.

    >>> adamw_lr_scale(768), round(adamw_lr_scale(192), 3)
    (1.0, 2.0)
    """
    return (width / REFERENCE_WIDTH) ** -0.5


class MultiOptimizer:
    """Several torch optimizers stepped as one. `param_groups` lists every group of every optimizer
    (each group carries a "kind" and its "initial_lr"), so a schedule sets all rates in one loop."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def set_lr(self, multiplier: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["initial_lr"] * multiplier

    def set_muon_momentum(self, momentum: float) -> None:
        if "muon" in self.optimizers:
            for g in self.optimizers["muon"].param_groups:
                g["momentum"] = momentum


def build_optimizer(param_groups: dict[str, list[torch.nn.Parameter]], width: int, *,
                    matrix_lr: float = 0.02, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                    scalar_lr: float = 0.02, weight_decay: float = 0.0,
                    adam_betas: tuple[float, float] = (0.8, 0.95), fused: bool | None = None) -> MultiOptimizer:
    """Muon for param_groups["matrix"], AdamW for "embedding", "lm_head" and "scalar" (the
    dict `GPT.param_groups()` returns). `weight_decay` is Muon's decoupled decay; the AdamW groups
    get none (embeddings and norm gains should not be pulled to zero). Empty groups are skipped."""
    scale = adamw_lr_scale(width)
    adam_groups = []
    for kind, lr in (("embedding", embedding_lr), ("lm_head", unembedding_lr), ("scalar", scalar_lr)):
        params = list(param_groups.get(kind, []))
        if params:
            adam_groups.append({"params": params, "lr": lr * scale, "initial_lr": lr * scale, "kind": kind})
    optimizers: dict[str, torch.optim.Optimizer] = {}
    matrices = list(param_groups.get("matrix", []))
    if matrices:
        bad = [tuple(p.shape) for p in matrices if p.ndim != 2]
        if bad:
            raise ValueError(f"Muon takes 2-D matrices only; got shapes {bad[:3]}")
        optimizers["muon"] = torch.optim.Muon(
            [{"params": matrices, "lr": matrix_lr, "initial_lr": matrix_lr, "kind": "matrix"}],
            lr=matrix_lr, weight_decay=weight_decay, momentum=0.95, nesterov=True,
            adjust_lr_fn="original")
    if adam_groups:
        optimizers["adamw"] = torch.optim.AdamW(adam_groups, lr=embedding_lr, betas=adam_betas, eps=1e-10,
                                                weight_decay=0.0, fused=fused)
    return MultiOptimizer(optimizers)


def lr_multiplier(step: int, num_iterations: int, warmup_steps: int = 0, warmdown_steps: int = 0,
                  final_lr_frac: float = 0.0) -> float:
    """Warmup-stable-decay (WSD, Hu et al. 2024 https://arxiv.org/abs/2404.06395; nanochat): a linear
    ramp over `warmup_steps`, a constant plateau, then a linear decay to `final_lr_frac` over the last
    `warmdown_steps`. `step` is the 0-based index of the step about to be taken.

    >>> [round(lr_multiplier(s, 10, warmup_steps=2, warmdown_steps=4), 2) for s in range(10)]
    [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if warmdown_steps > 0 and step >= num_iterations - warmdown_steps:
        progress = (num_iterations - step) / (warmdown_steps + 1)  # just below 1 ... 1/(warmdown+1)
        return progress + (1 - progress) * final_lr_frac
    return 1.0


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum ramp from `start` to `end` over `warmup_steps` (modded-nanogpt).

    >>> muon_momentum(0), muon_momentum(150), muon_momentum(1000)
    (0.85, 0.9, 0.95)
    """
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return round((1 - frac) * start + frac * end, 12)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip the global gradient norm (0 = off); returns the norm before clipping (nan/inf when a
    gradient is not finite), which the trainer logs."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor
    value = float(norm)
    return value if math.isfinite(value) else float("nan")
