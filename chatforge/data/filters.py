"""Document filters, datatrove-style: small objects with one method `filter(doc)` that returns True
(keep) or `(False, reason)`. A `doc` is anything with `.text` (and `.url`, `.meta` where used), e.g.
`chatforge.data.warc.Page`; a plain string works too for the text filters.

Defaults are FineWeb's published settings (Penedo et al. 2024, https://arxiv.org/abs/2406.17557,
and its datatrove pipeline `examples/fineweb.py`):

    URLFilter              UT1 blocklist (domains, URLs) + banned words / soft words in the URL
    GopherRepetitionFilter Rae et al. 2021, Table A1 (https://arxiv.org/abs/2112.11446)
    GopherQualityFilter    Rae et al. 2021, section A.1.1
    C4QualityFilter        Raffel et al. 2020 (https://arxiv.org/abs/1910.10683), FineWeb variant:
                           the terminal-punctuation line rule is off
    FineWebQualityFilter   FineWeb's three heuristics: line punctuation, short lines, duplicated chars
                           (+ the list-ratio rule from the datatrove implementation)

Every statistic is computed the way FineWeb's datatrove filters compute it (datatrove 0.10: the same
line splitting, C4's line dropping before the later filters, case-sensitive stop words, its punctuation
set for "symbol" words). Words come from `chatforge.data.words.split_words`, a port of the spaCy English
tokenizer rules datatrove splits words with, minus spaCy itself: the same tokens on 1131 of the
benchmark's 1133 extracted texts, at regex speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from chatforge.data.words import TERMINAL_PUNCTUATION, count_sentences, is_symbol, split_words

# ----------------------------------------------------------------------------------------------
# Text helpers

# Gopher's stop words: a document must contain at least two (Rae et al. 2021, A.1.1). Matched
# case-sensitively, as datatrove does ("The" does not count).
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})


def _text(doc) -> str:
    return doc if isinstance(doc, str) else doc.text


@lru_cache(maxsize=4)
def _words(text: str) -> list[str]:
    """split_words, once per text: Gopher repetition, Gopher quality and FineWeb all need the words
    of the same document (C4 changes the text in between, which makes a new key). Not to be mutated."""
    return split_words(text)


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, their total characters)."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


# ----------------------------------------------------------------------------------------------
# URL filter

# A small built-in list of words that mark adult URLs; `--url_words datatrove` uses FineWeb's lists.
BUILTIN_BANNED_WORDS = frozenset({"porn", "porno", "xxx", "sex", "xvideos", "xhamster", "pornhub", "hentai",
                                  "nsfw", "camgirl", "escort", "milf", "fetish", "nude", "nudes"})
BUILTIN_SOFT_WORDS = frozenset({"adult", "hot", "girls", "cam", "cams", "live", "dating", "teen", "sexy",
                                "babes", "amateur", "videos", "free", "gay", "lesbian", "erotic"})
_URL_SPLIT = re.compile(r"[^a-zA-Z0-9]+")


def _read_list(path: Path) -> set[str]:
    out = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip().lower()
            if line and not line.startswith("#"):
                out.add(line)
    return out


def _stable_hash(item: str) -> int:
    # blake2b, 64 bits, as a signed int64: the same in every process, so the array can be cached.
    return int.from_bytes(hashlib.blake2b(item.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


class HashSet:
    """A read-only set of strings stored as a sorted array of their 64-bit hashes: 8 bytes per entry
    instead of ~70 for a Python str in a set (the full UT1 list has 4.6M domains; as a Python set it
    alone pushed a worker past 1 GiB). A false positive needs a 64-bit collision (~1e-6 over all
    lookups of a 4.6M-entry list for a billion URLs)."""

    def __init__(self, items=(), hashes: np.ndarray | None = None):
        self._h = hashes if hashes is not None else np.unique(
            np.fromiter((_stable_hash(x) for x in items), dtype=np.int64))

    def __len__(self) -> int:
        return len(self._h)

    def __contains__(self, item: str) -> bool:
        h = _stable_hash(item)
        i = int(np.searchsorted(self._h, h))
        return i < len(self._h) and int(self._h[i]) == h

    def __or__(self, other) -> "HashSet":
        return HashSet(hashes=np.union1d(self._h, HashSet(other)._h))


def _iter_list(lines):
    for line in lines:
        line = line.strip().lower()
        if line and not line.startswith("#"):
            yield line


def _cache_dir() -> Path:
    return Path(os.environ.get("CHATFORGE_CACHE", Path.home() / ".cache" / "chatforge")) / "blocklists"


@lru_cache(maxsize=4)
def load_blocklist(source: str) -> tuple[HashSet, HashSet]:
    """(domains, urls) from a UT1-format directory (one folder per category holding `domains` and/or
    `urls` files, one entry per line) or, for source 'datatrove', from the full UT1 list FineWeb used,
    read from the installed datatrove wheel's assets (no download).

    Files are streamed line by line into hash arrays, and the arrays are cached (by path, size and
    mtime of the list files) in ~/.cache/chatforge/blocklists: parsing the 4.6M-domain list takes
    ~10 s, loading the cached 37 MB array ~0.1 s, once per worker process."""
    import io

    if source == "datatrove":
        import datatrove.utils._import_utils as du

        files = [Path(du.ASSETS_PATH) / "url_filterblacklistsv0_3_0.tar.gz"]
    else:
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(source)
        files = [f for f in sorted(root.rglob("*")) if f.name in ("domains", "urls") and f.is_file()]
    key = hashlib.sha256(json.dumps([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
                                     for f in files]).encode()).hexdigest()[:16]
    cache = _cache_dir() / f"{key}.npz"
    if cache.exists():
        try:
            with np.load(cache) as z:
                return HashSet(hashes=z["domains"]), HashSet(hashes=z["urls"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file: rebuild it
    parts: dict[str, list[np.ndarray]] = {"domains": [], "urls": []}
    if source == "datatrove":
        with tarfile.open(files[0], "r:gz") as tar:
            for m in tar:
                name = os.path.basename(m.name)
                if m.isfile() and name in parts:
                    stream = io.TextIOWrapper(tar.extractfile(m), encoding="utf-8", errors="replace")
                    parts[name].append(HashSet(_iter_list(stream))._h)
    else:
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                parts[f.name].append(HashSet(_iter_list(fh))._h)
    arrays = {k: np.unique(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home: no cache, still correct
    return HashSet(hashes=arrays["domains"]), HashSet(hashes=arrays["urls"])


@lru_cache(maxsize=4)
def load_url_words(source: str) -> tuple[frozenset, frozenset, tuple]:
    """(banned words, soft banned words, banned subwords): 'builtin', 'datatrove' (FineWeb's lists
    from the installed wheel) or a folder with banned_words.txt, soft_banned_words.txt and
    banned_subwords.txt."""
    if source == "builtin":
        return BUILTIN_BANNED_WORDS, BUILTIN_SOFT_WORDS, ()
    if source == "datatrove":
        import datatrove.utils._import_utils as du

        root = Path(du.ASSETS_PATH)
    else:
        root = Path(source)
    norm = lambda s: {_URL_SPLIT.sub("", w).lower() for w in s} - {""}  # noqa: E731
    get = lambda name: norm(_read_list(root / name)) if (root / name).exists() else set()  # noqa: E731
    return (frozenset(get("banned_words.txt")), frozenset(get("soft_banned_words.txt")),
            tuple(sorted(get("banned_subwords.txt"))))


class URLFilter:
    """Drop documents whose host (or any parent domain of it) or URL is on a UT1-format blocklist,
    whose URL contains a banned word, or at least `soft_word_threshold` soft-banned words.

    Reasons: domain, url, banned_word, soft_banned_words, banned_subword.
    """

    name = "url"

    def __init__(self, blocklist: str = "", words: str = "builtin", soft_word_threshold: int = 2,
                 extra_domains: set[str] | None = None):
        self.domains, self.urls = load_blocklist(blocklist) if blocklist else (HashSet(()), HashSet(()))
        if extra_domains:
            self.domains = self.domains | {d.lower() for d in extra_domains}
        self.banned, self.soft, subwords = load_url_words(words) if words else (frozenset(), frozenset(), ())
        self.subword_re = re.compile("|".join(map(re.escape, subwords))) if subwords else None
        self.soft_word_threshold = soft_word_threshold

    def filter(self, doc) -> bool | tuple[bool, str]:
        url = doc.url if not isinstance(doc, str) else doc
        try:
            host = (urlsplit(url).hostname or "").lower().rstrip(".")
        except ValueError:
            host = ""
        labels = host.split(".")
        # "a.b.example.com" is blocked by "a.b.example.com", "b.example.com" or "example.com"
        # (datatrove checks the registered domain and the full host; we check every parent).
        if any(".".join(labels[i:]) in self.domains for i in range(max(0, len(labels) - 1))):
            return False, "domain"
        low = url.lower()
        bare = low.split("://", 1)[-1]
        if low in self.urls or bare in self.urls or bare.removeprefix("www.") in self.urls:
            return False, "url"
        words = set(_URL_SPLIT.split(low))
        if words & self.banned:
            return False, "banned_word"
        if len(words & self.soft) >= self.soft_word_threshold:
            return False, "soft_banned_words"
        if self.subword_re is not None and self.subword_re.search(_URL_SPLIT.sub("", low)):
            return False, "banned_subword"
        return True


# ----------------------------------------------------------------------------------------------
# Gopher (Rae et al. 2021)


class GopherRepetitionFilter:
    """Drop documents with too much repeated content, Gopher Table A1: duplicated lines/paragraphs
    (by count and by characters), the most frequent 2-4-gram's share of characters, and the share of
    characters in duplicated 5-10-grams."""

    name = "gopher_rep"

    def __init__(self, dup_line_frac=0.3, dup_para_frac=0.3, dup_line_char_frac=0.2, dup_para_char_frac=0.2,
                 top_n_grams=((2, 0.2), (3, 0.18), (4, 0.16)),
                 dup_n_grams=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))):
        self.dup_line_frac, self.dup_para_frac = dup_line_frac, dup_para_frac
        self.dup_line_char_frac, self.dup_para_char_frac = dup_line_char_frac, dup_para_char_frac
        self.top_n_grams, self.dup_n_grams = top_n_grams, dup_n_grams

    def filter(self, doc) -> bool | tuple[bool, str]:
        text = _text(doc)
        if not text:
            return False, "empty"
        paras = re.split(r"\n{2,}", text.strip())
        n, chars = find_duplicates(paras)
        if n / len(paras) > self.dup_para_frac:
            return False, "dup_para_frac"
        if chars / len(text) > self.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = re.split(r"\n+", text)
        n, chars = find_duplicates(lines)
        if n / len(lines) > self.dup_line_frac:
            return False, "dup_line_frac"
        if chars / len(text) > self.dup_line_char_frac:
            return False, "dup_line_char_frac"
        words = _words(text)
        if not words:
            return True
        grams = _NGramIndex(words)
        for n, frac in self.top_n_grams:
            if len(words) >= n and grams.top_chars(n) / len(text) > frac:
                return False, f"top_{n}_gram"
        for n, frac in self.dup_n_grams:
            if len(words) >= n and grams.dup_chars(n) / len(text) > frac:
                return False, f"dup_{n}_gram"
        return True


class _NGramIndex:
    """Word n-gram statistics for the Gopher repetition rules, vectorised with numpy: words become
    integer ids, an n-gram becomes a 64-bit rolling hash of its ids, and only positions whose n-gram
    occurred earlier are visited in Python (most positions are first occurrences)."""

    _BASE = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, words: list[str]):
        vocab: dict[str, int] = {}
        self.ids = np.fromiter((vocab.setdefault(w, len(vocab)) + 1 for w in words), dtype=np.uint64,
                               count=len(words))
        self.lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.cum = np.concatenate([[0], np.cumsum(self.lens)])  # chars of words[i:j] = cum[j] - cum[i]

    def hashes(self, n: int) -> np.ndarray:
        m = len(self.ids) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                h = h * self._BASE + self.ids[k:k + m]
        return h

    def top_chars(self, n: int) -> int:
        """Characters of the most frequent n-gram (joined by spaces) times its count; ties go to the
        n-gram seen first, as Counter.most_common does."""
        _, first, counts = np.unique(self.hashes(n), return_index=True, return_counts=True)
        best = np.flatnonzero(counts == counts.max())
        i = int(first[best].min())
        return int(self.cum[i + n] - self.cum[i] + (n - 1)) * int(counts.max())

    def dup_chars(self, n: int) -> int:
        """Characters in n-grams that repeat an earlier one, scanning left to right and jumping past
        each repeat (so a word is counted once): Gopher's 'duplicate n-gram character fraction'."""
        h = self.hashes(n)
        _, first_idx, inv = np.unique(h, return_index=True, return_inverse=True)
        first = first_idx[inv]  # first occurrence of each position's n-gram
        cand = np.flatnonzero(first < np.arange(len(h)))
        if not len(cand):
            return 0
        skipped = np.zeros(len(h), dtype=bool)
        pointer = chars = 0
        for c in cand.tolist():
            if c < pointer:  # jumped over
                continue
            f = int(first[c])
            seen = not skipped[f]
            if not seen:  # the first occurrence was jumped over: was any later earlier one visited?
                earlier = np.flatnonzero(inv[:c] == inv[c])
                seen = bool((~skipped[earlier]).any())
            if seen:
                chars += int(self.cum[c + n] - self.cum[c])
                skipped[c + 1:c + n] = True
                pointer = c + n
            else:
                pointer = c + 1
        return chars


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by n-grams seen earlier in the document, each word counted once
    (after a repeat, skip past it, as in Gopher's definition)."""
    seen: set[tuple[str, ...]] = set()
    i = chars = 0
    while i <= len(words) - n:
        gram = tuple(words[i:i + n])
        if gram in seen:
            chars += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


class GopherQualityFilter:
    """Gopher's quality rules (Rae et al. 2021, A.1.1): 50..100k words, mean word length 3..10,
    hash and ellipsis symbols <= 10% of words, <= 90% bullet lines, <= 30% lines ending in an
    ellipsis, >= 80% of words with a letter, >= 2 of the stop words."""

    name = "gopher_quality"

    def __init__(self, min_doc_words=50, max_doc_words=100_000, min_avg_word_length=3, max_avg_word_length=10,
                 max_symbol_word_ratio=0.1, max_bullet_lines_ratio=0.9, max_ellipsis_lines_ratio=0.3,
                 min_alpha_words_ratio=0.8, min_stop_words=2, stop_words=GOPHER_STOP_WORDS):
        self.min_doc_words, self.max_doc_words = min_doc_words, max_doc_words
        self.min_avg, self.max_avg = min_avg_word_length, max_avg_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines_ratio, self.max_ellipsis_lines_ratio = max_bullet_lines_ratio, max_ellipsis_lines_ratio
        self.min_alpha_words_ratio, self.min_stop_words = min_alpha_words_ratio, min_stop_words
        self.stop_words = frozenset(stop_words)

    def filter(self, doc) -> bool | tuple[bool, str]:
        text = _text(doc)
        words = _words(text)
        real = [w for w in words if not is_symbol(w)]
        if len(real) < self.min_doc_words:
            return False, "short_doc"
        if len(real) > self.max_doc_words:
            return False, "long_doc"
        avg = sum(map(len, real)) / len(real)
        if avg < self.min_avg:
            return False, "short_words"
        if avg > self.max_avg:
            return False, "long_words"
        if text.count("#") / len(words) > self.max_symbol_word_ratio:
            return False, "too_many_hashes"
        if (text.count("...") + text.count("…")) / len(words) > self.max_symbol_word_ratio:
            return False, "too_many_ellipsis"
        lines = text.splitlines() or [""]
        if sum(ln.lstrip().startswith(("•", "-")) for ln in lines) / len(lines) > self.max_bullet_lines_ratio:
            return False, "too_many_bullets"
        if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > self.max_ellipsis_lines_ratio:
            return False, "too_many_end_ellipsis"
        if sum(any(c.isalpha() for c in w) for w in words) / len(words) < self.min_alpha_words_ratio:
            return False, "few_alpha_words"
        if self.min_stop_words and len(self.stop_words.intersection(words)) < self.min_stop_words:
            return False, "few_stop_words"
        return True


# ----------------------------------------------------------------------------------------------
# C4 (Raffel et al. 2020)

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_C4_END = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4QualityFilter:
    """C4's rules, line by line: drop lines with a word over 1000 chars, fewer than 3 words, the word
    'javascript' or a cookie/policy phrase; drop the document on 'lorem ipsum', a curly bracket, or
    fewer than 5 sentences left. Kept lines replace the document's text (as in C4). FineWeb turns the
    'line must end in terminal punctuation' rule off (`filter_no_terminal_punct=False`)."""

    name = "c4"

    def __init__(self, filter_no_terminal_punct=False, min_num_sentences=5, min_words_per_line=3,
                 max_word_length=1000, filter_lorem_ipsum=True, filter_javascript=True,
                 filter_curly_bracket=True, filter_policy=True, remove_citations=True):
        self.filter_no_terminal_punct = filter_no_terminal_punct
        self.min_num_sentences, self.min_words_per_line = min_num_sentences, min_words_per_line
        self.max_word_length = max_word_length
        self.filter_lorem_ipsum, self.filter_javascript = filter_lorem_ipsum, filter_javascript
        self.filter_curly_bracket, self.filter_policy = filter_curly_bracket, filter_policy
        self.remove_citations = remove_citations

    def filter(self, doc) -> bool | tuple[bool, str]:
        kept: list[str] = []
        sentences = 0
        for line in _text(doc).splitlines():
            line = line.strip()
            words = line.split()
            if self.max_word_length > 0 and any(len(w) > self.max_word_length for w in words):
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(_C4_END) or line.endswith("...")):
                continue
            if len(words) < self.min_words_per_line:
                continue
            low = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in low:
                return False, "lorem_ipsum"
            if self.filter_javascript and "javascript" in low:
                continue
            if self.filter_curly_bracket and "{" in line:
                return False, "curly_bracket"
            if self.filter_policy and any(p in low for p in _POLICY):
                continue
            if sentences < self.min_num_sentences:  # counting further cannot change the decision
                sentences += count_sentences(line)
            kept.append(line)
        if sentences < self.min_num_sentences:
            return False, "too_few_sentences"
        if not isinstance(doc, str):
            doc.text = "\n".join(kept).strip()
        return True


# ----------------------------------------------------------------------------------------------
# FineWeb's own heuristics (Penedo et al. 2024, section 3.5)


class FineWebQualityFilter:
    """Drop documents where < 12% of lines end in terminal punctuation, > 67% of lines are at most
    30 characters, duplicated lines hold > 1% of the characters, or there are more than 0.3
    newlines per word (list-like pages)."""

    name = "fineweb"

    def __init__(self, line_punct_thr=0.12, short_line_thr=0.67, short_line_length=30,
                 char_duplicates_ratio=0.01, new_line_ratio=0.3):
        self.line_punct_thr, self.short_line_thr = line_punct_thr, short_line_thr
        self.short_line_length = short_line_length
        self.char_duplicates_ratio, self.new_line_ratio = char_duplicates_ratio, new_line_ratio

    def filter(self, doc) -> bool | tuple[bool, str]:
        text = _text(doc)
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if not lines:
            return False, "empty"
        if sum(ln.endswith(TERMINAL_PUNCTUATION) for ln in lines) / len(lines) < self.line_punct_thr:
            return False, "line_punct_ratio"
        if sum(len(ln) <= self.short_line_length for ln in lines) / len(lines) > self.short_line_thr:
            return False, "short_line_ratio"
        if find_duplicates(lines)[1] / max(1, len(text.replace("\n", ""))) > self.char_duplicates_ratio:
            return False, "char_dup_ratio"
        if text.count("\n") / max(1, len(_words(text))) > self.new_line_ratio:
            return False, "list_ratio"
        return True


# datatrove's drop-reason names for the same rules (FineWeb's reference pipeline), for comparisons with it
# (bench/bench_data.py, tests/test_data_words.py). Reasons not listed have the same name in both.
_DATATROVE_REASONS = {
    "gopher_below_alpha_threshold": "few_alpha_words", "gopher_short_doc": "short_doc",
    "gopher_below_avg_threshold": "short_words", "gopher_above_avg_threshold": "long_words",
    "gopher_too_many_bullets": "too_many_bullets", "gopher_too_many_ellipsis": "too_many_ellipsis",
    "gopher_too_many_hashes": "too_many_hashes", "gopher_enough_stop_words": "few_stop_words",
    "gopher_too_many_end_ellipsis": "too_many_end_ellipsis", "gopher_long_doc": "long_doc"}


def reason_from_datatrove(reason: str) -> str:
    """Our name for a datatrove drop reason.

    >>> reason_from_datatrove("gopher_below_alpha_threshold"), reason_from_datatrove("duplicated_5_n_grams")
    ('few_alpha_words', 'dup_5_gram')
    """
    reason = _DATATROVE_REASONS.get(reason, reason)
    if reason.startswith("duplicated_"):  # duplicated_5_n_grams -> dup_5_gram
        reason = "dup_" + reason.split("_")[1] + "_gram"
    return reason
