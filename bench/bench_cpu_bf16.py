#!/usr/bin/env python
"""Pretraining on the CPU in float32 vs bf16 autocast: speed and what it does to the loss.

Two copies of chatforge's model at the preset's shape, seeded alike, trained on the same packed batches
(chatforge's loader, same seed; asserted) with the pretrain stage's optimizer, schedule and loop
(`Trainer.train_step`), eager, the same threads; one in float32, one under bf16 autocast (master weights
and optimizer state float32 in both, as the pretrain stage runs them). They train interleaved, one step
each in turn, so background load slows both alike. Speed is timed after --warmup steps; then both are
scored on the same validation windows. bf16 changes the numbers, so the outputs cannot be identical:
the table shows how far apart the losses drift instead.

    python bench/bench_cpu_bf16.py --steps 60        # needs runs/tiny/tokenizer (chatforge tokenizer --preset tiny)

On a CPU with AMX (Intel Sapphire Rapids and later) oneDNN runs the bf16 matmuls in hardware; elsewhere
torch emulates them, and this shows whether bf16 is worth it there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.common import cpu_has_amx, require_stage, stage_dir  # noqa: E402
from chatforge.config import PretrainConfig, resolve_config  # noqa: E402
from chatforge.dataloader import PackedLoader, TokenStream, build_token_shards, eval_windows, resolve_corpus  # noqa: E402
from chatforge.distributed import Dist  # noqa: E402
from chatforge.model import GPT  # noqa: E402
from chatforge.optim import build_optimizer, lr_multiplier, muon_momentum  # noqa: E402
from chatforge.plan import derive_settings  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402
from chatforge.train_loop import LoopConfig, Trainer, prepare_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import evaluate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per side (default 60)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing (default 5)")
    ap.add_argument("--runs_dir", default="runs")
    ap.add_argument("--run", default="tiny", help="run whose tokenizer stage to use (default tiny)")
    ap.add_argument("--preset", default="tiny", help="pretrain preset giving model size and batch (default tiny)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = resolve_config(PretrainConfig, preset=args.preset, overrides={"run": args.run, "runs_dir": args.runs_dir})
    tok = Tokenizer.load(require_stage(cfg, "tokenizer"))
    plan = derive_settings(cfg, tok.vocab_size, 1)
    tokens_dir = stage_dir(cfg, "pretrain") / "tokens"
    index = build_token_shards(tokens_dir, tok, resolve_corpus(cfg), data_dir=cfg.data_dir, doc_chars=cfg.doc_chars,
                               max_chars=cfg.max_chars, val_fraction=cfg.val_fraction)
    train, val = TokenStream(tokens_dir, index, "train"), TokenStream(tokens_dir, index, "val")
    windows = eval_windows(val, plan.seq_len, cfg.eval_tokens)
    token_bytes = torch.tensor(tok.token_bytes())
    B, T, accum = plan.device_batch_size, plan.seq_len, plan.grad_accum
    a, b = (PackedLoader(train, B, T, grad_accum=accum, seed=cfg.seed).next_batch() for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "both sides must see the same batches"

    sides = {}
    for name, amp in (("float32", None), ("bf16 autocast", torch.bfloat16)):
        torch.manual_seed(cfg.seed)
        model = GPT(plan.model_config)
        opt = build_optimizer(model.param_groups(), plan.model_config.n_embd, matrix_lr=cfg.matrix_lr,
                              embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                              scalar_lr=cfg.scalar_lr, weight_decay=cfg.weight_decay)
        warmup, warmdown = round(cfg.warmup_ratio * args.steps), round(cfg.warmdown_ratio * args.steps)
        trainer = Trainer(prepare_model(model, Dist(), torch.device("cpu"), compile=False, say=print), opt,
                          lambda m, batch: m(*batch), PackedLoader(train, B, T, grad_accum=accum, seed=cfg.seed),
                          LoopConfig(num_steps=args.steps, grad_accum=accum, grad_clip=cfg.grad_clip,
                                     tokens_per_step=plan.total_batch_size),
                          device="cpu", amp_dtype=amp,
                          lr_schedule=lambda s, u=warmup, w=warmdown: lr_multiplier(s, args.steps, u, w),
                          on_step=lambda s, o=opt: o.set_muon_momentum(muon_momentum(s)), say=print)
        sides[name] = dict(model=model, trainer=trainer, amp=amp, seconds=0.0, losses=[])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, AMX {cpu_has_amx()}, "
          f"{args.steps} steps of {plan.total_batch_size:,} tokens ({B}x{T}x{accum}) per side, eager")
    for step in range(args.steps):
        for s in sides.values():
            t0 = time.perf_counter()
            s["losses"].append(s["trainer"].train_step()["loss"])
            if step >= args.warmup:
                s["seconds"] += time.perf_counter() - t0
        if (step + 1) % 10 == 0:
            print(f"  step {step + 1}: " + "; ".join(f"{n} loss {s['losses'][-1]:.4f}" for n, s in sides.items()),
                  flush=True)

    timed = (args.steps - args.warmup) * plan.total_batch_size
    print("\n| side | tokens/s | val loss (nats/token) | val bpb |\n| --- | ---: | ---: | ---: |")
    for name, s in sides.items():
        s["model"].eval()
        ctx = torch.autocast("cpu", dtype=s["amp"]) if s["amp"] else torch.no_grad()
        with torch.no_grad(), ctx:
            loss, bpb = evaluate(lambda x, y, m=s["model"]: m(x, y, loss_reduction="none"), val, windows, T, B,
                                 token_bytes)
        s["tps"] = timed / s["seconds"]
        print(f"| {name} | {s['tps']:,.0f} | {loss:.4f} | {bpb:.4f} |")
    f32, b16 = sides["float32"], sides["bf16 autocast"]
    drift = max(abs(x - y) for x, y in zip(f32["losses"], b16["losses"]))
    print(f"\nbf16 / float32 tokens/s: {b16['tps'] / f32['tps']:.2f}x; largest training-loss gap over the "
          f"{args.steps} steps: {drift:.4f} nats")


if __name__ == "__main__":
    main()
