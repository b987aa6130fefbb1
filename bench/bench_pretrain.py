"""Pretraining at equal wall-clock: chatforge vs a `transformers` Llama of the same size with AdamW.

Same tokenizer, same token shards, same packed batches (chatforge's loader, same seed), same batch
size and context, same number of threads, same wall-clock budget for each side, run one after the
other in this process. Then both are scored on the same validation windows.

    chatforge (ours)   chatforge.model.GPT (depth from the tiny preset), Muon + AdamW
                       (chatforge.optim), warmup-stable-decay schedule, torch.compile when the
                       preset sets it (compile time counts against the budget): the `pretrain`
                       stage's recipe
    transformers       LlamaForCausalLM with the same width, depth, heads, MLP size and vocabulary
                       (untied), HF's default init, torch.optim.AdamW (betas 0.9/0.95, wd 0.1),
                       linear warmup + cosine decay to 10%: the plain loop a user would write

Both schedules run on elapsed time (the budget is fixed, the step count is not), so each side
finishes its decay exactly when its budget ends. The contestants train interleaved, one optimizer
step each in turn, each timed on its own clock: background load on a shared machine then slows all
of them alike instead of whichever happened to run at the wrong moment. The AdamW peak learning rate is swept over
--hf_lrs and the best is reported, so the baseline is not handicapped by one bad guess.

    python bench/bench_pretrain.py --seconds 300          # needs runs/tiny/tokenizer (chatforge tokenizer --preset tiny)

Prints tokens/s of each, the ratio, and validation loss / bits per byte at the end of the budget.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.common import require_stage, stage_dir  # noqa: E402
from chatforge.config import PretrainConfig, resolve_config  # noqa: E402
from chatforge.dataloader import PackedLoader, TokenStream, build_token_shards, eval_windows, iter_eval_batches  # noqa: E402
from chatforge.model import GPT  # noqa: E402
from chatforge.optim import build_optimizer, lr_multiplier, muon_momentum  # noqa: E402
from chatforge.stages.pretrain import derive_settings, resolve_corpus  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402


class Contestant:
    """One model being trained: step_fn(progress, batches) -> loss, its own loader and clock."""

    def __init__(self, name, step_fn, loader, grad_accum, tokens_per_step):
        self.name, self.step_fn, self.loader = name, step_fn, loader
        self.grad_accum, self.tokens_per_step = grad_accum, tokens_per_step
        self.steps, self.seconds, self.loss = 0, 0.0, float("nan")


def train_interleaved(contestants, budget):
    """Round-robin: each contestant with budget left takes one optimizer step, timed on its own
    clock, until every clock reaches `budget`. Interleaving spreads any background load on the
    machine evenly over the contestants, so tokens/s compare fairly even on a shared box."""
    rounds = 0
    while any(c.seconds < budget for c in contestants):
        for c in contestants:
            if c.seconds >= budget:
                continue
            batches = [c.loader.next_batch() for _ in range(c.grad_accum)]
            t0 = time.perf_counter()
            c.loss = c.step_fn(c.seconds / budget, batches)
            c.seconds += time.perf_counter() - t0
            c.steps += 1
        rounds += 1
        if rounds % 20 == 0:
            print("  " + "; ".join(f"{c.name}: step {c.steps}, {c.seconds:.0f}s, loss {c.loss:.3f}"
                                   for c in contestants), flush=True)


@torch.no_grad()
def evaluate(forward_loss, val, windows, seq_len, batch_size, token_bytes):
    nats = ntok = nbytes = 0.0
    for x, y in iter_eval_batches(val, windows, seq_len, batch_size):
        loss = forward_loss(x, y)  # (B, T) nats
        b = token_bytes[y]
        mask = b > 0
        nats += float((loss * mask).sum())
        ntok += float(mask.sum())
        nbytes += float(b.sum())
    return nats / ntok, nats / math.log(2) / nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300, help="training budget per side (default 300)")
    ap.add_argument("--runs_dir", default="runs")
    ap.add_argument("--run", default="tiny", help="run whose tokenizer stage to use (default tiny)")
    ap.add_argument("--preset", default="tiny", help="pretrain preset giving model size and batch (default tiny)")
    ap.add_argument("--hf_lrs", default="0.0015,0.003,0.006", help="AdamW peak LRs to sweep for transformers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip_ours", action="store_true", help="only the transformers runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = resolve_config(PretrainConfig, preset=args.preset, overrides={"run": args.run, "runs_dir": args.runs_dir})
    tok = Tokenizer.load(require_stage(cfg, "tokenizer"))
    plan = derive_settings(cfg, tok.vocab_size, 1)
    mc = plan.model_config
    tokens_dir = stage_dir(cfg, "pretrain") / "tokens"
    index = build_token_shards(tokens_dir, tok, resolve_corpus(cfg), data_dir=cfg.data_dir, doc_chars=cfg.doc_chars,
                               max_chars=cfg.max_chars, val_fraction=cfg.val_fraction)
    train, val = TokenStream(tokens_dir, index, "train"), TokenStream(tokens_dir, index, "val")
    windows = eval_windows(val, plan.seq_len, cfg.eval_tokens)
    token_bytes = torch.tensor(tok.token_bytes())
    B, T, accum = plan.device_batch_size, plan.seq_len, plan.grad_accum

    def new_loader():
        return PackedLoader(train, B, T, grad_accum=accum, seed=cfg.seed)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, budget {args.seconds:.0f}s per run; "
          f"batch {plan.total_batch_size} tokens ({B}x{T}x{accum}), train {len(train):,} tokens, "
          f"val {len(windows) * T:,} tokens")
    contestants, evals = [], {}  # evals: name -> (params, forward_loss)

    # -- chatforge: the pretrain stage's model, optimizers and schedule --
    if not args.skip_ours:
        torch.manual_seed(cfg.seed)
        model = GPT(mc)
        opt = build_optimizer(model.param_groups(), mc.n_embd, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                              unembedding_lr=cfg.unembedding_lr, scalar_lr=cfg.scalar_lr,
                              weight_decay=cfg.weight_decay)

        # the preset's --compile (tiny: on) applies here too; compile time is inside our clock
        step_model = torch.compile(model) if cfg.compile else model

        def ours_step(progress, batches):
            virtual = int(progress * 1000)  # WSD on the clock: warmup/warmdown shares of the budget
            opt.set_lr(lr_multiplier(virtual, 1000, round(1000 * cfg.warmup_ratio), round(1000 * cfg.warmdown_ratio)))
            opt.set_muon_momentum(muon_momentum(int(progress * plan.num_iterations)))
            total = 0.0
            for x, y in batches:
                loss = step_model(x, y)
                (loss / accum).backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return total / accum

        name = "chatforge (Muon+AdamW, WSD)"
        print(f"{name}: {model.num_params():,} parameters")
        contestants.append(Contestant(name, ours_step, new_loader(), accum, plan.total_batch_size))
        evals[name] = (model.num_params(), model, lambda x, y, m=model: m(x, y, loss_reduction="none"))

    # -- transformers Llama, AdamW, plain loop --
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.n_embd, intermediate_size=mc.intermediate_size,
                         num_hidden_layers=mc.n_layer, num_attention_heads=mc.n_head,
                         num_key_value_heads=mc.n_kv_head, head_dim=mc.head_dim, max_position_embeddings=mc.max_seq_len,
                         rope_theta=mc.rope_theta, rms_norm_eps=mc.norm_eps, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    for lr in [float(v) for v in args.hf_lrs.split(",") if v]:
        torch.manual_seed(cfg.seed)
        hf = LlamaForCausalLM(hf_cfg)
        hopt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

        def hf_step(progress, batches, hf=hf, hopt=hopt, lr=lr):
            warm = 0.02
            mult = progress / warm if progress < warm else \
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (progress - warm) / (1 - warm)))
            for g in hopt.param_groups:
                g["lr"] = lr * mult
            total = 0.0
            for x, y in batches:
                logits = hf(input_ids=x).logits
                loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
                (loss / accum).backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            hopt.step()
            hopt.zero_grad(set_to_none=True)
            return total / accum

        def hf_loss(x, y, hf=hf):
            logits = hf(input_ids=x).logits.float()
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                                     reduction="none").view(y.shape)

        name = f"transformers Llama (AdamW lr {lr:g}, cosine)"
        n_params = sum(p.numel() for p in hf.parameters())
        print(f"{name}: {n_params:,} parameters")
        contestants.append(Contestant(name, hf_step, new_loader(), accum, plan.total_batch_size))
        evals[name] = (n_params, hf, hf_loss)

    for _, m, _ in evals.values():
        m.train()
    train_interleaved(contestants, args.seconds)
    results = {}
    for c in contestants:
        n_params, m, fwd = evals[c.name]
        m.eval()
        loss, bpb = evaluate(fwd, val, windows, T, B, token_bytes)
        results[c.name] = dict(params=n_params, steps=c.steps, tps=c.steps * c.tokens_per_step / c.seconds,
                               loss=loss, bpb=bpb)

    print()
    print("| run | params | steps | tokens/s | val loss (nats/token) | val bpb |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['params']:,} | {r['steps']} | {r['tps']:,.0f} | {r['loss']:.4f} | {r['bpb']:.4f} |")
    ours = next((r for k, r in results.items() if k.startswith("chatforge")), None)
    hfs = [r for k, r in results.items() if k.startswith("transformers")]
    if ours and hfs:
        best = min(hfs, key=lambda r: r["loss"])
        print(f"\ntokens/s ratio chatforge / transformers (best-LR run): {ours['tps'] / best['tps']:.2f}x; "
              f"val loss {ours['loss']:.4f} vs {best['loss']:.4f} (bpb {ours['bpb']:.4f} vs {best['bpb']:.4f})")


if __name__ == "__main__":
    main()
