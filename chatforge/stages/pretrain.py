"""`chatforge pretrain`: train the base model by next-token prediction on the tokenized corpus.

One code path from 2 CPU cores to many GPUs (nanochat `scripts/base_train.py`, nanoGPT `train.py`):

    chatforge pretrain --preset tiny                                     # 2 CPU cores, fp32
    chatforge pretrain --preset gpu                                      # one GPU, bf16 autocast, compile
    torchrun --nproc_per_node=8 -m chatforge -- pretrain --preset 8xh100 # data parallel (DDP)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m chatforge -- pretrain --preset 8xh100 --fsdp                  # many nodes, sharded (FSDP2)
    chatforge pretrain --preset 8xh100 --dry_run                         # print the plan, time and cost

(The `--` keeps torchrun's own parser off our flags: it would read `--run` as its `--run-path`.)

Everything is derived from `--depth` (`derive_settings`, printed before training): the model shape
(`ModelConfig.from_depth`), the AdamW learning rates (x (width/768)^-0.5, chatforge/optim.py), the
token budget (target_param_data_ratio x parameters; 20 is Chinchilla's compute-optimal ratio,
Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556, counting all parameters as nanochat does) and
the batch size (DeepSeek LLM's fitted optimum B = 0.292 * C^0.3271 tokens for a compute budget of
C FLOPs, https://arxiv.org/abs/2401.02954, rounded to a power of two; it gives nanochat's 2^19 at
depth 20). Every derived value can be overridden by its flag.

Outputs in runs/<run>/pretrain/:

    checkpoint/      weights (safetensors), config.json, tokenizer, optimizer.pt, state.json
                     (step, data position, RNG states); replaced atomically every checkpoint_every
                     steps, at the end and on Ctrl-C / SIGTERM
    tokens/          the corpus as token shards (reused while corpus and tokenizer are unchanged)
    metrics.jsonl    one record per step (loss, lr, tokens/s, MFU on GPU), eval and sample records
    loss.png         training loss and validation bits per byte
    DONE             summary: final val bpb, the unigram baseline bpb on the same text, throughput
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge.common import ChatforgeError, get_device, is_complete, log0, physical_cores, read_done, \
    require_stage, setup_threads, stage_dir, stage_run

# Dense bf16 tensor-core peak FLOP/s per GPU, from the vendors' datasheets (no sparsity). Matched
# against torch.cuda.get_device_name(), longest name first. Used for MFU and the time estimates.
GPU_PEAK_FLOPS: dict[str, float] = {
    "B200": 2250e12,
    "H200": 989e12,
    "GH200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "RTX 6000 Ada": 364e12,
    "RTX A6000": 155e12,
    "A10G": 70e12,  # AWS does not publish it; ~70 TFLOP/s is the commonly measured figure
    "A10": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,  # fp16/bf16 with fp32 accumulate
    "V100": 125e12,  # fp16 (no bf16 on Volta)
    "MI300X": 1307e12,
    "MI250X": 383e12,
}
# Rough on-demand cloud prices in US$ per GPU-hour (2025 list prices of Lambda / RunPod class
# providers); only for the printed cost estimate.
GPU_PRICE_PER_HOUR: dict[str, float] = {
    "B200": 5.0, "H200": 3.5, "H100": 3.0, "A100": 1.8, "L40S": 1.0, "L4": 0.8, "A10": 0.75,
    "RTX 4090": 0.5, "V100": 0.5, "MI300X": 2.5,
}
# MFU assumed for the estimates: nanochat reports ~40-50% on H100 with torch.compile; 40% is a
# conservative round number. The real MFU is logged every step.
ASSUMED_MFU = 0.40
# Reference setups printed with every plan, so a CPU machine can size a GPU run.
REFERENCE_SETUPS = [("H100", 1), ("H100", 8), ("A100", 8)]

SAMPLE_PROMPTS = [
    "The capital of France is",
    "Once upon a time,",
    "Question: Natalia sold 48 clips in April and half as many in May. How many clips did she sell?\nAnswer:",
    "def fibonacci(n):",
]


def gpu_peak_flops(name: str) -> float | None:
    """Peak bf16 FLOP/s for a GPU name, or None when it is not in the table.

    >>> gpu_peak_flops("NVIDIA H100 80GB HBM3"), gpu_peak_flops("NVIDIA A10G"), gpu_peak_flops("Some GPU")
    (989000000000000.0, 70000000000000.0, None)
    """
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAK_FLOPS[key]
    return None


def gpu_price(name: str) -> float | None:
    for key in sorted(GPU_PRICE_PER_HOUR, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PRICE_PER_HOUR[key]
    return None


# ----------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    enabled: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(rank=int(os.environ.get("RANK", "0")), world=world,
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), enabled=world > 1)


def init_distributed(d: Dist, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo elsewhere) and pick this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if d.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.enabled:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------
# Derived settings


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
    """The plan for this run (see the module docstring); raises ChatforgeError on impossible
    settings, before any data is read or any compute is spent."""
    from chatforge.model import GPT
    from chatforge.optim import adamw_lr_scale

    for name in ("max_seq_len", "device_batch_size"):
        if getattr(cfg, name) < 1:
            raise ChatforgeError(f"--{name} {getattr(cfg, name)}: must be at least 1")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ChatforgeError(f"--dtype {cfg.dtype}: choose auto, float32 or bfloat16")
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
        total = max(optimal_batch_tokens(flops * planned_tokens), per_micro)
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
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ChatforgeError(f"--{name} {getattr(cfg, name)}: must be between 0 and 1")
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


def describe_plan(plan: Plan, cfg, device: torch.device, device_name: str | None) -> str:
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
        lines.append(f"  {setup:<24} {_fmt_hours(hours)}{cost}")
    if device.type != "cuda":
        lines.append("  (no FLOP/s table for CPUs: the progress bar's ETA is the estimate here)")
    return "\n".join(lines)


def _fmt_hours(h: float) -> str:
    if h < 1 / 3600:
        return "<1 s"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:.2f} h"


# ----------------------------------------------------------------------------------------------
# Corpus, evaluation, checkpoints


def resolve_corpus(cfg) -> list[Path]:
    """The corpus files: --corpus, else what the run's tokenizer stage read, else the run's data stage
    shards; globs and `stage:NAME` entries expanded (once: the list goes on to build_token_shards).
    A missing file is an error here, before anything is deleted or computed."""
    from chatforge.corpus import expand_corpus, stage_shards

    corpus = cfg.corpus
    tok_cfg = stage_dir(cfg, "tokenizer") / "config.json"
    if not corpus and tok_cfg.exists():
        corpus = json.loads(tok_cfg.read_text()).get("corpus") or []
    if corpus:
        return expand_corpus(corpus, cfg.data_dir, cfg)  # `stage:data` -> that stage's shard files
    data = require_stage(cfg, "data")
    shards = stage_shards(data)
    if not shards:
        raise ChatforgeError(f"no --corpus given and the data stage folder {data} holds no parquet shards")
    return shards


@torch.no_grad()
def evaluate_bpb(model, stream, windows, seq_len: int, batch_size: int, token_bytes: torch.Tensor,
                 device, autocast, d: Dist) -> float:
    """Bits per byte on the given windows: sum of per-token losses (nats) / ln 2 / UTF-8 bytes of the
    target tokens. Special tokens (<|bos|>, 0 bytes) count in neither sum, so the number compares
    across tokenizers (nanochat)."""
    from chatforge.dataloader import iter_eval_batches

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
    totals = all_reduce_sum(torch.stack([nats, nbytes]), d)
    model.train(was_training)
    return float(totals[0] / math.log(2) / totals[1])


def unigram_bpb(counts: np.ndarray, val_stream, windows, seq_len: int, token_bytes: np.ndarray) -> float:
    """The baseline to beat: a unigram model (train-split token frequencies `counts`, counted once
    when the shards were built, with add-one smoothing) scored on exactly the validation targets the
    model is scored on."""
    counts = counts.astype(np.float64)
    logp = np.log2(counts + 1) - np.log2(counts.sum() + counts.size)
    bits = total_bytes = 0.0
    for w in windows:
        y = val_stream.window(int(w) * seq_len + 1, seq_len)
        b = token_bytes[y]
        bits -= float((logp[y] * (b > 0)).sum())
        total_bytes += float(b.sum())
    return bits / total_bytes


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": _np_state_to_json(np.random.get_state()),
             "python": _to_lists(random.getstate())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    np.random.set_state(_np_state_from_json(state["numpy"]))
    random.setstate(_to_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8), device)


def _np_state_to_json(s):
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _np_state_from_json(s):
    return (s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


class _FullWeights:
    """What `save_checkpoint` needs from a model (config + state_dict), for weights gathered from
    FSDP shards."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state

    def state_dict(self):
        return self._state


def check_resume(ckpt: Path, plan: Plan, tok_vocab: int) -> dict:
    """Validate a checkpoint against this run before any compute: same architecture, same vocab,
    context within what it was built for. Returns its config.json."""
    from dataclasses import asdict

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


# ----------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM: finish the step, checkpoint, exit.


class StopFlag:
    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop right now
                raise KeyboardInterrupt
            self.requested = True
            log0(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
                 "(Ctrl-C again to abort without saving)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class NonFiniteLoss(ChatforgeError):
    pass


# ----------------------------------------------------------------------------------------------
# The stage


def run(cfg) -> dict | None:
    d = dist_from_env()
    threads = cfg.threads or max(1, physical_cores() // max(1, d.local_world))
    setup_threads(threads)
    torch.set_num_threads(threads)
    device = init_distributed(d, get_device(cfg.device))
    try:
        return _run(cfg, d, device)
    finally:
        if d.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(cfg, d: Dist, device: torch.device) -> dict | None:
    from chatforge.tokenizer import Tokenizer

    out = stage_dir(cfg, "pretrain")
    if is_complete(out) and not cfg.force and not cfg.dry_run:
        log0(f"pretrain: run '{cfg.run}' is complete ({out / 'DONE'}); pass --force to train again")
        return read_done(out)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None

    # 1. Tokenizer and plan: cheap, and every setting error surfaces here.
    if cfg.dry_run and not is_complete(stage_dir(cfg, "tokenizer")):
        tok, tok_dir, vocab = None, None, 32768
        log0("(dry run without a trained tokenizer: assuming a 32,768-token vocabulary)")
    else:
        tok_dir = require_stage(cfg, "tokenizer")
        tok = Tokenizer.load(tok_dir)
        vocab = tok.vocab_size
    plan = derive_settings(cfg, vocab, d.world)
    # bf16 autocast on CUDA (matmuls in bf16, master weights and optimizer state in fp32); float32
    # elsewhere unless asked (CPUs with AVX512-BF16/AMX run bf16 matmuls fast too).
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        amp_dtype, plan.dtype = torch.bfloat16, "bfloat16 autocast"
    else:
        amp_dtype = None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls left run on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    log0(describe_plan(plan, cfg, device, device_name))
    if cfg.dry_run:
        return None

    corpus = resolve_corpus(cfg)  # a missing file is an error now, before anything is deleted
    ckpt = out / "checkpoint"
    if cfg.force and d.master:
        shutil.rmtree(ckpt, ignore_errors=True)
    barrier(d)
    resume = cfg.resume and not cfg.force and ckpt.exists()
    if resume:
        check_resume(ckpt, plan, vocab)
    if not resume and d.master:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh start gets a fresh log

    with (stage_run(cfg, "pretrain") if d.master else contextlib.nullcontext()) as srun:
        return _train(cfg, d, device, device_name, tok, tok_dir, plan, corpus, ckpt, resume, amp_dtype, srun)


def _train(cfg, d, device, device_name, tok, tok_dir, plan, corpus, ckpt, resume, amp_dtype, srun):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)
    from tqdm import tqdm

    from chatforge.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
    from chatforge.dataloader import (PackedLoader, TokenStream, build_token_shards, eval_windows, read_index,
                                      train_token_counts)
    from chatforge.model import GPT
    from chatforge.optim import build_optimizer, clip_grad_norm, lr_multiplier, muon_momentum

    out = stage_dir(cfg, "pretrain")
    log = srun.log if srun is not None else (lambda **kw: None)
    say = log0

    # 2. Token shards (one writer per node, the others wait).
    tokens_dir = out / "tokens"
    if d.local_rank == 0:
        index = build_token_shards(tokens_dir, tok, corpus, data_dir=cfg.data_dir, doc_chars=cfg.doc_chars,
                                   max_chars=cfg.max_chars, val_fraction=cfg.val_fraction, log=say)
    barrier(d)
    if d.local_rank != 0:
        index = read_index(tokens_dir)
    if index["vocab_size"] != tok.vocab_size:
        raise ChatforgeError(f"token shards in {tokens_dir} were made with a {index['vocab_size']}-token "
                             f"vocabulary, the tokenizer has {tok.vocab_size}; delete {tokens_dir}")
    train_stream = TokenStream(tokens_dir, index, "train")
    val_stream = TokenStream(tokens_dir, index, "val")
    loader = PackedLoader(train_stream, plan.device_batch_size, plan.seq_len, rank=d.rank, world_size=d.world,
                          grad_accum=plan.grad_accum, seed=cfg.seed, device=device)
    val_windows = eval_windows(val_stream, plan.seq_len, cfg.eval_tokens, d.rank, d.world)
    token_bytes_np = np.asarray(tok.token_bytes(), dtype=np.int64)
    token_bytes = torch.tensor(token_bytes_np, device=device,
                               dtype=torch.float32 if device.type == "mps" else torch.float64)

    # 3. Model: the same seeded init on every rank (or the checkpoint's weights).
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    train_state: dict = {}
    if resume:
        model, info = load_checkpoint(ckpt, "cpu")
        train_state = info["train_state"] or {}
        model = model.to(device)
    else:
        with torch.device(device):
            model = GPT(plan.model_config)
    raw = model
    if cfg.fsdp and d.enabled:
        from torch.distributed.fsdp import fully_shard

        for block in raw.blocks:
            fully_shard(block)
        fully_shard(raw)
        train_model = raw
    elif d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_model = raw
    eager_model = train_model
    if cfg.compile:
        # Inductor fuses the elementwise work (norms, RoPE, SwiGLU) around the matmuls: ~15% faster
        # steps on CPU too (measured, bench/RESULTS.md), where it generates C++ and needs a compiler.
        if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
            say("note: --compile on CPU needs a C++ compiler (g++ or $CXX); none found, running eagerly")
        else:
            train_model = torch.compile(train_model)

    opt = build_optimizer(raw.param_groups(), plan.model_config.n_embd, matrix_lr=cfg.matrix_lr,
                          embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                          scalar_lr=cfg.scalar_lr, weight_decay=cfg.weight_decay,
                          fused=True if device.type == "cuda" else None)
    optimizers = list(opt.optimizers.values())
    sd_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    step = 0
    if resume:
        state = load_optimizer_state(ckpt)
        if state is None or not train_state:
            raise ChatforgeError(f"checkpoint {ckpt} has no optimizer/trainer state to resume from; "
                                 f"pass --force to start over")
        if int(train_state.get("total_batch_size", plan.total_batch_size)) != plan.total_batch_size:
            raise ChatforgeError(f"checkpoint {ckpt} was trained with --total_batch_size "
                                 f"{train_state['total_batch_size']}, this run asks for {plan.total_batch_size}; "
                                 f"keep it to resume")
        if train_state.get("token_index", index["fingerprint"]) != index["fingerprint"]:
            raise ChatforgeError(f"checkpoint {ckpt} was trained on other token shards than {tokens_dir} holds now "
                                 f"(the corpus, the tokenizer or the split changed), so its data position means "
                                 f"nothing there; pass --force to start over")
        set_optimizer_state_dict(raw, optimizers, state, options=StateDictOptions(full_state_dict=True))
        loader.load_state_dict(train_state["loader"])
        set_rng_state(train_state["rng"], device)
        step = int(train_state["step"])
        say(f"resumed from {ckpt} at step {step:,}")

    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    peak = gpu_peak_flops(device_name) if device_name else None
    smooth = float(train_state.get("smooth_loss", 0.0))
    tokens_seen = int(train_state.get("tokens_seen", 0))
    train_time = float(train_state.get("train_time", 0.0))
    last_bpb = train_state.get("val_bpb")
    unigram = None
    if d.master:
        unigram = unigram_bpb(train_token_counts(tokens_dir), val_stream,
                              eval_windows(val_stream, plan.seq_len, cfg.eval_tokens, 0, 1),
                              plan.seq_len, token_bytes_np)
        say(f"unigram baseline on the validation text: {unigram:.4f} bits/byte")
        log(event="baseline", unigram_bpb=unigram, val_tokens=int(len(val_windows) * d.world * plan.seq_len))

    def save(at_step: int) -> None:
        model_sd = get_model_state_dict(raw, options=sd_opts) if cfg.fsdp and d.enabled else None
        opt_sd = get_optimizer_state_dict(raw, optimizers, options=sd_opts)
        if d.master:
            t0 = time.time()
            weights = _FullWeights(plan.model_config, model_sd) if model_sd is not None else raw
            save_checkpoint(ckpt, weights, tokenizer_dir=tok_dir, optimizer_state=opt_sd, train_state={
                "step": at_step, "loader": loader.state_dict(), "token_index": index["fingerprint"],
                "rng": rng_state(device),
                "smooth_loss": smooth, "tokens_seen": tokens_seen, "train_time": train_time,
                "val_bpb": last_bpb, "total_batch_size": plan.total_batch_size, "world_size": d.world,
                "num_iterations": plan.num_iterations, "min_val_bpb": min_bpb,
                "last_eval_step": last_eval_step, "last_sample_step": last_sample_step,
            }, meta={"stage": "pretrain", "run": cfg.run, "step": at_step, "val_bpb": last_bpb})
            log(event="checkpoint", step=at_step, seconds=round(time.time() - t0, 3))
        barrier(d)

    def sample_text(max_new: int) -> list[str]:
        """Greedy continuations of SAMPLE_PROMPTS up to a new document (<|bos|>), one prompt at a time
        so each gets the context it leaves (a prompt that fills the context stays as it is). A fresh
        Engine each time: its packed CPU weights are a copy that must not outlive the call."""
        from chatforge.engine import Engine

        engine = Engine(raw, tok, tools={}, device=device)
        outs = []
        for prompt in SAMPLE_PROMPTS:
            ids = [tok.bos_id] + tok.encode(prompt)
            if len(ids) >= raw.config.max_seq_len:
                outs.append(prompt)
                continue
            [c] = engine.generate([ids], max_tokens=max_new, temperature=0.0, stop_tokens=[tok.bos_id],
                                  use_tools=False)
            outs.append(prompt + c.text)
        return outs

    stop = StopFlag()
    bar = tqdm(total=plan.num_iterations, initial=step, disable=not d.master, unit="step", dynamic_ncols=True,
               desc="pretrain")
    min_bpb = train_state.get("min_val_bpb")
    # Evaluations and samples run at the top of a step, before a periodic checkpoint; these stop a
    # resumed run from repeating them.
    last_eval_step = train_state.get("last_eval_step", -1)
    last_sample_step = train_state.get("last_sample_step", -1)
    start_step = step
    last_loss = float("nan")
    with stop, contextlib.closing(bar):
        while True:
            last = step >= plan.num_iterations
            # -- periodic work, at the top of a step (also at the very end) --
            if step > 0 and step != last_eval_step and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
                t0 = time.time()
                last_bpb = evaluate_bpb(raw, val_stream, val_windows, plan.seq_len, plan.device_batch_size,
                                        token_bytes, device, autocast, d)
                min_bpb = last_bpb if min_bpb is None else min(min_bpb, last_bpb)
                log(event="eval", step=step, val_bpb=last_bpb, seconds=round(time.time() - t0, 3))
                last_eval_step = step
                if d.master:
                    bar.write(f"step {step:,}: val bpb {last_bpb:.4f} (unigram {unigram:.4f})")
            if step > 0 and step != last_sample_step and (last or (cfg.sample_every > 0 and step % cfg.sample_every == 0)):
                last_sample_step = step
                if d.master or (cfg.fsdp and d.enabled):
                    texts = sample_text(32 if plan.seq_len >= 64 else 8)
                    if d.master:
                        log(event="samples", step=step, samples=texts)
                        for t in texts:
                            bar.write("  > " + t.replace("\n", "\\n"))
                barrier(d)
            if step > start_step and (last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)):
                save(step)
            if last:
                break

            # -- one optimizer step --
            t0 = time.time()
            lrm = lr_multiplier(step, plan.num_iterations, plan.warmup_steps, plan.warmdown_steps,
                                cfg.final_lr_frac)
            opt.set_lr(lrm)
            opt.set_muon_momentum(muon_momentum(step))
            loss_sum = torch.zeros((), device=device)
            for micro in range(plan.grad_accum):
                x, y = loader.next_batch()
                sync = micro == plan.grad_accum - 1
                if isinstance(train_model, torch.nn.parallel.DistributedDataParallel) and not sync:
                    ctx = train_model.no_sync()
                else:
                    ctx = contextlib.nullcontext()
                    if cfg.fsdp and d.enabled and hasattr(raw, "set_requires_gradient_sync"):
                        raw.set_requires_gradient_sync(sync)
                with ctx:
                    with autocast():
                        try:
                            loss = train_model(x, y)
                        except Exception as e:  # a compiler failure (first call): train eagerly instead
                            if train_model is eager_model or not _is_compile_error(e):
                                raise
                            say(f"note: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
                                f"running eagerly")
                            train_model = eager_model
                            loss = train_model(x, y)
                    (loss / plan.grad_accum).backward()
                loss_sum += loss.detach().float()
            # One small all-reduce carries the loss (for logging and the NaN check) and the stop flag,
            # so every rank agrees on both.
            flags = all_reduce_sum(torch.stack([loss_sum / plan.grad_accum,
                                                torch.tensor(float(stop.requested), device=device)]), d)
            step_loss = float(flags[0]) / d.world
            stop_now = float(flags[1]) > 0
            gnorm = clip_grad_norm(raw.parameters(), cfg.grad_clip)
            if not math.isfinite(step_loss) or not math.isfinite(gnorm):
                what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                value = step_loss if not math.isfinite(step_loss) else gnorm
                kept = (f"the last good checkpoint is kept at {ckpt} (step {_ckpt_step(ckpt)})" if ckpt.exists()
                        else "no checkpoint was written yet")
                log(event="nonfinite", step=step + 1, what=what, value=str(value))
                raise NonFiniteLoss(
                    f"training diverged: the {what} is {value} at step {step + 1} (lr multiplier {lrm:.3g}); "
                    f"stopped before applying the update, {kept}. Lower the learning rates "
                    f"(--matrix_lr, --embedding_lr, --unembedding_lr), raise --warmup_ratio or lower "
                    f"--grad_clip, or check the data; rerunning continues from the checkpoint")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.time() - t0
            step += 1
            train_time += dt
            tokens_seen += plan.total_batch_size
            last_loss = step_loss
            smooth = 0.9 * smooth + 0.1 * step_loss
            debiased = smooth / (1 - 0.9 ** step)
            tps = plan.total_batch_size / dt
            rec = dict(step=step, loss=step_loss, smooth_loss=debiased, lr_mult=lrm,
                       lr=cfg.matrix_lr * lrm, grad_norm=gnorm, tokens=tokens_seen, tokens_per_s=tps, dt=dt)
            if peak:
                rec["mfu"] = plan.flops_per_token * tps / (peak * d.world)
            log(**rec)
            bar.set_postfix(loss=f"{debiased:.3f}", tok_s=f"{tps:,.0f}",
                            **({"mfu": f"{rec['mfu']:.1%}"} if peak else {}), refresh=False)
            bar.update(1)
            if stop_now:
                save(step)
                bar.close()
                say(f"stopped at step {step:,}: checkpoint saved to {ckpt}; rerun the same command to resume")
                raise KeyboardInterrupt
    bar.close()

    summary = {
        "step": step, "num_params": plan.num_params, "flops_per_token": plan.flops_per_token,
        "tokens": tokens_seen, "total_batch_size": plan.total_batch_size, "world_size": d.world,
        "val_bpb": last_bpb, "min_val_bpb": min_bpb, "unigram_bpb": unigram,
        "train_loss": last_loss, "train_seconds": round(train_time, 2),
        "tokens_per_s": tokens_seen / train_time if train_time else None,
        "device": device_name or device.type, "checkpoint": str(ckpt),
    }
    if device.type == "cuda":
        summary["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if d.master:
        srun.close()
        try:
            plot_losses(out / "metrics.jsonl", out / "loss.png", unigram)
            summary["plot"] = str(out / "loss.png")
        except ImportError:
            say("matplotlib is not installed: no loss.png (pip install matplotlib)")
        srun.finish(summary)
        say(f"done: val bpb {last_bpb:.4f} vs unigram {unigram:.4f}; checkpoint {ckpt}")
    return summary


def _is_compile_error(e: Exception) -> bool:
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor")) or "inductor" in str(e).lower()


def _ckpt_step(ckpt: Path):
    try:
        return json.loads((ckpt / "config.json").read_text()).get("step")
    except (OSError, json.JSONDecodeError):
        return "?"


def plot_losses(metrics: Path, png: Path, unigram: float | None = None) -> None:
    """Training loss per step and validation bpb per evaluation, from metrics.jsonl (a resumed run's
    re-done steps take the latest record)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = {}, {}
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in r and "step" in r and "event" not in r:
            train[r["step"]] = (r["loss"], r.get("smooth_loss", r["loss"]))
        elif r.get("event") == "eval":
            val[r["step"]] = r["val_bpb"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    s = sorted(train)
    a1.plot(s, [train[k][0] for k in s], lw=0.6, alpha=0.5, label="loss")
    a1.plot(s, [train[k][1] for k in s], lw=1.5, label="smoothed")
    a1.set_xlabel("step")
    a1.set_ylabel("train loss (nats/token)")
    a1.legend()
    a1.grid(alpha=0.3)
    v = sorted(val)
    a2.plot(v, [val[k] for k in v], "o-", label="model")
    if unigram:
        a2.axhline(unigram, color="gray", ls="--", label=f"unigram {unigram:.3f}")
    a2.set_xlabel("step")
    a2.set_ylabel("validation bits per byte")
    a2.legend()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
