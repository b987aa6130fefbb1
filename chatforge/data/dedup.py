"""Deduplication across a whole run: exact (normalized-text hash) and near-duplicate MinHash-LSH.

MinHash (Broder 1997) estimates the Jaccard similarity of two documents' sets of word 5-grams;
LSH (Indyk & Motwani 1998) splits each signature into `bands` bands of `rows` hashes and calls two
documents candidates when any band matches exactly. With FineWeb's 14 bands x 8 rows, a pair with
Jaccard similarity s collides with probability 1 - (1 - s^8)^14: 0.92 at s = 0.8, 0.13 at s = 0.6.
Candidates are joined into clusters (union-find) and one document per cluster is kept: the first in
input order, so reruns are deterministic.

The implementation is vectorised numpy, no per-hash Python loop:
- each distinct word is hashed once (blake2b, 64 bits), a 5-gram's hash is a polynomial of its
  words' hashes (mod 2^64);
- the `bands*rows` hash functions are multiply-shift hashes h(x) = (a*x + b) mod 2^64 >> 32
  (Dietzfelbinger et al. 1997), evaluated as one (shingles x hashes) uint64 matrix product;
- each band's rows are folded into one 64-bit key; only the keys are kept.

Memory of the index, per document: `bands` x 8 bytes of band keys + 8 bytes of exact hash (with the
defaults 14*8 + 8 = 120 bytes), plus 8 bytes of union-find parent during clustering, so 128 B/doc:
a billion documents fit in 128 GB, ten million in 1.3 GB. `index_bytes_per_doc()` computes it.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+")
_NOT_WORD = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")
_MASK64 = (1 << 64) - 1


def normalize_text(text: str) -> str:
    """The form two 'identical' documents share: NFKC, lower case, no punctuation, single spaces.

    >>> normalize_text("Hello,  WORLD!\\n")
    'hello world'
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _NOT_WORD.sub(" ", text)).strip()


def hash64(data: str | bytes) -> int:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def exact_hash(text: str) -> int:
    """64-bit hash of the normalized text (as a signed int64, to store in numpy/parquet)."""
    h = hash64(normalize_text(text))
    return h - (1 << 64) if h >= (1 << 63) else h


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mixer (Steele et al. 2014), vectorised; uint64 arithmetic wraps mod 2^64."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass
class MinHasher:
    """MinHash signatures and LSH band keys over word n-grams.

    >>> mh = MinHasher()
    >>> a = mh.band_keys("the cat sat on the mat and looked at the dog " * 5)
    >>> b = mh.band_keys("the cat sat on the mat and looked at the dog " * 5 + "today")
    >>> a.shape, bool((a == b).any())
    ((14,), True)
    """

    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1
    chunk: int = 4096  # shingles per matrix block: bounds memory on huge documents
    _a: np.ndarray = field(init=False, repr=False)
    _b: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        n = self.bands * self.rows
        self._a = rng.integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self._b = rng.integers(0, 2**63, size=n, dtype=np.uint64)
        self._fold = rng.integers(1, 2**63, size=self.rows, dtype=np.uint64) | np.uint64(1)

    def shingles(self, text: str) -> np.ndarray:
        """64-bit hashes of the document's word n-grams (lower-cased words)."""
        words = _WORD.findall(text.lower())
        if not words:
            return np.zeros(0, dtype=np.uint64)
        vocab: dict[str, int] = {}
        ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.int64, count=len(words))
        table = np.fromiter((hash64(w) for w in vocab), dtype=np.uint64, count=len(vocab))
        h = table[ids]
        n = min(self.ngram, len(h))  # a document shorter than n words is one shingle
        out = np.zeros(len(h) - n + 1, dtype=np.uint64)
        mult = np.uint64(0x100000001B3)  # FNV prime as the polynomial base
        for k in range(n):
            out = out * mult + h[k:len(h) - n + 1 + k]
        return out

    def signature(self, text: str) -> np.ndarray:
        """(bands*rows,) uint32 minimum hash values; all 0xFFFFFFFF for a document with no words."""
        sh = self.shingles(text)
        sig = np.full(self.bands * self.rows, np.iinfo(np.uint32).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, len(sh), self.chunk):
                block = sh[i:i + self.chunk, None] * self._a[None, :] + self._b[None, :]
                np.minimum(sig, (block >> np.uint64(32)).min(axis=0), out=sig)
        return sig.astype(np.uint32)

    def band_keys(self, text: str) -> np.ndarray:
        """(bands,) uint64: each band's rows folded into one key."""
        sig = self.signature(text).astype(np.uint64).reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):
            keys = _splitmix64((sig * self._fold[None, :]).sum(axis=1, dtype=np.uint64)
                               + np.arange(self.bands, dtype=np.uint64))
        return keys


def index_bytes_per_doc(bands: int = 14) -> int:
    """Bytes the dedup phase holds per document: band keys + exact hash + union-find parent."""
    return bands * 8 + 8 + 8


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


def cluster_duplicates(band_keys: np.ndarray, exact: np.ndarray | None = None,
                       valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decide which documents to keep.

    band_keys: (n, bands) uint64 (or (n, 0) for exact only); exact: (n,) int64 hashes or None;
    valid: (n,) bool, False for rows that take no part (e.g. dropped earlier) -- they are neither
    kept nor used to drop others.

    Returns (reason, root): reason[i] = 0 keep, 1 exact duplicate, 2 near duplicate; root[i] = the
    index of the document kept for i's cluster. The kept one is the earliest index in its cluster.
    """
    n = len(band_keys)
    valid = np.ones(n, dtype=bool) if valid is None else valid
    reason = np.zeros(n, dtype=np.int8)
    reason[~valid] = -1
    parent = np.arange(n, dtype=np.int64)
    idx = np.flatnonzero(valid)
    # 1) exact: documents with the same normalized-text hash as an earlier one
    if exact is not None and len(idx):
        order = idx[np.argsort(exact[idx], kind="stable")]
        same = exact[order[1:]] == exact[order[:-1]]
        first = order.copy()
        for j in range(1, len(order)):  # carry the run's first index forward (runs are short)
            if same[j - 1]:
                first[j] = first[j - 1]
        dup = first != order
        reason[order[dup]] = 1
        parent[order[dup]] = first[dup]
        idx = np.flatnonzero(reason == 0)
    # 2) near duplicates among the survivors: any shared band key joins two clusters
    for b in range(band_keys.shape[1]):
        if len(idx) < 2:
            break
        keys = band_keys[idx, b]
        order = idx[np.argsort(keys, kind="stable")]
        same = np.flatnonzero(band_keys[order[1:], b] == band_keys[order[:-1], b])
        for j in same:
            ra, rb = _find(parent, int(order[j])), _find(parent, int(order[j + 1]))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # the earliest index becomes the root
    roots = np.array([_find(parent, i) for i in range(n)], dtype=np.int64)
    near = (reason == 0) & (roots != np.arange(n))
    reason[near] = 2
    return reason, roots


# ----------------------------------------------------------------------------------------------
# Standalone: deduplicate parquet files (a 'text' column) into an output folder.


def dedup_lines(texts: list[str], min_chars: int = 0, seen: set[int] | None = None) -> tuple[list[str], int]:
    """Exact line-level deduplication across documents (CCNet-style, Wenzek et al. 2019): a line whose
    normalized form appeared earlier (in this or an earlier document) is removed. Lines shorter than
    `min_chars` are always kept. Pass the same `seen` set to continue over several calls (8 bytes
    of hash per distinct line). Returns (new texts, lines removed).

    >>> dedup_lines(["Home\\nFirst story.", "Home\\nSecond story."])
    (['Home\\nFirst story.', 'Second story.'], 1)
    """
    seen = set() if seen is None else seen
    out, removed = [], 0
    for text in texts:
        kept = []
        for line in text.split("\n"):
            norm = normalize_text(line)
            if not norm or len(line) < min_chars:
                kept.append(line)
                continue
            h = hash64(norm)
            if h in seen:
                removed += 1
                continue
            seen.add(h)
            kept.append(line)
        out.append("\n".join(kept))
    return out, removed


def dedup_files(files: list[str | Path], out_dir: str | Path, exact: bool = True, minhash: bool = True,
                lines: bool = False, hasher: MinHasher | None = None) -> dict:
    """Deduplicate the documents of parquet files (a 'text' column; other columns are kept) across
    all of them, writing the survivors to `out_dir` under the same file names. Order: exact document
    hash, then MinHash-LSH, then (optional) line-level dedup of the survivors. Returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatforge.common import atomic_write_bytes

    hasher = hasher or MinHasher()
    texts_per_file = [pq.read_table(f, columns=["text"]).column("text").to_pylist() for f in files]
    flat = [t or "" for ts in texts_per_file for t in ts]
    ex = np.array([exact_hash(t) for t in flat], dtype=np.int64) if exact else None
    keys = np.stack([hasher.band_keys(t) for t in flat]) if (minhash and flat) else np.zeros((len(flat), 0), np.uint64)
    reason, _ = cluster_duplicates(keys, ex)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {"docs_in": len(flat), "exact_duplicates": int((reason == 1).sum()),
             "near_duplicates": int((reason == 2).sum()), "docs_out": int((reason == 0).sum()), "lines_removed": 0}
    seen_lines: set[int] = set()
    start = 0
    for f, ts in zip(files, texts_per_file):
        keep = reason[start:start + len(ts)] == 0
        start += len(ts)
        table = pq.read_table(f).filter(pa.array(keep))
        if lines and table.num_rows:
            new_texts, removed = dedup_lines(table.column("text").to_pylist(), seen=seen_lines)
            stats["lines_removed"] += removed
            table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(new_texts, pa.string()))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(out_dir / Path(f).name, sink.getvalue().to_pybytes())
    return stats
