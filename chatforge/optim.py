"""Optimizers for training: Muon for the hidden weight matrices, AdamW for everything else, and the
warmup-stable-decay learning-rate schedule.

The split (modded-nanogpt, https://github.com/KellerJordan/modded-nanogpt; nanochat):

    group      params                                  optimizer           base lr
    matrix     2-D weights inside the blocks           Muon (torch's)      matrix_lr       (0.02)
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


def newton_schulz(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Approximately orthogonalise a (rows, cols) matrix: the quintic Newton-Schulz iteration of Muon
    (https://kellerjordan.github.io/posts/muon/), run on the wide orientation in `dtype`.

    >>> q = newton_schulz(torch.eye(3) * 5, 5, (3.4445, -4.7750, 2.0315), 1e-7, torch.float32)
    >>> bool(torch.allclose(q, torch.eye(3) * q[0, 0])) and 0.5 < float(q[0, 0]) < 1.5
    True
    """
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # (small, large): the Gram matrix below is small x small
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon, with the Newton-Schulz iteration in a chosen dtype.

    torch runs the iteration in bfloat16, which is right on GPUs and on CPUs with native bf16 matrix
    units; on an AVX2-only CPU (this project's 2-core AMD EPYC) bf16 matmuls are emulated and a
    256 x 704 iteration takes 0.41 s against 0.02 s in float32, which made Muon 45% of a tiny
    pretraining step (py-spy). `ns_dtype=torch.bfloat16` is torch's own step, unchanged; any other
    dtype runs the same update (Nesterov momentum, orthogonalise, shape-corrected lr, decoupled weight
    decay) in that dtype. The state keeps torch's "momentum_buffer", so checkpoints load in either."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom = float(group["lr"]), float(group["momentum"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - mom)
                update = p.grad.lerp(buf, mom) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_steps"], group["ns_coefficients"], group["eps"],
                                       self.ns_dtype)
                rows, cols = p.shape[:2]
                scale = math.sqrt(max(1, rows / cols)) if group["adjust_lr_fn"] in (None, "original") else (
                    0.2 * math.sqrt(max(rows, cols)) if group["adjust_lr_fn"] == "match_rms_adamw" else 1.0)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * scale)
        return loss


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
        # bf16 Newton-Schulz on accelerators (torch's Muon as is), float32 on CPUs (see Muon)
        ns_dtype = torch.bfloat16 if matrices[0].device.type != "cpu" else torch.float32
        optimizers["muon"] = Muon(
            [{"params": matrices, "lr": matrix_lr, "initial_lr": matrix_lr, "kind": "matrix"}],
            lr=matrix_lr, weight_decay=weight_decay, momentum=0.95, nesterov=True,
            adjust_lr_fn="original", ns_dtype=ns_dtype)
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
