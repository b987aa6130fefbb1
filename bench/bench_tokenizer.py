#!/usr/bin/env python
"""Tokenizer benchmark: chatforge (rustbpe training, tiktoken encoding) vs Hugging Face `tokenizers`.

Both run side by side in one process, on the same documents, with the same vocab size, the same
GPT-4 split regex and the same number of threads (RAYON_NUM_THREADS for both trainers and for HF
encoding, tiktoken's num_threads for chatforge encoding). Run by hand, never in the test suite:

    CHATFORGE_DATA_DIR=/path/to/data python bench/bench_tokenizer.py
    python bench/bench_tokenizer.py --vocab_sizes 32768 --trials 5 --repeat 4

What is measured (best of --trials wall time; trainers and encoders alternate within each trial):

1. Training time. chatforge: `Tokenizer.train(docs, V, pattern="gpt4")` (13 special tokens reserved
   inside V). HF: `Tokenizer(models.BPE())` with pre-tokenizer Split(gpt4 regex, isolated) +
   ByteLevel(use_regex=False), `BpeTrainer(vocab_size=V, initial_alphabet=ByteLevel.alphabet(),
   special_tokens=<the same 13>)`, `train_from_iterator(docs)`. Both learn V - 13 - 256 merges.
2. Encode throughput (MB/s of UTF-8 input) of the *same* vocab: the chatforge tokenizer trained in
   step 1, and its HF export (`export_hf` -> `tokenizers.Tokenizer.from_file`). Ids are checked to
   be identical on every document before anything is timed. Both sides return Python lists of
   ids (HF's time includes `.ids`, which a caller needs). Optional reference: tiktoken's own
   `gpt2` encoding (a different vocab and regex, so an absolute number only, no ratio).

Timing on a shared machine: every run also records how many cores *other* processes kept busy
meanwhile (/proc/stat minus this process's CPU time). Runs where that exceeds CONTENDED_CORES are not
"clean"; up to --extra_rounds more rounds are run to get --trials clean ones, the best clean run is
reported, and a row whose reported run is still contended is marked with a dagger in the table.

Peak RSS per phase comes from resource.getrusage after resetting the high-water mark through
/proc/self/clear_refs (Linux); where that is refused the numbers are cumulative high-water marks.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PATHS = [
    "text/wiki_demo.txt",
    "text/c4_demo.jsonl",
    "text/tinyshakespeare.txt.gz",
    "math/gsm8k/train.jsonl",
    "chat/oasst/en_100_tree.jsonl",
]
TRAIN_TARGET = 1.5  # chatforge training at least 1.5x faster than tokenizers
ENCODE_TARGET = 2.0  # chatforge encoding at least 2x faster than tokenizers
CONTENDED_CORES = 0.25  # other processes busier than this during a run make its timing unreliable


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark chatforge's tokenizer (rustbpe + tiktoken) against Hugging Face tokenizers, "
                    "same text / vocab / regex / threads, in one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default="",
                   help="dataset folder (default: $CHATFORGE_DATA_DIR, else chatforge's default)")
    p.add_argument("--paths", nargs="+", default=DEFAULT_PATHS,
                   help="corpus files or globs, relative to the data dir (.txt[.gz], .jsonl[.gz], .parquet)")
    p.add_argument("--vocab_sizes", nargs="+", type=int, default=[32768, 4096],
                   help="vocab sizes to benchmark (13 special tokens included)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for every multi-threaded run (RAYON_NUM_THREADS and tiktoken num_threads)")
    p.add_argument("--trials", type=int, default=3, help="timed runs per measurement; the best is reported")
    p.add_argument("--extra_rounds", type=int, default=3,
                   help="extra rounds allowed per measurement while other processes' load spoils runs "
                        f"(more than {CONTENDED_CORES} busy cores elsewhere on the machine)")
    p.add_argument("--repeat", type=int, default=1, help="use the corpus this many times over (more text)")
    p.add_argument("--max_chars", type=int, default=0, help="stop reading the corpus after this many chars (0 = all)")
    p.add_argument("--doc_chars", type=int, default=10_000, help="truncate each document to this many chars")
    p.add_argument("--skip_train", action="store_true", help="only benchmark encoding (trains once, untimed)")
    p.add_argument("--skip_encode", action="store_true", help="only benchmark training")
    p.add_argument("--no_tiktoken_gpt2", action="store_true",
                   help="skip the raw tiktoken gpt2 reference row")
    args = p.parse_args(argv)
    if args.threads < 1 or args.trials < 1 or args.repeat < 1 or args.extra_rounds < 0:
        p.error("--threads, --trials and --repeat must be at least 1, --extra_rounds at least 0")
    return args


# ----------------------------------------------------------------------------------------------
# Measurement helpers


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / (1024 if sys.platform != "darwin" else 1024 * 1024)


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mib()


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used (from /proc/stat), or NaN."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class Measure:
    """Timed runs of one contender. `best` is the fastest clean run (other processes kept fewer than
    CONTENDED_CORES cores busy meanwhile), or the fastest run of all when none was clean; cpu_util
    and others belong to that run. Peak RSS is the max over all runs: absolute, and the rise above
    the RSS the process had when the run started (the contender's own working memory; approximate,
    since Python keeps some freed memory for reuse)."""

    def __init__(self, name: str):
        self.name = name
        self.runs: list[tuple[float, float, float]] = []  # (wall s, cpu/wall, others' cores)
        self.peak_mib = 0.0
        self.extra_mib = 0.0
        self.result = None

    def run(self, fn, can_reset: bool, keep: bool):
        self.result = None
        gc.collect()
        if can_reset:
            reset_peak_rss()
        start = current_rss_mib()
        b0, c0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
        result = fn()
        t1, c1, b1 = time.perf_counter(), time.process_time(), machine_busy_s()
        peak = peak_rss_mib()
        self.peak_mib = max(self.peak_mib, peak)
        self.extra_mib = max(self.extra_mib, peak - start)
        wall = max(t1 - t0, 1e-9)
        others = max(0.0, ((b1 - b0) - (c1 - c0)) / wall)  # NaN where /proc/stat is missing
        self.runs.append((wall, (c1 - c0) / wall, others))
        self.result = result if keep else None

    def clean_runs(self) -> list[tuple[float, float, float]]:
        return [r for r in self.runs if not r[2] > CONTENDED_CORES]  # NaN counts as clean

    def _best_run(self) -> tuple[float, float, float]:
        return min(self.clean_runs() or self.runs)

    @property
    def best(self) -> float:
        return self._best_run()[0]

    @property
    def cpu_util(self) -> float:
        return self._best_run()[1]

    @property
    def others(self) -> float:
        return self._best_run()[2]


def run_trials(contenders: list[tuple[Measure, object]], trials: int, can_reset: bool, keep: bool = False,
               extra_rounds: int = 0) -> None:
    """Rounds of one run per contender, alternating the order every round so background load and
    cache warmth hit each side alike. After `trials` rounds, up to `extra_rounds` more are run while
    some contender has fewer than `trials` clean runs (a shared machine got busy). With keep, each
    Measure holds its last result."""
    for t in range(trials + extra_rounds):
        if t >= trials and all(len(m.clean_runs()) >= trials for m, _ in contenders):
            break
        order = contenders if t % 2 == 0 else contenders[::-1]
        for m, fn in order:
            m.run(fn, can_reset, keep)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ----------------------------------------------------------------------------------------------
# Contenders


def hf_trainer_run(docs, vocab_size, pattern, special_tokens):
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(special_tokens), show_progress=False)
    hf.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return hf


def hf_token_bytes(hf) -> set[bytes]:
    """The non-special tokens of a trained HF byte-level BPE, as raw bytes."""
    from chatforge.tokenizer import unicode_to_bytes

    table = unicode_to_bytes()
    out = set()
    for tok in hf.get_vocab(with_added_tokens=False):
        try:
            out.add(bytes(table[c] for c in tok))
        except KeyError:
            pass
    return out


def load_tiktoken_gpt2(data_dir_setting: str):
    """tiktoken's own gpt2 encoding, offline, from the shared GPT-2 vocab.json + merges.txt (see the
    data README). None (with a reason) when the files are missing or do not match tiktoken's hashes."""
    from chatforge.common import data_path

    try:
        vocab = data_path("tokenizers/gpt2/vocab.json", data_dir_setting).read_bytes()
        merges = data_path("tokenizers/gpt2/merges.txt", data_dir_setting).read_bytes()
    except Exception as e:  # ChatforgeError or OSError
        return None, f"GPT-2 files not found ({e})"
    bpe = b"#version: 0.2\n" + merges
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    # sha256 prefixes tiktoken pins for these two files (checked here so tiktoken never tries the network)
    want = {"vocab.bpe": (bpe, "1ce16647"), "encoder.json": (vocab, "19613966")}
    cache = Path(tempfile.mkdtemp(prefix="bench_tiktoken_"))
    for name, (blob, prefix) in want.items():
        if not hashlib.sha256(blob).hexdigest().startswith(prefix):
            return None, f"{name} does not match tiktoken's pinned sha256 (would need a download)"
        (cache / hashlib.sha1((base + name).encode()).hexdigest()).write_bytes(blob)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        import tiktoken

        return tiktoken.get_encoding("gpt2"), ""
    except Exception as e:
        return None, f"tiktoken gpt2 failed to load offline ({type(e).__name__}: {e})"
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # tiktoken has read the files by now
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


# ----------------------------------------------------------------------------------------------
# Report


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}x"


def main(argv=None) -> int:
    args = parse_args(argv)
    # Both rustbpe and tokenizers size their rayon pools from this on first use: set before import.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    if args.data_dir:
        os.environ["CHATFORGE_DATA_DIR"] = args.data_dir
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    import tiktoken
    import tokenizers

    from chatforge.common import data_dir, physical_cores
    from chatforge.corpus import CorpusStats, iter_documents
    from chatforge.tokenizer import PATTERNS, SPECIAL_TOKENS, Tokenizer

    cores = physical_cores()
    if args.threads > cores:
        print(f"warning: --threads {args.threads} > {cores} usable cores; timings will be oversubscribed",
              file=sys.stderr)
    can_reset = reset_peak_rss()
    pattern = PATTERNS["gpt4"]

    # -- corpus, read once, untimed ------------------------------------------------------------
    stats = CorpusStats()
    t0 = time.perf_counter()
    base_docs = list(iter_documents(args.paths, args.data_dir, doc_chars=args.doc_chars,
                                    max_chars=args.max_chars, stats=stats))
    docs = base_docs * args.repeat
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_chars = sum(len(d) for d in docs)
    mb = n_bytes / 1e6

    try:
        import importlib.metadata as md
        rustbpe_v = md.version("rustbpe")
    except Exception:
        rustbpe_v = "?"
    print("# chatforge tokenizer benchmark")
    print(f"python {platform.python_version()}, tokenizers {tokenizers.__version__}, tiktoken "
          f"{tiktoken.__version__ if hasattr(tiktoken, '__version__') else '?'}, rustbpe {rustbpe_v}")
    print(f"usable cores {cores}, threads {args.threads} (RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}), "
          f"best of {args.trials} clean trials (up to {args.extra_rounds} extra rounds), "
          f"load average at start {loadavg()}")
    print(f"corpus: {data_dir(args.data_dir)} :: {' '.join(args.paths)}")
    print(f"  {stats.files} files, {len(base_docs)} documents x repeat {args.repeat} = {len(docs)} docs, "
          f"{n_chars:,} chars, {n_bytes:,} UTF-8 bytes ({time.perf_counter() - t0:.2f}s to read); "
          f"baseline RSS peak {peak_rss_mib():.0f} MiB")
    if not can_reset:
        print("  note: cannot reset the RSS high-water mark here; peak RSS columns are cumulative")
    sys.stdout.flush()

    rows: list[dict] = []  # for the final table
    trained: dict[int, Tokenizer] = {}

    # -- 1. training ---------------------------------------------------------------------------
    for V in args.vocab_sizes:
        if args.skip_train:
            trained[V] = Tokenizer.train(docs, V, pattern="gpt4")
            continue
        cf = Measure("chatforge Tokenizer.train (rustbpe)")
        hf = Measure("tokenizers BpeTrainer")
        run_trials([(cf, lambda: Tokenizer.train(docs, V, pattern="gpt4")),
                    (hf, lambda: hf_trainer_run(docs, V, pattern, SPECIAL_TOKENS))], args.trials, can_reset,
                   keep=True, extra_rounds=args.extra_rounds)
        tok, hft = cf.result, hf.result
        trained[V] = tok
        cf_tokens = set(tok.mergeable_ranks)
        hf_tokens = hf_token_bytes(hft)
        overlap = len(cf_tokens & hf_tokens) / max(1, len(cf_tokens))
        ratio = hf.best / cf.best
        print(f"\n[train V={V}] chatforge {cf.best:.3f}s (cpu/wall {cf.cpu_util:.2f}, others {cf.others:.2f}, peak RSS {cf.peak_mib:.0f} MiB, +{cf.extra_mib:.0f}) | "
              f"tokenizers {hf.best:.3f}s (cpu/wall {hf.cpu_util:.2f}, others {hf.others:.2f}, peak RSS {hf.peak_mib:.0f} MiB, +{hf.extra_mib:.0f}) | "
              f"speedup {fmt_ratio(ratio)}")
        print(f"  vocab check: chatforge {tok.vocab_size} ids ({len(cf_tokens)} byte tokens + "
              f"{len(tok.special_tokens)} specials); tokenizers {hft.get_vocab_size()} ids "
              f"({len(hf_tokens)} byte tokens); learned-token overlap {overlap:.1%}")
        rows.append(dict(what=f"train, V={V}, {args.threads} thr (s)", cfv=f"{cf.best:.3f}", hfv=f"{hf.best:.3f}",
                         ratio=ratio, target=TRAIN_TARGET, cf=cf, hf=hf))
        del hft
        sys.stdout.flush()

    # -- 2. encoding ---------------------------------------------------------------------------
    if not args.skip_encode:
        from tokenizers import Tokenizer as HFTokenizer

        T = args.threads
        for V in args.vocab_sizes:
            tok = trained[V]
            with tempfile.TemporaryDirectory(prefix="bench_tok_hf_") as d:
                tok.export_hf(d)
                hf = HFTokenizer.from_file(str(Path(d) / "tokenizer.json"))

            def set_hf_parallel(on: bool):
                os.environ["TOKENIZERS_PARALLELISM"] = "true" if on else "false"

            # Identity check first: same vocab must give the same ids, or the comparison is void.
            cf_ids = tok.encode_batch(docs, num_threads=T)
            set_hf_parallel(True)
            hf_ids = [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)]
            same = sum(a == b for a, b in zip(cf_ids, hf_ids))
            n_tokens = sum(map(len, cf_ids))
            print(f"\n[encode V={V}] id agreement chatforge vs tokenizers: {same}/{len(docs)} documents identical, "
                  f"{n_tokens:,} tokens ({n_bytes / n_tokens:.2f} bytes/token)")
            if same != len(docs):
                i = next(i for i, (a, b) in enumerate(zip(cf_ids, hf_ids)) if a != b)
                print(f"  first mismatch: doc {i}: {docs[i][:120]!r}\n  chatforge {cf_ids[i][:20]}\n"
                      f"  tokenizers {hf_ids[i][:20]}", file=sys.stderr)
            assert same == len(docs), "chatforge and its HF export disagree on ids; encode timings would be unfair"
            assert [tok.encode(x) for x in docs[:200]] == cf_ids[:200], "encode and encode_batch disagree"
            del cf_ids, hf_ids

            def hf_loop():
                return [hf.encode(x, add_special_tokens=False).ids for x in docs]

            def hf_batch(parallel: bool, fast: bool):
                def f():
                    set_hf_parallel(parallel)
                    enc = hf.encode_batch_fast if fast else hf.encode_batch
                    out = [e.ids for e in enc(docs, add_special_tokens=False)]
                    set_hf_parallel(True)
                    return out
                return f

            has_fast = hasattr(hf, "encode_batch_fast")
            groups = [
                ("1 thr, per-doc loop", "`encode` loop", lambda: [tok.encode(x) for x in docs],
                 [("`encode(..).ids` loop", hf_loop)]),
                ("1 thr, batch", "`encode_batch(num_threads=1)`", lambda: tok.encode_batch(docs, num_threads=1),
                 [("`encode_batch`, TOKENIZERS_PARALLELISM=false", hf_batch(False, False))]
                 + ([("`encode_batch_fast`, TOKENIZERS_PARALLELISM=false", hf_batch(False, True))] if has_fast else [])),
                (f"{T} thr, batch", f"`encode_batch(num_threads={T})`", lambda: tok.encode_batch(docs, num_threads=T),
                 [(f"`encode_batch`, rayon {T}", hf_batch(True, False))]
                 + ([(f"`encode_batch_fast`, rayon {T}", hf_batch(True, True))] if has_fast else [])),
            ]
            for label, cf_api, cf_fn, hf_variants in groups:
                cfm = Measure(cf_api)
                hfms = [(Measure(name), fn) for name, fn in hf_variants]
                run_trials([(cfm, cf_fn)] + hfms, args.trials, can_reset, extra_rounds=args.extra_rounds)
                cf_mbs = mb / cfm.best
                for hm, _ in hfms:
                    hf_mbs = mb / hm.best
                    ratio = cf_mbs / hf_mbs
                    print(f"  {label}: chatforge {cf_api} {cf_mbs:.2f} MB/s (cpu/wall {cfm.cpu_util:.2f}, others {cfm.others:.2f}) | "
                          f"tokenizers {hm.name} {hf_mbs:.2f} MB/s (cpu/wall {hm.cpu_util:.2f}, others {hm.others:.2f}) | "
                          f"speedup {fmt_ratio(ratio)}")
                    rows.append(dict(what=f"encode, V={V}, {label} (MB/s); HF {hm.name}", cfv=f"{cf_mbs:.2f}",
                                     hfv=f"{hf_mbs:.2f}", ratio=ratio, target=ENCODE_TARGET, cf=cfm, hf=hm))
                sys.stdout.flush()
            del hf

        # Reference: tiktoken's own GPT-2 encoding (50257 tokens, GPT-2 regex): absolute MB/s only.
        if not args.no_tiktoken_gpt2:
            enc, why = load_tiktoken_gpt2(args.data_dir)
            if enc is None:
                print(f"\n[tiktoken gpt2] skipped: {why}")
            else:
                m1, mT = Measure("loop"), Measure("batch")
                run_trials([(m1, lambda: [enc.encode_ordinary(x) for x in docs]),
                            (mT, lambda: enc.encode_ordinary_batch(docs, num_threads=T))], args.trials, can_reset,
                           extra_rounds=args.extra_rounds)
                print(f"\n[tiktoken gpt2 reference, different vocab] 1 thr loop {mb / m1.best:.2f} MB/s, "
                      f"{T} thr batch {mb / mT.best:.2f} MB/s")
                rows.append(dict(what="reference: raw tiktoken `gpt2` (50257, GPT-2 regex), 1 thr loop (MB/s)",
                                 cfv=f"{mb / m1.best:.2f}", hfv="", ratio=None, target=None, cf=m1, hf=None))
                rows.append(dict(what=f"reference: raw tiktoken `gpt2`, {T} thr `encode_ordinary_batch` (MB/s)",
                                 cfv=f"{mb / mT.best:.2f}", hfv="", ratio=None, target=None, cf=mT, hf=None))

    # -- table ---------------------------------------------------------------------------------
    def both(r, f):
        return f(r["cf"]) + ("" if r["hf"] is None else f" / {f(r['hf'])}")

    def contended(r):
        return any(m is not None and m.others > CONTENDED_CORES for m in (r["cf"], r["hf"]))

    print(f"\nload average at end {loadavg()}.")
    print("cpu/wall: CPU seconds of this process per wall second in the best run (cores it kept busy). "
          "others: cores that other processes on the machine kept busy during that run (from /proc/stat); "
          f"a row where either side saw more than {CONTENDED_CORES} is marked † (contended, ratio unreliable). "
          "Peak RSS: whole process during the runs"
          f"{'' if can_reset else ' (cumulative, not reset)'}, in brackets the rise above the RSS at the run's start.\n")
    print("| measurement | chatforge | tokenizers | speedup | target | met | cpu/wall cf / hf | others (clean/runs) cf / hf "
          "| peak RSS MiB (+rise) cf / hf |")
    print("| --- | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = "" if r["ratio"] is None else fmt_ratio(r["ratio"])
        target = "" if r["target"] is None else f"≥{r['target']:g}x"
        met = "" if r["target"] is None else ("yes" if r["ratio"] >= r["target"] else "**no**")
        if contended(r):
            met += " †"
        util = both(r, lambda m: f"{m.cpu_util:.2f}")
        others = both(r, lambda m: f"{m.others:.2f} ({len(m.clean_runs())}/{len(m.runs)})")
        mem = both(r, lambda m: f"{m.peak_mib:.0f} (+{m.extra_mib:.0f})")
        print(f"| {r['what']} | {r['cfv']} | {r['hfv']} | {ratio} | {target} | {met} | {util} | {others} | {mem} |")

    judged = [r for r in rows if r["target"] is not None]
    print()
    for name, target in (("training", TRAIN_TARGET), ("encoding", ENCODE_TARGET)):
        rs = [r for r in judged if r["target"] == target]
        if not rs:
            continue
        n_c = sum(map(contended, rs))
        print(f"{name} target ≥{target:g}x: met in {sum(r['ratio'] >= target for r in rs)}/{len(rs)} rows "
              f"(speedups {min(r['ratio'] for r in rs):.2f}x..{max(r['ratio'] for r in rs):.2f}x)"
              + (f"; {n_c} of them contended (†)" if n_c else ""))
    print(f"final getrusage ru_maxrss {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
