"""Pretraining at equal wall-clock: chatforge vs a `transformers` Llama of the same size with AdamW.

Same tokenizer, same token shards, same packed batches (chatforge's loader, same seed; asserted),
same batch size and context, same number of threads, same training loop code (chatforge.train_loop's
`Trainer.train_step`: accumulation, clipping, timing), same wall-clock budget for each contestant,
run in this process. Then all are scored on the same validation windows.

    chatforge (ours)   chatforge.model.GPT (depth from the preset), Muon + AdamW (chatforge.optim),
                       warmup-stable-decay schedule: the `pretrain` stage's recipe
    transformers       LlamaForCausalLM with the same width, depth, heads, MLP size and vocabulary
                       (untied), HF's default init, torch.optim.AdamW (betas 0.9/0.95, wd 0.1),
                       linear warmup + cosine decay to 10%: the plain loop a user would write

Fairness:
- compile: each --compile mode (off, on) runs BOTH sides that way, and both are reported. Compile
  time counts against the budget (the first step of a compiled contestant includes it; shown).
- learning rate: each side's peak rate is swept (ours: one factor on all four of its rates; theirs:
  the AdamW rate). When the best rate of a side is at either end of its sweep, the sweep is extended
  past that end (x0.5 or x2, up to --extend times), so the reported optimum is bracketed: a rate
  below and a rate above it are both worse. The table says whether each side's optimum is bracketed.
- the schedules run on elapsed time (the budget is fixed, the step count is not), so each contestant
  finishes its decay exactly when its budget ends.
- contestants train interleaved, one optimizer step each in turn, each timed on its own clock:
  background load on a shared machine slows all of them alike.

    python bench/bench_pretrain.py --seconds 240          # needs runs/tiny/tokenizer (chatforge tokenizer --preset tiny)
    python bench/bench_pretrain.py --seconds 5 --compile off --ours_lr_scales 1 --hf_lrs 0.001 --extend 0   # smoke test

Prints, per compile mode, tokens/s, steps and validation loss / bits per byte of every contestant, the
best rate of each side and the tokens/s and loss of best vs best. Run it on a quiet machine.
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
from chatforge.dataloader import (PackedLoader, TokenStream, build_token_shards, eval_windows,  # noqa: E402
                                  iter_eval_batches, resolve_corpus)
from chatforge.distributed import Dist  # noqa: E402
from chatforge.model import GPT  # noqa: E402
from chatforge.optim import build_optimizer, lr_multiplier, muon_momentum  # noqa: E402
from chatforge.plan import derive_settings  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402
from chatforge.train_loop import LoopConfig, NonFiniteLoss, Trainer, prepare_model  # noqa: E402


class Contestant:
    """One model being trained with its own Trainer, loader and clock."""

    def __init__(self, side: str, rate: float, label: str):
        self.side, self.rate, self.label = side, rate, label
        self.trainer: Trainer | None = None
        self.forward_loss = None  # (x, y) -> (B, T) nats, for evaluation
        self.n_params = 0
        self.budget_progress = 0.0
        self.steps, self.seconds, self.first_step_s, self.loss = 0, 0.0, 0.0, float("nan")
        self.diverged = ""
        self.result: dict = {}


def train_interleaved(contestants: list[Contestant], budget: float) -> None:
    """Round-robin: each contestant with budget left takes one optimizer step, timed on its own
    clock, until every clock reaches `budget` (or it diverges)."""
    rounds = 0
    live = [c for c in contestants if not c.diverged]
    while any(c.seconds < budget and not c.diverged for c in live):
        for c in live:
            if c.seconds >= budget or c.diverged:
                continue
            t0 = time.perf_counter()
            try:
                rec = c.trainer.train_step()
                c.loss = rec["loss"]
            except NonFiniteLoss as e:
                c.diverged = str(e).split(";")[0]
            dt = time.perf_counter() - t0
            c.first_step_s = c.first_step_s or dt
            c.seconds += dt
            c.steps += 1
        rounds += 1
        if rounds % 20 == 0:
            print("  " + "; ".join(f"{c.label}: step {c.steps}, {c.seconds:.0f}s, loss {c.loss:.3f}"
                                   for c in live), flush=True)


@torch.no_grad()
def evaluate(forward_loss, val, windows, seq_len, batch_size, token_bytes):
    """(nats per token, bits per byte) on the validation windows; special tokens count in neither."""
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
    ap.add_argument("--seconds", type=float, default=240, help="training budget per contestant (default 240)")
    ap.add_argument("--runs_dir", default="runs")
    ap.add_argument("--run", default="tiny", help="run whose tokenizer stage to use (default tiny)")
    ap.add_argument("--preset", default="tiny", help="pretrain preset giving model size and batch (default tiny)")
    ap.add_argument("--compile", default="off,on", help="compile modes to run, each for both sides (default off,on)")
    ap.add_argument("--ours_lr_scales", default="0.5,1,2",
                    help="factors on all of chatforge's learning rates to sweep (default 0.5,1,2)")
    ap.add_argument("--hf_lrs", default="0.0005,0.001,0.002", help="AdamW peak LRs to sweep for transformers")
    ap.add_argument("--extend", type=int, default=2,
                    help="extra rates per side when its best rate is at an end of the sweep (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.compile.split(",") if m.strip()]
    if not modes or set(modes) - {"off", "on"}:
        ap.error("--compile takes off, on or off,on")

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

    a, b = new_loader().next_batch(), new_loader().next_batch()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "contestants must see the same batches"

    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.n_embd, intermediate_size=mc.intermediate_size,
                         num_hidden_layers=mc.n_layer, num_attention_heads=mc.n_head,
                         num_key_value_heads=mc.n_kv_head, head_dim=mc.head_dim, max_position_embeddings=mc.max_seq_len,
                         rope_theta=mc.rope_theta, rms_norm_eps=mc.norm_eps, tie_word_embeddings=False,
                         attn_implementation="sdpa")

    def build(side: str, rate: float, compile_on: bool) -> Contestant:
        """A fresh contestant: seeded model, optimizer, schedule on its own clock, Trainer."""
        label = (f"chatforge (Muon+AdamW, WSD) lr x{rate:g}" if side == "ours"
                 else f"transformers Llama (AdamW lr {rate:g}, cosine)")
        c = Contestant(side, rate, label)
        torch.manual_seed(cfg.seed)
        if side == "ours":
            model = GPT(mc)
            opt = build_optimizer(model.param_groups(), mc.n_embd, matrix_lr=cfg.matrix_lr * rate,
                                  embedding_lr=cfg.embedding_lr * rate, unembedding_lr=cfg.unembedding_lr * rate,
                                  scalar_lr=cfg.scalar_lr * rate, weight_decay=cfg.weight_decay)

            def schedule(step, c=c):  # WSD on the clock: warmup/warmdown shares of the budget
                virtual = int(min(c.seconds / args.seconds, 1.0) * 1000)
                return lr_multiplier(virtual, 1000, round(1000 * cfg.warmup_ratio), round(1000 * cfg.warmdown_ratio))

            def on_step(step, c=c, opt=opt):
                opt.set_muon_momentum(muon_momentum(int(min(c.seconds / args.seconds, 1.0) * plan.num_iterations)))

            def loss_fn(m, batch):
                return m(*batch)

            c.forward_loss = lambda x, y, m=model: m(x, y, loss_reduction="none")
            c.n_params = model.num_params()
        else:
            model = LlamaForCausalLM(hf_cfg)
            opt = torch.optim.AdamW(model.parameters(), lr=rate, betas=(0.9, 0.95), weight_decay=0.1)

            def schedule(step, c=c):  # 2% linear warmup, cosine to 10%, on the clock
                p, warm = min(c.seconds / args.seconds, 1.0), 0.02
                return p / warm if p < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (p - warm) / (1 - warm)))

            on_step = None

            def loss_fn(m, batch):
                x, y = batch
                logits = m(input_ids=x).logits.float()
                return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))

            def hf_loss(x, y, m=model):
                logits = m(input_ids=x).logits.float()
                return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                                         reduction="none").view(y.shape)

            c.forward_loss = hf_loss
            c.n_params = sum(p.numel() for p in model.parameters())
        model.train()
        prepared = prepare_model(model, Dist(), torch.device("cpu"), compile=compile_on, say=print)
        c.trainer = Trainer(prepared, opt, loss_fn, new_loader(),
                            LoopConfig(num_steps=10**9, grad_accum=accum, grad_clip=cfg.grad_clip if side == "ours" else 1.0,
                                       tokens_per_step=plan.total_batch_size),
                            device="cpu", lr_schedule=schedule, on_step=on_step, say=print)
        return c

    def score(cs: list[Contestant]) -> None:
        for c in cs:
            m = c.trainer.model.module
            m.eval()
            loss, bpb = (float("inf"), float("inf")) if c.diverged else \
                evaluate(c.forward_loss, val, windows, T, B, token_bytes)
            c.result = dict(steps=c.steps, tps=c.steps * plan.total_batch_size / c.seconds, loss=loss, bpb=bpb)

    sweeps = {"ours": [float(v) for v in args.ours_lr_scales.split(",") if v],
              "hf": [float(v) for v in args.hf_lrs.split(",") if v]}
    n_first = len(modes) * sum(map(len, sweeps.values()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, budget {args.seconds:.0f}s per contestant, "
          f"{n_first} contestants (+ up to {2 * args.extend * len(modes)} to bracket the optima): at least "
          f"{n_first * args.seconds / 60:.0f} min; batch {plan.total_batch_size} tokens ({B}x{T}x{accum}), "
          f"train {len(train):,} tokens, val {len(windows) * T:,} tokens")

    summary = []
    for mode in modes:
        compile_on = mode == "on"
        print(f"\n== compile {mode} (both sides) ==")
        done: dict[str, list[Contestant]] = {"ours": [], "hf": []}
        todo = [build(side, r, compile_on) for side, rates in sweeps.items() for r in rates]
        for extra_round in range(args.extend + 1):
            if not todo:
                break
            for c in todo:
                print(f"{c.label}: {c.n_params:,} parameters")
            train_interleaved(todo, args.seconds)
            score(todo)
            for c in todo:
                done[c.side].append(c)
            todo = []
            if extra_round == args.extend:
                break
            for side, cs in done.items():  # extend a sweep whose best rate sits at one of its ends
                cs.sort(key=lambda c: c.rate)
                best = min(range(len(cs)), key=lambda i: cs[i].result["loss"])
                if best == 0:
                    todo.append(build(side, cs[0].rate / 2, compile_on))
                if best == len(cs) - 1:
                    todo.append(build(side, cs[-1].rate * 2, compile_on))

        print(f"\n| run (compile {mode}) | params | steps | first step s | tokens/s | val loss (nats/token) | val bpb |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        bests = {}
        for side, cs in done.items():
            cs.sort(key=lambda c: c.rate)
            for c in cs:
                r = c.result
                note = f" (diverged: {c.diverged})" if c.diverged else ""
                print(f"| {c.label}{note} | {c.n_params:,} | {r['steps']} | {c.first_step_s:.1f} | {r['tps']:,.0f} | "
                      f"{r['loss']:.4f} | {r['bpb']:.4f} |")
            i = min(range(len(cs)), key=lambda k: cs[k].result["loss"])
            bracketed = 0 < i < len(cs) - 1
            bests[side] = cs[i]
            print(f"  {side}: best rate {cs[i].rate:g}; optimum bracketed: "
                  + (f"yes ({cs[i - 1].rate:g} and {cs[i + 1].rate:g} are worse)" if bracketed
                     else "NO (best at an end of the sweep; raise --extend or widen the sweep)"))
        o, h = bests["ours"].result, bests["hf"].result
        line = (f"compile {mode}: tokens/s ratio chatforge / transformers (best rates) {o['tps'] / h['tps']:.2f}x; "
                f"val loss {o['loss']:.4f} vs {h['loss']:.4f} (bpb {o['bpb']:.4f} vs {h['bpb']:.4f})")
        summary.append(line)
    print()
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
