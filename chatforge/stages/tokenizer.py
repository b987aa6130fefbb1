"""`chatforge tokenizer`: train a byte-level BPE on the corpus and report its compression.

Reads: text files (or the data stage's parquet shards). Writes to runs/<run>/tokenizer/:
    tokenizer.tiktoken, chatforge_tokenizer.json   the tokenizer (tiktoken rank format + metadata)
    hf/tokenizer.json, hf/tokenizer_config.json    Hugging Face export with the chat template
    report.json, report.md                         bytes per token on held-out text, vs GPT-2
    config.json, meta.json, metrics.jsonl, DONE
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from tqdm import tqdm

from chatforge.common import ChatforgeError, StageRun, data_path, is_complete, log0, read_done, \
    setup_threads, stage_dir, stage_run, write_json
from chatforge.config import TokenizerConfig
from chatforge.corpus import CorpusStats, expand_corpus, read_documents
from chatforge.tokenizer import Tokenizer

# Held-out text per kind for the compression report (none of it is in the tiny training corpus).
REPORT_TEXTS = {
    "web": "text/c4_demo.jsonl",
    "math": "math/gsm8k/test.jsonl",
    "chat": "chat/mt_bench/question.jsonl",
    "code": "eval/humaneval/HumanEval.jsonl.gz",
}
GPT2_DIR = "tokenizers/gpt2"
ENCODE_SAMPLE_CHARS = 2_000_000  # training text kept to measure encoding speed


def corpus_paths(cfg: TokenizerConfig) -> list[str]:
    """The configured corpus, or the run's data-stage shards when none is configured."""
    if cfg.corpus:
        return cfg.corpus
    if is_complete(stage_dir(cfg, "data")):
        return ["stage:data"]  # the data stage's shards (chatforge.corpus.expand_corpus)
    raise ChatforgeError("no corpus: pass --corpus FILES (or a --preset that sets one), or run the "
                         f"data stage for run '{cfg.run}' first")


def compression_report(tokenizers: dict[str, Tokenizer], cfg: TokenizerConfig, train_paths: list[Path]) -> dict:
    """Bytes per token per kind of held-out text (higher = better compression). A kind whose file is
    in the training corpus is skipped: it would not be held out."""
    trained_on = {Path(p).resolve() for p in train_paths}
    rows = {}
    for kind, rel in REPORT_TEXTS.items():
        try:
            path = data_path(rel, cfg.data_dir)
        except ChatforgeError:
            log0(f"  report: skipping '{kind}' ({rel} not in the data dir)")
            continue
        if path.resolve() in trained_on:
            log0(f"  report: skipping '{kind}' ({rel} is in the training corpus, so not held out)")
            continue
        text = "\n\n".join(d.text for d in read_documents([path], cfg.doc_chars, cfg.report_chars))
        n_bytes = len(text.encode("utf-8"))
        row = {"file": rel, "bytes": n_bytes}
        for name, tok in tokenizers.items():
            n_tokens = len(tok.encode(text))
            row[name] = {"tokens": n_tokens, "bytes_per_token": round(n_bytes / max(1, n_tokens), 3)}
        rows[kind] = row
    return rows


def report_markdown(rows: dict, vocab_sizes: dict[str, int]) -> str:
    names = list(vocab_sizes)
    head = "| kind | bytes | " + " | ".join(f"{n} (vocab {vocab_sizes[n]}) bytes/token" for n in names)
    lines = [head + " |", "|---|---:|" + "---:|" * len(names)]
    for kind, row in rows.items():
        cells = " | ".join(f"{row[n]['bytes_per_token']:.2f}" for n in names)
        lines.append(f"| {kind} | {row['bytes']:,} | {cells} |")
    if len(names) == 2 and rows:
        a, b = names
        ratio = [row[a]["bytes_per_token"] / row[b]["bytes_per_token"] for row in rows.values()]
        lines.append(f"\n{a} compresses {sum(ratio) / len(ratio):.2f}x as well as {b} on average "
                     "(bytes per token ratio; >1 is better).")
    return "\n".join(lines) + "\n"


def run(cfg: TokenizerConfig) -> dict:
    out = stage_dir(cfg, "tokenizer")
    if is_complete(out) and not cfg.force:
        log0(f"tokenizer: {out} is complete, skipping (pass --force to retrain)")
        return read_done(out)
    threads = setup_threads(cfg.threads)
    # Expanded once, here: a missing corpus file fails before anything is written.
    files = expand_corpus(corpus_paths(cfg), cfg.data_dir, cfg)
    with stage_run(cfg, "tokenizer") as run:
        return _train(cfg, run, files, threads)


def _train(cfg: TokenizerConfig, run: StageRun, files: list[Path], threads: int) -> dict:
    stats = CorpusStats()
    docs = (d.text for d in read_documents(files, cfg.doc_chars, cfg.max_chars, stats))
    first = next(docs, None)
    if first is None:
        raise ChatforgeError(f"corpus {[str(f) for f in files]} holds no documents")
    log0(f"tokenizer: training vocab {cfg.vocab_size} on {len(files)} file(s), up to {cfg.max_chars:,} chars")
    sample: list[str] = []  # the first ~2 MB of training text, kept to time encoding afterwards

    def counted(bar):
        last = 0
        for d in itertools.chain([first], docs):
            if last < ENCODE_SAMPLE_CHARS:
                sample.append(d)
            yield d
            bar.update(stats.chars - last)
            last = stats.chars

    t0 = time.time()
    # disable=None: a progress bar on a terminal, nothing in CI logs
    with tqdm(total=cfg.max_chars, unit="char", unit_scale=True, desc="reading corpus", leave=False,
              disable=None) as bar:
        tok = Tokenizer.train(counted(bar), cfg.vocab_size, cfg.pattern)
    train_s = time.time() - t0
    log0(f"tokenizer: {stats.documents:,} documents, {stats.chars:,} chars read; trained in {train_s:.1f}s "
         f"({stats.chars / train_s / 1e6:.2f} M chars/s); {stats.bad_records} bad records skipped")
    run.log(event="train", seconds=round(train_s, 3), **vars(stats))

    tok.save(run.dir)
    tok.export_hf(run.dir / "hf")

    # Compression report, side by side with GPT-2 when its files are in the data dir.
    tokenizers = {"chatforge": tok}
    try:
        tokenizers["gpt2"] = Tokenizer.load(data_path(GPT2_DIR + "/vocab.json", cfg.data_dir).parent)
    except ChatforgeError:
        log0("  report: GPT-2 files not in the data dir; reporting chatforge alone")
    t1 = time.time()
    rows = compression_report(tokenizers, cfg, files)
    t2 = time.time()
    tok.encode_batch(sample, num_threads=threads)
    encode_mb_s = sum(len(d.encode()) for d in sample) / 1e6 / max(1e-9, time.time() - t2)
    report = {"vocab_size": tok.vocab_size, "pattern": cfg.pattern, "train_seconds": round(train_s, 2),
              "corpus": vars(stats), "encode_MB_per_s": round(encode_mb_s, 2), "held_out": rows}
    write_json(run.dir / "report.json", report)
    md = report_markdown(rows, {n: t.vocab_size for n, t in tokenizers.items()})
    (run.dir / "report.md").write_text(md)
    run.log(event="report", seconds=round(time.time() - t1, 3), encode_MB_per_s=report["encode_MB_per_s"])
    log0("\n" + md)
    log0(f"tokenizer: wrote {run.dir} (encode {encode_mb_s:.1f} MB/s on {threads} thread(s))")
    summary = {"vocab_size": tok.vocab_size, "documents": stats.documents, "chars": stats.chars,
               "train_seconds": round(train_s, 2),
               "bytes_per_token": {k: r["chatforge"]["bytes_per_token"] for k, r in rows.items()}}
    run.finish(summary)
    return summary
