"""`chatforge pretrain`: train the base model by next-token prediction on the tokenized corpus.

One code path from 2 CPU cores to many GPUs (nanochat `scripts/base_train.py`, nanoGPT `train.py`):

    chatforge pretrain --preset tiny                                     # 2 CPU cores, fp32
    chatforge pretrain --preset gpu                                      # one GPU, bf16 autocast, compile
    torchrun --nproc_per_node=8 -m chatforge -- pretrain --preset 8xh100 # data parallel (DDP)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m chatforge -- pretrain --preset 8xh100 --fsdp                  # many nodes, sharded (FSDP2)
    chatforge pretrain --preset 8xh100 --dry_run                         # print the plan, time and cost

(The `--` keeps torchrun's own parser off our flags: it would read `--run` as its `--run-path`.)

This module only wires the library together: the plan (chatforge/plan.py: everything derived from
`--depth`, printed before training), the token shards and loader (chatforge/dataloader.py), the model
and optimizers (model.py, optim.py), the training loop (train_loop.py: accumulation, clipping, NaN
stop, periodic eval / samples / checkpoints, Ctrl-C, resume), bits per byte (bpb.py), plots.py.

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
import shutil

import numpy as np
import torch

from chatforge.common import ChatforgeError, amp_dtype as resolve_amp, is_complete, log0, read_done, \
    require_stage, stage_dir, stage_run
from chatforge.distributed import Dist, barrier, training_process
from chatforge.plan import check_resume, check_resume_state, derive_settings, describe_plan

SAMPLE_PROMPTS = [
    "The capital of France is",
    "Once upon a time,",
    "Question: Natalia sold 48 clips in April and half as many in May. How many clips did she sell?\nAnswer:",
    "def fibonacci(n):",
]
DIVERGE_HINT = ("lower the learning rates (--matrix_lr, --embedding_lr, --unembedding_lr), raise --warmup_ratio "
                "or lower --grad_clip, or check the data")


def run(cfg) -> dict | None:
    with training_process(cfg.threads, cfg.device) as (d, device):
        return _run(cfg, d, device)


def _run(cfg, d: Dist, device: torch.device) -> dict | None:
    from chatforge.dataloader import resolve_corpus
    from chatforge.hardware import device_name
    from chatforge.tokenizer import Tokenizer

    out = stage_dir(cfg, "pretrain")
    if is_complete(out) and not cfg.force and not cfg.dry_run:
        log0(f"pretrain: run '{cfg.run}' is complete ({out / 'DONE'}); pass --force to train again")
        return read_done(out)

    # 1. Tokenizer and plan: cheap, and every setting error surfaces here.
    if cfg.dry_run and not is_complete(stage_dir(cfg, "tokenizer")):
        tok, tok_dir, vocab = None, None, 32768
        log0("(dry run without a trained tokenizer: assuming a 32,768-token vocabulary)")
    else:
        tok_dir = require_stage(cfg, "tokenizer")
        tok = Tokenizer.load(tok_dir)
        vocab = tok.vocab_size
    plan = derive_settings(cfg, vocab, d.world)
    # bf16 autocast on CUDA and on CPUs with AMX (matmuls in bf16, master weights and optimizer state
    # in fp32); float32 elsewhere unless asked.
    amp_dtype = resolve_amp(cfg.dtype, device, cpu_bf16=True)
    if amp_dtype is not None:
        plan.dtype = "bfloat16 autocast"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls left run on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    log0(describe_plan(plan, device, device_name(device)))
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
        return _train(cfg, d, device, tok, tok_dir, plan, corpus, resume, amp_dtype, srun)


def _train(cfg, d, device, tok, tok_dir, plan, corpus, resume, amp_dtype, srun) -> dict:
    from chatforge.bpb import evaluate_bpb, unigram_bpb
    from chatforge.checkpoint import load_checkpoint
    from chatforge.dataloader import (PackedLoader, TokenStream, bad_records_note, build_token_shards, eval_windows,
                                      read_index, train_token_counts)
    from chatforge.hardware import device_name
    from chatforge.model import GPT
    from chatforge.optim import build_optimizer, lr_multiplier, muon_momentum
    from chatforge.plots import plot_losses
    from chatforge.rng import seed_everything
    from chatforge.train_loop import Checkpointer, LoopConfig, Trainer, greedy_samples, prepare_model

    out = stage_dir(cfg, "pretrain")
    log = srun.log if srun is not None else None

    # 2. Token shards (one writer per node, the others wait) and the loader.
    tokens_dir = out / "tokens"
    if d.local_rank == 0:
        index = build_token_shards(tokens_dir, tok, corpus, data_dir=cfg.data_dir, doc_chars=cfg.doc_chars,
                                   max_chars=cfg.max_chars, val_fraction=cfg.val_fraction, log=log0)
    barrier(d)
    if d.local_rank != 0:
        index = read_index(tokens_dir)
    if index["vocab_size"] != tok.vocab_size:
        raise ChatforgeError(f"token shards in {tokens_dir} were made with a {index['vocab_size']}-token "
                             f"vocabulary, the tokenizer has {tok.vocab_size}; delete {tokens_dir}")
    val_stream = TokenStream(tokens_dir, index, "val")
    loader = PackedLoader(TokenStream(tokens_dir, index, "train"), plan.device_batch_size, plan.seq_len,
                          rank=d.rank, world_size=d.world, grad_accum=plan.grad_accum, seed=cfg.seed, device=device)
    val_windows = eval_windows(val_stream, plan.seq_len, cfg.eval_tokens, d.rank, d.world)
    token_bytes_np = np.asarray(tok.token_bytes(), dtype=np.int64)
    token_bytes = torch.tensor(token_bytes_np, device=device,
                               dtype=torch.float32 if device.type == "mps" else torch.float64)

    # 3. Model (the same seeded init on every rank, or the checkpoint's weights), optimizer, loop.
    seed_everything(cfg.seed)
    ckpt = Checkpointer(out / "checkpoint", tokenizer_dir=tok_dir, meta={"stage": "pretrain", "run": cfg.run},
                        extra_state={"total_batch_size": plan.total_batch_size, "token_index": index["fingerprint"]})
    info = None
    if resume:
        model, info = load_checkpoint(ckpt.path, "cpu")
        check_resume_state(ckpt.path, info["train_state"], plan, index["fingerprint"])
        model = model.to(device)
    else:
        with torch.device(device):
            model = GPT(plan.model_config)
    prepared = prepare_model(model, d, device, fsdp=cfg.fsdp, compile=cfg.compile)
    opt = build_optimizer(model.param_groups(), plan.model_config.n_embd, matrix_lr=cfg.matrix_lr,
                          embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                          scalar_lr=cfg.scalar_lr, weight_decay=cfg.weight_decay,
                          fused=True if device.type == "cuda" else None)

    unigram = None
    if d.master:
        # every rank's windows: exactly the targets the model is scored on
        all_windows = eval_windows(val_stream, plan.seq_len, cfg.eval_tokens, None, d.world)
        unigram = unigram_bpb(train_token_counts(tokens_dir), val_stream, all_windows, plan.seq_len, token_bytes_np)
        log0(f"unigram baseline on the validation text: {unigram:.4f} bits/byte")
        if log:
            log(event="baseline", unigram_bpb=unigram, val_windows=len(all_windows),
                val_tokens=int(len(all_windows) * plan.seq_len))

    def evaluate(t: Trainer) -> dict:
        bpb = evaluate_bpb(model, val_stream, val_windows, plan.seq_len, plan.device_batch_size, token_bytes,
                           device, t.autocast, d)
        if d.master:  # (the baseline is computed on rank 0)
            t.write(f"step {t.state.step:,}: val bpb {bpb:.4f} (unigram {unigram:.4f})")
        return {"val_bpb": bpb}

    def sample(t: Trainer) -> list[str]:
        return greedy_samples(model, tok, SAMPLE_PROMPTS, 32 if plan.seq_len >= 64 else 8, device)

    def set_momentum(step: int) -> None:
        opt.set_muon_momentum(muon_momentum(step))

    trainer = Trainer(
        prepared, opt, lambda m, batch: m(*batch), loader,
        LoopConfig(num_steps=plan.num_iterations, grad_accum=plan.grad_accum, grad_clip=cfg.grad_clip,
                   tokens_per_step=plan.total_batch_size, flops_per_token=plan.flops_per_token,
                   eval_every=cfg.eval_every, sample_every=cfg.sample_every, checkpoint_every=cfg.checkpoint_every,
                   best_metric="val_bpb", name="pretrain", diverge_hint=DIVERGE_HINT),
        dist=d, device=device, amp_dtype=amp_dtype, evaluate=evaluate, sample=sample, checkpointer=ckpt, log=log,
        lr_schedule=lambda step: lr_multiplier(step, plan.num_iterations, plan.warmup_steps, plan.warmdown_steps,
                                               cfg.final_lr_frac),
        on_step=set_momentum)
    if info is not None:
        trainer.resume(info)
    s = trainer.run()

    # 4. Summary, plot, DONE.
    val_bpb = s.metrics.get("val_bpb")
    summary = {
        "step": s.step, "num_params": plan.num_params, "flops_per_token": plan.flops_per_token,
        "tokens": s.tokens, "total_batch_size": plan.total_batch_size, "world_size": d.world,
        "val_bpb": val_bpb, "min_val_bpb": s.best, "unigram_bpb": unigram,
        "train_loss": s.last_loss, "train_seconds": round(s.train_time, 2),
        "tokens_per_s": s.tokens / s.train_time if s.train_time else None,
        "device": device_name(device) or device.type, "checkpoint": str(ckpt.path),
        "bad_records": int(index.get("bad_records", 0)),
    }
    if device.type == "cuda":
        summary["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if d.master:
        srun.close()
        try:
            summary["plot"] = str(plot_losses(out / "metrics.jsonl", out / "loss.png", unigram))
        except ImportError:
            log0("matplotlib is not installed: no loss.png (pip install matplotlib)")
        srun.finish(summary)
        log0(f"done: val bpb {val_bpb:.4f} vs unigram {unigram:.4f}; checkpoint {ckpt.path}; "
             f"{bad_records_note(index)} in the corpus")
    return summary
