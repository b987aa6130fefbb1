"""Pretraining data: tokenize a text corpus once into token shards, then serve packed batches.

1. `build_token_shards` reads documents (`chatforge.corpus.read_documents`, the reader the
   tokenizer stage and the search index use), encodes them on tiktoken's thread pool, puts <|bos|>
   before every document, and appends them to a train or a validation stream:

       <dir>/train_00000.npy ...   uint16 token ids (uint32 when the vocab exceeds 65536)
       <dir>/val_00000.npy ...
       <dir>/train_counts.npy      int64 occurrences of each token id in the train split
       <dir>/index.json            shard list, token/document/byte counts, a fingerprint   (written last)

   The validation split is deterministic: document i (in corpus order) is held out when
   i % k == k - 1, with k = round(1 / val_fraction), so a given corpus always holds out the same
   documents whatever the seed, and the held-out share is exact rather than random.
   The fingerprint covers the tokenizer and the corpus (file names, sizes, mtimes) and the split
   settings; a matching index.json means the shards are reused.

2. `PackedLoader` views the shards of a split as one token stream, cuts it into windows of
   T + 1 tokens at stride T (inputs = window[:-1], targets = window[1:]; the stream is packed, so
   a window may span several documents, each beginning with <|bos|>, the nanoGPT/GPT-3 recipe) and
   visits the windows in a seeded random order, a fresh permutation every epoch.

   Each optimizer step consumes a *global* batch of rows; rank r of W takes rows
   [r*B, (r+1)*B) of every micro-batch of W*B rows. The order of the global batch does not depend on
   W, so 1 process with accumulation and W processes without see the same rows. The loader's state
   is {"epoch", "position"}: saved in a checkpoint, it resumes exactly where the run stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from chatforge.common import ChatforgeError, atomic_write, atomic_write_text

INDEX = "index.json"
SHARD_TOKENS = 1 << 26  # 64 Mi tokens (128 MiB as uint16) per shard file
COUNTS = "train_counts.npy"  # how often each token id occurs in the train split (unigram baseline)
INDEX_VERSION = 3  # 2: train_counts.npy, one document per line without blank lines; 3: CRLF and spaced blank lines


def val_period(val_fraction: float) -> int:
    """Every k-th document is held out, k = round(1/val_fraction).

    >>> val_period(0.02), val_period(0.5)
    (50, 2)
    """
    if not 0 < val_fraction <= 0.5:
        raise ChatforgeError(f"--val_fraction {val_fraction}: must be in (0, 0.5]")
    return max(2, round(1 / val_fraction))


def corpus_fingerprint(files: Iterable[Path], tokenizer_id: str, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(f"v{INDEX_VERSION}|{tokenizer_id}|{json.dumps(settings, sort_keys=True)}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"|{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tok) -> str:
    """A short hash of the vocabulary, specials and split pattern: shards made with another
    tokenizer are never reused."""
    h = hashlib.sha256()
    h.update(tok.pattern.encode())
    h.update(json.dumps(sorted(tok.special_tokens.items())).encode())
    for b, r in sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(r.to_bytes(4, "little") + len(b).to_bytes(2, "little") + b)
    return h.hexdigest()[:16]


def _save_npy(path: Path, data: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, data))  # a crash never leaves a partial array


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str, dtype, shard_tokens: int, vocab_size: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.n_buf = 0
        self.shards: list[dict] = []
        self.tokens = self.documents = 0
        # occurrences of each token id (the train split's feed the unigram baseline; val's stay unused)
        self.counts = np.zeros(vocab_size, dtype=np.int64) if split == "train" else None

    def add(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.buf.append(arr)
        self.n_buf += arr.size
        self.tokens += arr.size
        self.documents += 1
        if self.n_buf >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        data = np.concatenate(self.buf)
        name = f"{self.split}_{len(self.shards):05d}.npy"
        _save_npy(self.out_dir / name, data)
        if self.counts is not None:
            self.counts += np.bincount(data, minlength=self.counts.size)
        self.shards.append({"file": name, "tokens": int(data.size)})
        self.buf, self.n_buf = [], 0


def read_index(out_dir: str | os.PathLike) -> dict | None:
    p = Path(out_dir) / INDEX
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_token_shards(out_dir: str | os.PathLike, tok, corpus: list[str | Path], *, data_dir: str = "",
                       doc_chars: int = 100_000, max_chars: int = 0, val_fraction: float = 0.02,
                       shard_tokens: int = SHARD_TOKENS, batch_docs: int = 1024, num_threads: int = 0,
                       run=None, log=print) -> dict:
    """Tokenize `corpus` into train/val shards under out_dir (reused when the fingerprint matches).
    Returns the index dict. Raises ChatforgeError on an empty corpus or an empty split. `corpus` is
    files or globs for chatforge.corpus.expand_corpus (a list it already returned passes through
    unchanged); `run` (a stage config) resolves `stage:NAME` entries. The train split's token counts
    are stored too (`train_token_counts`), for the unigram baseline."""
    from chatforge.corpus import CorpusStats, expand_corpus, read_documents

    out_dir = Path(out_dir)
    if not corpus:
        raise ChatforgeError("the pretraining corpus is empty: give --corpus files or globs")
    files = expand_corpus(corpus, data_dir, run)  # a missing file is a clear error before any work
    period = val_period(val_fraction)
    settings = {"corpus": [str(f) for f in files], "doc_chars": doc_chars, "max_chars": max_chars,
                "val_period": period}
    fp = corpus_fingerprint(files, tokenizer_fingerprint(tok), settings)
    index = read_index(out_dir)
    if index is not None and index.get("fingerprint") == fp:
        check_shards(out_dir, index)
        return index

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX).unlink(missing_ok=True)
    for old in out_dir.glob("*.npy"):
        old.unlink()
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    writers = {s: _ShardWriter(out_dir, s, dtype, shard_tokens, tok.vocab_size) for s in ("train", "val")}
    stats = CorpusStats()
    token_bytes = np.asarray(tok.token_bytes(), dtype=np.int64)
    n_bytes = {"train": 0, "val": 0}
    doc_index = 0
    batch: list[str] = []

    def encode(docs: list[str], first: int) -> None:
        for i, ids in enumerate(tok.encode_batch(docs, num_threads=num_threads)):
            split = "val" if (first + i) % period == period - 1 else "train"
            ids = [tok.bos_id, *ids]
            writers[split].add(ids)
            n_bytes[split] += int(token_bytes[np.asarray(ids)].sum())

    for doc in read_documents(files, doc_chars, max_chars, stats):
        batch.append(doc.text)
        if len(batch) >= batch_docs:
            encode(batch, doc_index)
            doc_index += len(batch)
            batch = []
    if batch:
        encode(batch, doc_index)
        doc_index += len(batch)
    for w in writers.values():
        w.flush()
    if writers["train"].tokens == 0:
        raise ChatforgeError(f"the pretraining corpus {[str(f) for f in corpus]} produced no documents; check the files "
                             f"(empty, or no 'text' field / column)")
    if writers["val"].tokens == 0:
        raise ChatforgeError(
            f"the validation split is empty: the corpus has {doc_index} documents and every "
            f"{period}th one is held out (--val_fraction {val_fraction}); raise --val_fraction or add documents")
    index = {
        "version": INDEX_VERSION, "fingerprint": fp, "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "val_period": period, "corpus": settings["corpus"],
        "chars": stats.chars, "truncated_documents": stats.truncated, "bad_records": stats.bad_records,
        **{s: {"shards": w.shards, "tokens": w.tokens, "documents": w.documents, "bytes": n_bytes[s]}
           for s, w in writers.items()},
    }
    _save_npy(out_dir / COUNTS, writers["train"].counts)
    atomic_write_text(out_dir / INDEX, json.dumps(index, indent=2) + "\n")
    log(f"tokenized {doc_index:,} documents ({stats.chars:,} chars): train {writers['train'].tokens:,} "
        f"tokens, val {writers['val'].tokens:,} tokens -> {out_dir}; {bad_records_note(index)}")
    return index


def bad_records_note(index: dict) -> str:
    """How many corpus records were skipped (no text, not JSON), for the log and the summary.

    >>> bad_records_note({"bad_records": 3}), bad_records_note({"bad_records": 0})
    ('3 malformed records skipped (no text field, not JSON or empty)', 'no malformed records')
    """
    n = int(index.get("bad_records", 0))
    return f"{n:,} malformed records skipped (no text field, not JSON or empty)" if n else "no malformed records"


def resolve_corpus(cfg) -> list[Path]:
    """The pretraining corpus files of a stage config: --corpus, else what the run's tokenizer stage
    read, else the run's data stage shards; globs and `stage:NAME` entries expanded (once: the list
    goes on to build_token_shards). A missing file is an error here, before anything is deleted or
    computed."""
    from chatforge.common import require_stage, stage_dir
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


def _load_npy(path: Path, out_dir: Path, mmap: bool) -> np.ndarray:
    """np.load, with a damaged file (truncated by a full disk or a copy, overwritten) as one clear
    error naming it instead of numpy's traceback."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ChatforgeError(f"token file {path} is damaged ({str(e).splitlines()[0][:120]}); delete {out_dir} "
                             f"to tokenize the corpus again") from None


def check_shards(out_dir: str | os.PathLike, index: dict) -> None:
    """Every shard the index lists (and the train token counts) must be on disk."""
    out_dir = Path(out_dir)
    for split in ("train", "val"):
        for s in index[split]["shards"]:
            p = out_dir / s["file"]
            if not p.exists():
                raise ChatforgeError(
                    f"token shard {p} is missing ({index[split]['tokens']:,} {split} tokens listed in "
                    f"{out_dir / INDEX}); delete {out_dir} to tokenize the corpus again")
    if not (out_dir / COUNTS).exists():
        raise ChatforgeError(f"{out_dir / COUNTS} is missing; delete {out_dir} to tokenize the corpus again")


def train_token_counts(out_dir: str | os.PathLike) -> np.ndarray:
    """How often each token id occurs in the train split (vocab_size int64s), counted once by
    build_token_shards as it wrote the shards."""
    counts = _load_npy(Path(out_dir) / COUNTS, Path(out_dir), mmap=False)
    if counts.ndim != 1:
        raise ChatforgeError(f"token file {Path(out_dir) / COUNTS} is damaged (shape {counts.shape}); delete "
                             f"{out_dir} to tokenize the corpus again")
    return counts


class TokenStream:
    """The shards of one split as a single read-only array (memory-mapped, so a 100 GB corpus costs
    no RAM). `window(start, n)` returns tokens [start, start+n) as int64, crossing shard edges."""

    def __init__(self, out_dir: str | os.PathLike, index: dict, split: str):
        out_dir = Path(out_dir)
        check_shards(out_dir, index)
        self.arrays = []
        for s in index[split]["shards"]:
            arr = _load_npy(out_dir / s["file"], out_dir, mmap=True)
            if arr.ndim != 1 or arr.size != s["tokens"]:
                raise ChatforgeError(f"token shard {out_dir / s['file']} has {arr.size} tokens, the index "
                                     f"says {s['tokens']}; delete {out_dir} to tokenize again")
            self.arrays.append(arr)
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])
        self.vocab_size = index["vocab_size"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        filled = 0
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < n:
            a = self.arrays[k]
            lo = start + filled - int(self.offsets[k])
            take = min(n - filled, a.size - lo)
            out[filled:filled + take] = a[lo:lo + take]
            filled += take
            k += 1
        return out

    @classmethod
    def from_array(cls, tokens, vocab_size: int) -> "TokenStream":
        """An in-memory stream (tests, small experiments)."""
        self = cls.__new__(cls)
        self.arrays = [np.asarray(tokens)]
        self.offsets = np.array([0, len(tokens)])
        self.vocab_size = vocab_size
        return self


class PackedLoader:
    """Shuffled packed windows of a TokenStream, sharded across ranks, resumable.

    >>> s = TokenStream.from_array(np.arange(100), vocab_size=100)
    >>> a = PackedLoader(s, batch_size=2, seq_len=4, seed=0)
    >>> x, y = a.next_batch()
    >>> tuple(x.shape), bool((y[:, :-1] == x[:, 1:]).all())
    ((2, 4), True)
    >>> b = PackedLoader(s, batch_size=2, seq_len=4, seed=0); b.load_state_dict(a.state_dict())
    >>> bool((a.next_batch()[0] == b.next_batch()[0]).all())
    True
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1, seed: int = 0, shuffle: bool = True,
                 device="cpu"):
        self.stream, self.B, self.T = stream, batch_size, seq_len
        self.rank, self.world, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.device = torch.device(device)
        self.n_windows = (len(stream) - 1) // seq_len
        self.rows_per_micro = batch_size * world_size
        # Epochs end on optimizer-step boundaries, so how a step's rows are split into ranks and
        # micro-batches never changes which rows it gets.
        self.rows_per_step = self.rows_per_micro * grad_accum
        if self.n_windows < self.rows_per_step:
            raise ChatforgeError(
                f"the training split has {len(stream):,} tokens: fewer than one optimizer step of "
                f"{self.rows_per_step} sequences x {seq_len + 1} tokens; add text or lower "
                f"--total_batch_size / --max_seq_len")
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, None

    def _permutation(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, T) int64 on the loader's device."""
        if self.position % self.rows_per_step == 0 and self.position + self.rows_per_step > self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0  # drop the ragged tail of the epoch
        order = self._permutation()
        start = self.position + self.rank * self.B
        rows = np.stack([self.stream.window(int(w) * self.T, self.T + 1) for w in order[start:start + self.B]])
        self.position += self.rows_per_micro
        t = torch.from_numpy(rows)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            t = t.to(self.device)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rows_per_step": self.rows_per_step, "seq_len": self.T}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.T) != self.T:
            raise ChatforgeError(f"the checkpoint's data position is for sequences of {state['seq_len']} "
                                 f"tokens, this run uses {self.T}; keep --max_seq_len to resume")
        if state.get("rows_per_step", self.rows_per_step) != self.rows_per_step:
            raise ChatforgeError(f"the checkpoint's data position is for batches of {state['rows_per_step']} "
                                 f"sequences, this run uses {self.rows_per_step}; keep --total_batch_size to resume")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))


def eval_windows(stream: TokenStream, seq_len: int, max_tokens: int, rank: int | None = 0,
                 world_size: int = 1) -> np.ndarray:
    """Window indices of the validation stream this rank scores: the first max_tokens // T windows
    (in order, so every evaluation uses the same text), an equal share per rank, so the count is cut
    to a multiple of world_size. rank=None: the windows of all ranks together (what the unigram
    baseline must score to match the model).

    >>> s = TokenStream.from_array(np.arange(100), vocab_size=100)
    >>> eval_windows(s, 10, 100, rank=1, world_size=4), eval_windows(s, 10, 100, rank=None, world_size=4)
    (array([1, 5]), array([0, 1, 2, 3, 4, 5, 6, 7]))
    """
    n = min((len(stream) - 1) // seq_len, max(1, max_tokens // seq_len))
    n -= n % world_size
    if n == 0:
        raise ChatforgeError(
            f"the validation split has {len(stream):,} tokens: not one window of {seq_len + 1} tokens per "
            f"rank ({world_size} ranks); raise --val_fraction or lower --max_seq_len")
    return np.arange(n) if rank is None else np.arange(rank, n, world_size)


def iter_eval_batches(stream: TokenStream, windows: np.ndarray, seq_len: int, batch_size: int,
                      device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    device = torch.device(device)
    for i in range(0, len(windows), batch_size):
        rows = np.stack([stream.window(int(w) * seq_len, seq_len + 1) for w in windows[i:i + batch_size]])
        t = torch.from_numpy(rows).to(device)
        yield t[:, :-1], t[:, 1:]
