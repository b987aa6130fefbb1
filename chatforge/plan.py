"""The pretraining plan: everything derived from the config before any compute is spent, and what
it will cost.

Everything follows from `--depth` (nanochat's single dial): the model shape
(`ModelConfig.from_depth`), the AdamW learning rates (x (width/768)^-0.5, chatforge/optim.py), the
token budget (target_param_data_ratio x parameters; 20 is Chinchilla's compute-optimal ratio,
Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556, counting all parameters as nanochat does) and
the batch size (DeepSeek LLM's fitted optimum B = 0.292 * C^0.3271 tokens for a compute budget of
C FLOPs, https://arxiv.org/abs/2401.02954, rounded to a power of two; it gives nanochat's 2^19 at
depth 20). Every derived value can be overridden by its flag.

    plan = derive_settings(cfg, vocab_size=32768, world=8)
    print(describe_plan(plan, torch.device("cuda"), "NVIDIA H100 80GB HBM3"))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatforge.common import ChatforgeError
from chatforge.hardware import ASSUMED_MFU, REFERENCE_SETUPS, fmt_hours, gpu_peak_flops, gpu_price


@dataclass
class Plan:
    """Everything derived from the config before any compute is spent."""

    model_config: Any
    num_params: int
    num_scaling_params: int  # the count the token budget uses (all parameters)
    flops_per_token: int
    world: int
    device_batch_size: int
    seq_len: int
    total_batch_size: int
    grad_accum: int
    num_iterations: int
    warmup_steps: int
    warmdown_steps: int
    lrs: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dtype: str = "float32"

    @property
    def total_tokens(self) -> int:
        return self.num_iterations * self.total_batch_size

    @property
    def total_flops(self) -> float:
        return float(self.flops_per_token) * self.total_tokens


def optimal_batch_tokens(compute_flops: float) -> int:
    """DeepSeek LLM's fitted compute-optimal batch size, rounded to a power of two (tokens).

    >>> optimal_batch_tokens(3e19)  # nanochat depth-20 class budget -> 2^19, nanochat's batch
    524288
    """
    b = 0.292 * compute_flops ** 0.3271
    return 1 << max(10, round(math.log2(b)))


def build_model_config(cfg, vocab_size: int):
    """The ModelConfig for a pretrain config: from --depth, with --n_embd / --n_head / --n_kv_head
    overrides."""
    from chatforge.model import ModelConfig

    if cfg.depth < 1:
        raise ChatforgeError(f"--depth {cfg.depth}: must be at least 1")
    overrides: dict[str, int] = {}
    if cfg.n_embd or cfg.n_head:
        base = ModelConfig.from_depth(cfg.depth, vocab_size, cfg.max_seq_len)
        n_embd = cfg.n_embd or base.n_embd
        n_head = cfg.n_head or max(1, n_embd // base.head_dim)
        if n_embd % n_head:
            raise ChatforgeError(f"--n_embd {n_embd} is not divisible by --n_head {n_head}")
        overrides.update(n_embd=n_embd, n_head=n_head, n_kv_head=n_head, head_dim=n_embd // n_head,
                         intermediate_size=0)
    if cfg.n_kv_head:
        overrides["n_kv_head"] = cfg.n_kv_head
    try:
        mc = ModelConfig.from_depth(cfg.depth, vocab_size, cfg.max_seq_len, **overrides)
    except ValueError as e:
        raise ChatforgeError(f"model shape: {e}") from None
    return mc


def derive_settings(cfg, vocab_size: int, world: int) -> Plan:
    """The plan for this run (see the module docstring); raises ChatforgeError / ConfigError on
    impossible settings, before any data is read or any compute is spent."""
    from chatforge.model import GPT
    from chatforge.optim import adamw_lr_scale

    if hasattr(cfg, "validate"):
        cfg.validate()  # per-field ranges (a config may have been changed after it was built)
    mc = build_model_config(cfg, vocab_size)
    with torch.device("meta"):  # shapes only: counting a 10B model costs no memory
        model = GPT(mc)
    n_params = model.num_params()
    flops = model.estimate_flops_per_token()
    notes = []
    per_micro = cfg.device_batch_size * cfg.max_seq_len * world
    total = cfg.total_batch_size
    planned_tokens = cfg.target_param_data_ratio * n_params
    if total <= 0:
        total = max(optimal_batch_tokens(flops * max(planned_tokens, 1)), per_micro)
        total = per_micro * math.ceil(total / per_micro)
        notes.append("total_batch_size derived: DeepSeek LLM B = 0.292 C^0.3271, power of two")
    elif total % per_micro:
        valid = per_micro * max(1, round(total / per_micro))
        raise ChatforgeError(
            f"--total_batch_size {total:,} tokens does not divide across ranks: each micro-step takes "
            f"{world} rank(s) x {cfg.device_batch_size} sequences x {cfg.max_seq_len} tokens = {per_micro:,} "
            f"tokens, so the total must be a multiple of that (e.g. {valid:,}), or change "
            f"--device_batch_size / --max_seq_len / the number of processes")
    grad_accum = total // per_micro
    if cfg.num_iterations > 0:
        iters = cfg.num_iterations
    else:
        if cfg.target_param_data_ratio <= 0:
            raise ChatforgeError("set --num_iterations or a positive --target_param_data_ratio")
        iters = max(1, round(planned_tokens / total))
        notes.append(f"num_iterations derived: {cfg.target_param_data_ratio:g} tokens/parameter")
    scale = adamw_lr_scale(mc.n_embd)
    lrs = {"matrix (Muon)": cfg.matrix_lr, "embedding (AdamW)": cfg.embedding_lr * scale,
           "lm_head (AdamW)": cfg.unembedding_lr * scale, "scalar (AdamW)": cfg.scalar_lr * scale}
    return Plan(model_config=mc, num_params=n_params, num_scaling_params=n_params, flops_per_token=flops,
                world=world, device_batch_size=cfg.device_batch_size, seq_len=cfg.max_seq_len,
                total_batch_size=total, grad_accum=grad_accum, num_iterations=iters,
                warmup_steps=round(cfg.warmup_ratio * iters), warmdown_steps=round(cfg.warmdown_ratio * iters),
                lrs=lrs, notes=notes)


def estimate_rows(plan: Plan, device_name: str | None) -> list[tuple[str, float, float | None]]:
    """(setup, hours, dollars) at ASSUMED_MFU for this device (when it is a known GPU) and the
    reference setups."""
    rows = []
    setups = list(REFERENCE_SETUPS)
    if device_name and gpu_peak_flops(device_name):
        setups.insert(0, (device_name, plan.world))
    for name, n in setups:
        peak = gpu_peak_flops(name)
        hours = plan.total_flops / (n * peak * ASSUMED_MFU) / 3600
        price = gpu_price(name)
        rows.append((f"{n} x {name}", hours, None if price is None else hours * n * price))
    return rows


def describe_plan(plan: Plan, device: torch.device, device_name: str | None = None) -> str:
    """The plan as the lines printed before training (and by --dry_run)."""
    mc = plan.model_config
    lines = [
        f"model: depth {mc.n_layer}, width {mc.n_embd}, {mc.n_head} heads x {mc.head_dim} "
        f"({mc.n_kv_head} kv), MLP {mc.intermediate_size}, vocab {mc.vocab_size:,}, context {mc.max_seq_len}",
        f"parameters: {plan.num_params:,}   FLOPs/token (training): {plan.flops_per_token:,} "
        f"({plan.flops_per_token / 1e9:.3g} GFLOP)",
        f"batch: {plan.total_batch_size:,} tokens/step = {plan.world} rank(s) x {plan.device_batch_size} seqs "
        f"x {plan.seq_len} tokens x {plan.grad_accum} accumulation step(s)",
        f"steps: {plan.num_iterations:,}   tokens: {plan.total_tokens:,} "
        f"({plan.total_tokens / max(plan.num_scaling_params, 1):.2f} per parameter)   "
        f"total FLOPs: {plan.total_flops:.3g}",
        "learning rates: " + ", ".join(f"{k} {v:.4g}" for k, v in plan.lrs.items())
        + f"; warmup {plan.warmup_steps} steps, warmdown {plan.warmdown_steps} steps",
        f"device: {device_name or device.type}, {plan.world} process(es), compute dtype {plan.dtype}",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"estimated time at {ASSUMED_MFU:.0%} MFU (bf16):")
    for setup, hours, dollars in estimate_rows(plan, device_name):
        cost = "" if dollars is None else f"  ~${dollars:,.0f}" if dollars >= 10 else f"  ~${dollars:.2f}"
        lines.append(f"  {setup:<24} {fmt_hours(hours)}{cost}")
    if device.type != "cuda":
        lines.append("  (no FLOP/s table for CPUs: the progress bar's ETA is the estimate here)")
    return "\n".join(lines)


def check_resume(ckpt: Path, plan: Plan, tok_vocab: int) -> dict:
    """Validate a checkpoint against this run before any compute: same architecture, same vocab,
    context within what it was built for. Returns its config.json."""
    from chatforge.checkpoint import read_config

    conf = read_config(ckpt)  # a non-chatforge folder (e.g. a HF model) is a clear error here
    saved = conf.get("model", {})
    if saved.get("vocab_size") != tok_vocab:
        raise ChatforgeError(
            f"checkpoint {ckpt} has a vocabulary of {saved.get('vocab_size')} tokens but this run's tokenizer "
            f"has {tok_vocab}: they were made with different tokenizers. Use the matching tokenizer, or "
            f"start over with --force")
    if saved.get("max_seq_len", 0) < plan.model_config.max_seq_len:
        raise ChatforgeError(
            f"--max_seq_len {plan.model_config.max_seq_len} is longer than the {saved.get('max_seq_len')} "
            f"tokens the checkpoint {ckpt} supports; keep --max_seq_len {saved.get('max_seq_len')} to resume")
    want = asdict(plan.model_config)
    diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in list(diff.items())[:4])
        raise ChatforgeError(
            f"checkpoint {ckpt} is a different architecture ({shown}); resume with the settings it was "
            f"trained with, or pass --force to start a new model")
    if conf.get("stage") not in (None, "pretrain"):
        raise ChatforgeError(f"checkpoint {ckpt} comes from stage '{conf.get('stage')}', not pretrain")
    return conf


def check_resume_state(ckpt: Path, train_state: dict | None, plan: Plan, token_index: str) -> None:
    """The trainer state of a checkpoint must fit this run: the same global batch (the data position
    counts rows of it) and the same token shards (the position means nothing on other shards)."""
    if not train_state:
        raise ChatforgeError(f"checkpoint {ckpt} has no trainer state to resume from; pass --force to start over")
    if int(train_state.get("total_batch_size", plan.total_batch_size)) != plan.total_batch_size:
        raise ChatforgeError(f"checkpoint {ckpt} was trained with --total_batch_size "
                             f"{train_state['total_batch_size']}, this run asks for {plan.total_batch_size}; "
                             f"keep it to resume")
    if train_state.get("token_index", token_index) != token_index:
        raise ChatforgeError(f"checkpoint {ckpt} was trained on other token shards than this run holds now "
                             f"(the corpus, the tokenizer or the split changed), so its data position means "
                             f"nothing there; pass --force to start over")
