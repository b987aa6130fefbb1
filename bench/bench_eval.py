#!/usr/bin/env python
"""Multiple-choice scoring benchmark: chatforge's batched scorer vs one choice at a time in `transformers`.

The in-context suite scores every choice of a question by its log-likelihood. The usual way
(lm-evaluation-harness, nanochat) runs each choice as its own full sequence; with few-shot prompts
the shared context is most of every sequence. chatforge.evaluate.score_continuations runs each
question's shared context once (KV-cache prefill), repeats the cache per choice and runs only the
continuations, batching several questions per forward. This script measures both on the same
weights: a random-weight chatforge model (default: the tiny preset's shape, depth 4, width 256, vocab
4096, context 256; or --checkpoint), exported with chatforge.export and loaded by `transformers` as
Qwen3ForCausalLM, float32, the same threads on both sides. The questions are real items of one suite
task (default ARC-Easy, its DCLM shot count), encoded once and fed to both sides as the same token
sequences; the per-choice log-likelihoods are asserted equal (1e-4) before any timing is printed.

    python bench/bench_eval.py                                   # ARC-Easy, 40 questions, 2 threads
    python bench/bench_eval.py --task hellaswag --questions 100 --threads 1
    python bench/bench_eval.py --checkpoint runs/tiny/pretrain/checkpoint

Rows printed (best of --trials):
    transformers, one choice at a time   the naive harness: one full forward per choice
    chatforge, one choice at a time      the same naive loop on our model (separates the framework
                                         from the algorithm)
    chatforge, batched shared context    score_continuations with --batch_rows rows per forward
Run by hand on a quiet machine; never part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def naive(forward, questions) -> list[list[float]]:
    """One full forward per choice; log-likelihood of the continuation tokens."""
    out = []
    with torch.no_grad():
        for q in questions:
            row = []
            for tokens, start in q:
                logits = forward(torch.tensor([tokens]))[0].float()  # (T, V)
                lp = torch.log_softmax(logits[start - 1:-1], -1)
                row.append(lp.gather(-1, torch.tensor(tokens[start:])[:, None]).sum().item())
            out.append(row)
    return out


def best(fn, trials: int):
    t_best, out = float("inf"), None
    for _ in range(trials):
        t0 = time.perf_counter()
        out = fn()
        t_best = min(t_best, time.perf_counter() - t0)
    return t_best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="arc_easy", help="a task of the in-context suite (chatforge.tasks.mc)")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--shots", type=int, default=-1, help="few-shot examples (-1: DCLM's count from core_meta)")
    ap.add_argument("--checkpoint", default="", help="a chatforge checkpoint (default: random weights)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_rows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--data_dir", default=os.environ.get("CHATFORGE_DATA_DIR", ""))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers

    from chatforge.checkpoint import load_checkpoint, save_checkpoint
    from chatforge.evaluate import encode_item, score_continuations
    from chatforge.export import export_hf
    from chatforge.model import GPT, ModelConfig
    from chatforge.tasks import mc
    from chatforge.corpus import iter_documents
    from chatforge.tokenizer import Tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_eval-"))
    if args.checkpoint:
        ck = Path(args.checkpoint)
    else:
        t0 = time.time()
        tok = Tokenizer.train(iter_documents(["text/c4_demo.jsonl", "text/wiki_demo.txt"], args.data_dir, 10_000,
                                             3_000_000), vocab_size=args.vocab)
        tok.save(tmp / "tok")
        model = GPT(ModelConfig.from_depth(args.depth, tok.vocab_size, args.seq_len))
        with torch.no_grad():  # every weight random (the real init zeroes the head: all choices would tie)
            for p in model.parameters():
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0.0, 0.05)
        ck = save_checkpoint(tmp / "ckpt", model, tokenizer_dir=tmp / "tok")
        print(f"random-weight model, tokenizer trained in {time.time() - t0:.1f}s")
    model, info = load_checkpoint(ck)
    model.eval()
    tok = Tokenizer.load(info["tokenizer_dir"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ck, tmp / "hf"), dtype=torch.float32).eval()

    task = mc.CORE_TASKS[args.task]
    items, _ = mc.load_core_items(task, args.data_dir)
    shots = mc.read_core_meta(args.data_dir).get(task.name, {}).get("shots", 0) if args.shots < 0 else args.shots
    ctx = model.config.max_seq_len
    questions, used = [], 0
    for i in range(min(args.questions, len(items))):
        fewshot = [items[k] for k in mc.sample_fewshot(len(items), i, shots, seed=0)]
        q, k, _ = encode_item(tok, task, items[i], fewshot, ctx)
        questions.append(q)
        used += k
    n_choices = sum(len(q) for q in questions)
    n_tokens = sum(len(t) for q in questions for t, _ in q)

    # warm up both sides once (allocators, first-call overheads)
    naive(lambda x: hf(x).logits, questions[:2])
    score_continuations(model, questions[:4], batch_rows=args.batch_rows)
    t_hf, ll_hf = best(lambda: naive(lambda x: hf(x).logits, questions), args.trials)
    t_naive, ll_naive = best(lambda: naive(model, questions), args.trials)
    t_ours, scores = best(lambda: score_continuations(model, questions, batch_rows=args.batch_rows), args.trials)
    ll_ours = [[s.logprob for s in q] for q in scores]
    worst = max(abs(a - b) for qa, qb in zip(ll_ours, ll_hf) for a, b in zip(qa, qb))
    worst_naive = max(abs(a - b) for qa, qb in zip(ll_naive, ll_hf) for a, b in zip(qa, qb))
    assert worst < 1e-4 and worst_naive < 1e-4, (worst, worst_naive)
    pick = lambda ll: [max(range(len(r)), key=r.__getitem__) for r in ll]  # noqa: E731
    assert pick(ll_ours) == pick(ll_hf)

    c = model.config
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, float32")
    print(f"model: depth {c.n_layer}, width {c.n_embd}, vocab {c.vocab_size}, context {ctx}; task {task.title}, "
          f"{len(questions)} questions, {n_choices} choices, {used / len(questions):.1f} of {shots} shots fit, "
          f"{n_tokens:,} tokens as full sequences")
    print(f"log-likelihoods: max |ours - transformers| = {worst:.2e} (asserted < 1e-4), same predictions")
    print(f"| scorer | seconds | questions/s | vs transformers |\n|---|---:|---:|---:|")
    for name, t in (("transformers, one choice at a time", t_hf), ("chatforge, one choice at a time", t_naive),
                    (f"chatforge, batched shared context (batch_rows {args.batch_rows})", t_ours)):
        print(f"| {name} | {t:.3f} | {len(questions) / t:.1f} | {t_hf / t:.2f}x |")


if __name__ == "__main__":
    main()
