#!/usr/bin/env python
"""Inference benchmark: chatforge's Engine vs Hugging Face `generate` on the same weights.

One process, one machine, same threads. A random-weight chatforge model is saved as a checkpoint,
exported with `chatforge export` (chatforge/export.py) and loaded by `transformers` as
Qwen3ForCausalLM, so both sides run the very same float32 weights. Greedy decoding, the same
prompts; every path's generated tokens must be identical on both sides (the script stops with an
error otherwise) before timings are reported. Run by hand, never in the test suite:

    python bench/bench_engine.py                      # default: depth 6 (width 384, vocab 8192, 16.9M params)
    python bench/bench_engine.py --depth 4 --vocab 4096 --trials 5   # the `tiny` preset's size (5.3M params)
    python bench/bench_engine.py --baseline bf4df4e --threads 1      # this engine vs an older commit's
    python bench/bench_engine.py --depth 4 --vocab 4096 --batches 64 --prompt 48 --new 64   # RL rollouts

The last line is the RL stage's batch shape (`chatforge rl --preset tiny`: 8 prompts x 8 replies,
prompts of ~40-50 tokens, replies of at most 64 tokens that end at different lengths): its "replies of
different lengths" row is rollout decoding (greedy here, so both sides can be checked token for token;
sampling costs the same per step on both sides).

Both sizes are worth quoting: at depth 4 the fixed per-step cost (where the engine wins) is a larger
share of a step than at depth 6. Batch 1 and 8, prompt 128, 128 new tokens by default.

What is measured (best of --trials, each side alternating within a trial):

- decode tokens/s: B*(N-1) / (t(N new tokens) - t(1 new token)), i.e. the per-step cost once the
  prompt is in the cache, with each side's whole generate call (sampling, bookkeeping) included.
- prefill tokens/s: B*T / t(1 new token): the prompt forward pass plus one sampling step.
- replies of different lengths (batch > 1): each row stops at its own stop token, as in a chat batch.
- KV cache bytes per token (per sequence) and the cache chatforge allocates for the request.
- peak RSS of each side's phase (the high-water mark is reset through /proc/self/clear_refs).

--baseline REV: no transformers; chatforge's engine at REV (chatforge/engine.py and model.py of that
commit, loaded under other module names) against the working tree's, same weights, same process,
alternating; decode ms per step, median and min, identical tokens asserted. For checking that an
engine change did not cost speed.

The checkpoint and export (~40 MB at the default size) go to a temporary folder that is deleted at
the end, also on an error.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best(fn, trials: int) -> tuple[float, object]:
    t_best, out = float("inf"), None
    for _ in range(trials):
        t0 = time.perf_counter()
        out = fn()
        t_best = min(t_best, time.perf_counter() - t0)
    return t_best, out


def replies_of_different_lengths(B, greedy, ours, theirs, hf, args, t_ours_1, t_hf_1):
    """The batch-B workload a chat server sees: replies end at different lengths. Row b is given a stop
    token from its own greedy continuation, first produced near position (b+1)/B of --new and absent
    from the first half of the other rows' targets; every row stops at the first of these tokens it
    produces (the same list on both sides, HF's eos_token_id list), so the reply lengths spread over
    1..--new and are identical on both sides (checked). Decode tok/s = (replies' tokens - B) /
    (t(whole call) - t(1 new token)), the first token and the prefill being timed by the caller."""
    targets = [(b + 1) * args.new // B for b in range(B)]
    stops = set()
    for b, row in enumerate(greedy):
        first = {}
        for i, t in enumerate(row):
            first.setdefault(t, i)
        for t in sorted(first, key=lambda t: abs(first[t] + 1 - targets[b])):
            if all(t not in greedy[c][:targets[c] // 2] for c in range(B) if c != b):
                stops.add(t)
                break
    stops = sorted(stops)
    lengths = []
    for row in greedy:
        cut = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
        lengths.append(cut + 1)
    before, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, stops
    try:
        with torch.inference_mode():
            a = [c.tokens for c in ours(args.new, stops)()]
            b = theirs(args.new, stops)()[:, args.prompt:].tolist()
            same = all(x == y[:len(x)] for x, y in zip(a, b)) and [len(x) for x in a] == lengths
            if not same:
                raise SystemExit("replies of different lengths: chatforge and transformers disagree (a bug on one side)")
            t_ours = t_hf = float("inf")
            for _ in range(args.trials):
                t_ours = min(t_ours, best(ours(args.new, stops), 1)[0])
                t_hf = min(t_hf, best(theirs(args.new, stops), 1)[0])
    finally:
        hf.generation_config.eos_token_id = before
    print(f"batch {B}, replies of different lengths {lengths}: identical", flush=True)
    return B, lengths, sum(lengths) - B, t_ours - t_ours_1, t_hf - t_hf_1


def cpu_name() -> str:
    """The CPU model (the ratios depend on it: AVX-512 or not, Intel or AMD), from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_model(args):
    from chatforge.model import GPT, ModelConfig

    cfg = ModelConfig.from_depth(args.depth, vocab_size=args.vocab, max_seq_len=1024)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # random weights everywhere: the real init zeroes the head (constant argmax)
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.5 / p.shape[1] ** 0.5)
    return model.eval()


def header(args, model, title: str) -> None:
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {title}")
    print(f"machine: {platform.node()}, {cpu_name()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{args.threads} threads, python {platform.python_version()}")
    print(f"model: depth {cfg.n_layer}, width {cfg.n_embd}, heads {cfg.n_head}, vocab {cfg.vocab_size}, "
          f"{n_params / 1e6:.1f}M parameters, float32; prompt {args.prompt} tokens, {args.new} new tokens, greedy")
    print(f"command: python {' '.join(sys.argv)}\n")


def load_baseline(rev: str, tmp: Path):
    """chatforge/engine.py and model.py as of git revision `rev`, imported as modules of their own
    (`_baseline_model`, `_baseline_engine`: the old engine's `chatforge.model` import is pointed at
    the old model) so both engines run in this process on the same weights."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    mods = {}
    for name in ("model", "engine"):
        try:
            text = subprocess.run(["git", "-C", str(root), "show", f"{rev}:chatforge/{name}.py"], check=True,
                                  capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"--baseline {rev}: cannot read chatforge/{name}.py at that revision ({e}); "
                             f"give a commit of this repository") from None
        text = text.replace("from chatforge.model import", "from _baseline_model import")
        path = tmp / f"_baseline_{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"_baseline_{name}", path)
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"_baseline_{name}"] = mods[name]
        spec.loader.exec_module(mods[name])
    return mods["model"], mods["engine"]


def run_baseline(args, tmp: Path) -> None:
    """This engine vs the one at --baseline, decode ms per step (see the module docstring)."""
    from chatforge.engine import Engine

    old_model, old_engine = load_baseline(args.baseline, tmp)
    model = random_model(args)
    cfg = model.config
    old = old_model.GPT(old_model.ModelConfig(**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}))
    old.load_state_dict(model.state_dict())
    engines = {args.baseline: old_engine.Engine(old.eval()), "working tree": Engine(model)}
    header(args, model, f"chatforge Engine: working tree vs {args.baseline}")
    print("| batch | engine | decode ms/step, min | median | working tree / baseline (median) |")
    print("|---:|---|---:|---:|---:|")
    g = torch.Generator().manual_seed(1)
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(0, cfg.vocab_size - 1, (B, args.prompt), generator=g).tolist()
        tokens = {k: [c.tokens for c in e.generate(prompts, max_tokens=args.new, temperature=0)]
                  for k, e in engines.items()}  # also the warm-up
        if len({str(t) for t in tokens.values()}) != 1:
            raise SystemExit(f"batch {B}: the two engines give different greedy tokens; no timings")
        ms = {k: [] for k in engines}
        for _ in range(args.trials):
            for k, e in engines.items():
                t0 = time.perf_counter()
                e.generate(prompts, max_tokens=1, temperature=0)
                t1 = time.perf_counter()
                e.generate(prompts, max_tokens=args.new, temperature=0)
                t2 = time.perf_counter()
                ms[k].append(((t2 - t1) - (t1 - t0)) / (args.new - 1) * 1e3)
        med = {k: sorted(v)[len(v) // 2] for k, v in ms.items()}
        for k in engines:
            ratio = f"{med[k] / med[args.baseline]:.3f}" if k != args.baseline else ""
            print(f"| {B} | {k} | {min(ms[k]):.3f} | {med[k]:.3f} | {ratio} |", flush=True)
    print("\nidentical greedy tokens from both engines at every batch size")


def run_vs_transformers(args, tmp: Path) -> None:
    import transformers

    from chatforge.checkpoint import save_checkpoint
    from chatforge.engine import Engine
    from chatforge.export import export_hf

    model = random_model(args)
    cfg = model.config
    save_checkpoint(tmp / "ckpt", model)
    hf_dir = export_hf(tmp / "ckpt", tmp / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    engine = Engine(model)
    header(args, model, f"chatforge Engine vs transformers {transformers.__version__} generate")
    kv = engine.kv_bytes_per_token()
    rows, ragged = [], []
    g = torch.Generator().manual_seed(1)
    for B in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(0, cfg.vocab_size - 1, (B, args.prompt), generator=g)
        prompts = ids.tolist()
        mask = torch.ones_like(ids)

        def ours(n, stops=()):
            return lambda: engine.generate(prompts, max_tokens=n, temperature=0, stop_tokens=stops)

        def theirs(n, stops=()):
            return lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=n,
                                       min_new_tokens=None if stops else n, do_sample=False)

        with torch.inference_mode():
            # correctness first: identical greedy tokens (this also warms both sides up)
            a = [c.tokens for c in ours(args.new)()]
            b = theirs(args.new)()[:, args.prompt:].tolist()
            same = sum(x == y for x, y in zip(a, b))
            if same != B:
                raise SystemExit(f"batch {B}: chatforge and transformers disagree on {B - same} of {B} greedy "
                                 f"sequences (a bug on one side); no timings")
            # peak RSS of each side's phase, in its own untimed pass
            peak_rss_reset()
            ours(args.new)()
            rss_ours = peak_rss_mb()
            peak_rss_reset()
            theirs(args.new)()
            rss_hf = peak_rss_mb()
            # timings: the sides alternate within every trial, so load from other jobs hits both alike
            t_ours_1 = t_ours_n = t_hf_1 = t_hf_n = float("inf")
            for _ in range(args.trials):
                t_ours_1 = min(t_ours_1, best(ours(1), 1)[0])
                t_hf_1 = min(t_hf_1, best(theirs(1), 1)[0])
                t_ours_n = min(t_ours_n, best(ours(args.new), 1)[0])
                t_hf_n = min(t_hf_n, best(theirs(args.new), 1)[0])
        dec_ours = B * (args.new - 1) / (t_ours_n - t_ours_1)
        dec_hf = B * (args.new - 1) / (t_hf_n - t_hf_1)
        pre_ours, pre_hf = B * args.prompt / t_ours_1, B * args.prompt / t_hf_1
        cache_mb = kv * B * (args.prompt + args.new) / 2**20
        rows.append((B, dec_ours, dec_hf, pre_ours, pre_hf, rss_ours, rss_hf, cache_mb, same))
        print(f"batch {B}: identical greedy sequences {same}/{B}", flush=True)
        if B > 1:
            ragged.append(replies_of_different_lengths(B, a, ours, theirs, hf, args, t_ours_1, t_hf_1))

    print()
    print("| batch | decode tok/s chatforge | decode tok/s transformers | ratio | prefill tok/s chatforge | "
          "prefill tok/s transformers | ratio | KV cache for the request | peak RSS chatforge / transformers |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for B, d1, d2, p1, p2, r1, r2, c, _ in rows:
        print(f"| {B} | {d1:,.0f} | {d2:,.0f} | {d1 / d2:.2f}x | {p1:,.0f} | {p2:,.0f} | {p1 / p2:.2f}x | "
              f"{c:.1f} MB | {r1:,.0f} MB / {r2:,.0f} MB |")
    if ragged:
        print("\nReplies of different lengths (a chat batch: each row stops at its own stop token; transformers "
              "keeps finished rows in the batch until the longest reply ends, chatforge drops them), decode only:\n")
        print("| batch | reply lengths | decoded tokens | chatforge s | transformers s | decode tok/s chatforge | "
              "decode tok/s transformers | ratio |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for B, lengths, n_tok, t1, t2 in ragged:
            print(f"| {B} | {min(lengths)}-{max(lengths)} (mean {sum(lengths) / B:.0f}) | {n_tok:,} | {t1:.3f} | "
                  f"{t2:.3f} | {n_tok / t1:,.0f} | {n_tok / t2:,.0f} | {t2 / t1:.2f}x |")
    print(f"\nKV cache: {kv:,} bytes per token per sequence (K and V x {cfg.n_layer} layers x {cfg.n_kv_head} kv heads "
          f"x {cfg.head_dim} dims x 4 bytes); chatforge preallocates prompt + max_tokens positions, not the "
          f"{cfg.max_seq_len}-token context ({kv * cfg.max_seq_len / 2**20:.1f} MB per sequence).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="git revision: time this engine against that one's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        if args.baseline:
            run_baseline(args, tmp)
        else:
            run_vs_transformers(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
