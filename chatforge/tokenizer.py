"""Byte-level BPE tokenizer: trained with rustbpe, run with tiktoken, chat protocol on top.

The pairing is nanochat's: rustbpe trains fast and emits tiktoken-style mergeable ranks
(token bytes -> rank, where rank == token id), and tiktoken encodes/decodes them fast. On top:

- special tokens for the chat protocol and tools, reserved after the merged vocabulary;
- loaders for GPT-2 `vocab.json` + `merges.txt`, `.tiktoken` rank files and Hugging Face
  `tokenizer.json`, and an exporter to `tokenizer.json` + chat template for `transformers`;
- `render_conversation` (ids + loss mask), `render_prompt` and `parse_conversation`.

Security boundary: `encode(text)` never produces a special token, whatever the text says. A user
typing "<|assistant_start|>" gets the bytes of that string, not the control token. Only
`encode(text, allow_special=True)`, for trusted strings, maps them to control ids.
"""

from __future__ import annotations

import base64
import glob
import gzip
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from chatforge.common import ChatforgeError, atomic_write_text, data_dir, data_path, physical_cores

# ----------------------------------------------------------------------------------------------
# Split patterns and special tokens

PATTERNS = {
    # GPT-4 (cl100k_base) pattern: case-insensitive contractions, numbers in groups of 1-3 digits,
    # punctuation runs with trailing newlines, whitespace runs. https://github.com/openai/tiktoken
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
    # GPT-2 pattern (Radford et al. 2019), also the default of HF's ByteLevel pre-tokenizer.
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
}

# The chat protocol. Ids follow the merged vocabulary in this order.
#   <|bos|>                                  starts every document and every conversation
#   <|system_start|> ... <|system_end|>      system prompt
#   <|user_start|> ... <|user_end|>          user turn
#   <|assistant_start|> ... <|assistant_end|> assistant turn (assistant_end doubles as end of reply)
#   <|python_start|> code <|python_end|>     assistant calls the Python sandbox
#   <|search_start|> query <|search_end|>    assistant calls the search tool
#   <|output_start|> ... <|output_end|>      tool result, inserted by the engine, never trained on
#   <|function_start|> JSON <|function_end|> assistant calls a user-defined function (OpenAI `tools`):
#                                            {"name": ..., "arguments": {...}}; the result comes back
#                                            as a tool message between the output pair
# The function pair was added after the first 13 tokens (appended, so the order of the others is
# unchanged). A tokenizer trained before it still loads and renders every conversation without
# functions; one that declares or calls functions gets a clear error (see _function_tokens).
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|system_start|>", "<|system_end|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|search_start|>", "<|search_end|>",
    "<|output_start|>", "<|output_end|>",
    "<|function_start|>", "<|function_end|>",
]
# Built-in tools the engine runs itself, one token pair each. User-defined functions are not here:
# the engine does not run them, the caller does (the server returns them as OpenAI `tool_calls`).
TOOL_TOKENS = {"python": ("<|python_start|>", "<|python_end|>"),
               "search": ("<|search_start|>", "<|search_end|>")}
FUNCTION_TOKENS = ("<|function_start|>", "<|function_end|>")

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "chatforge_tokenizer.json"


def resolve_pattern(pattern: str) -> str:
    return PATTERNS.get(pattern, pattern)


# ----------------------------------------------------------------------------------------------
# Reading a text corpus: .txt[.gz], .jsonl[.gz], .parquet


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    chars: int = 0
    truncated: int = 0
    bad_records: int = 0


STAGE_PREFIX = "stage:"


def stage_shards(stage_path: Path) -> list[Path]:
    """The text shards a complete stage publishes: `<stage dir>/shards/*.parquet` (the data stage's
    output), else any `*.parquet` directly in the stage folder."""
    return sorted((stage_path / "shards").glob("*.parquet")) or sorted(stage_path.glob("*.parquet"))


def expand_corpus(paths: Iterable[str | Path], data_dir_setting: str = "", run: Any = None) -> list[Path]:
    """Files named by paths or globs; relative names are looked up in the data dir too.

    A string that names an existing file is that file, even when it holds glob characters (`a[1].txt`);
    otherwise `*?[` make it a glob. A `Path` is always the file it names, never a glob, so a list this
    function returned passes through it unchanged (expand once, hand the list on). The entry
    `stage:NAME` (e.g. `stage:data`) stands for the text shards of stage NAME of `run` (a stage
    config: anything with `runs_dir` and `run`), which must be complete."""
    out: list[Path] = []
    for p in paths:
        if isinstance(p, Path):
            if not p.exists():
                raise ChatforgeError(f"corpus file '{p}' not found")
            out.append(p)
            continue
        if p.startswith(STAGE_PREFIX):
            stage = p[len(STAGE_PREFIX):]
            if run is None:
                raise ChatforgeError(f"corpus entry '{p}' names a stage, but no run was given to resolve it")
            from chatforge.common import require_stage

            shards = stage_shards(require_stage(run, stage))
            if not shards:
                raise ChatforgeError(f"corpus entry '{p}': stage '{stage}' of run '{run.run}' has no parquet "
                                     f"shards; rerun it with --force")
            out.extend(shards)
            continue
        root = "" if os.path.isabs(p) else str(data_dir(data_dir_setting))
        literal = next((Path(c) for c in (p, os.path.join(root, p)) if os.path.isfile(c)), None)
        if literal is None and any(ch in p for ch in "*?["):
            hits = sorted(glob.glob(p)) or sorted(glob.glob(os.path.join(root, p)))
            if not hits:
                raise ChatforgeError(f"corpus glob '{p}' matches no file (cwd and data dir {root or '/'})")
            out.extend(Path(h) for h in hits)
        else:
            out.append(literal or data_path(p, data_dir_setting))
    for f in out:
        if f.is_dir():
            raise ChatforgeError(f"corpus entry '{f}' is a folder; give files or a glob like '{f}/*.parquet'")
    return out


def _open_text(path: Path):
    # universal newlines: a CRLF file reads as LF, so its blank lines separate documents too
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="strict")
    return open(path, "r", encoding="utf-8", errors="strict")


def record_text(rec: Any) -> str:
    """The text of a JSON record: its 'text' (else 'content') field; else every nested 'text' field joined by blank
    lines (OASST message trees); else its string values and lists of strings joined by newlines
    (GSM8K question+answer, MT-bench turns, HumanEval prompt+solution).

    >>> record_text({"question": "1+1?", "answer": "2"})
    '1+1?\\n2'
    """
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return ""
    for key in ("text", "content"):
        if isinstance(rec.get(key), str):
            return rec[key]
    nested: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("text"), str):
                nested.append(x["text"])
            for k, v in x.items():
                if k != "text":
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(rec)
    if nested:
        return "\n\n".join(nested)
    parts: list[str] = []
    for v in rec.values():
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts.extend(x for x in v if isinstance(x, str))
    return "\n".join(parts)


_BLANK_LINE = re.compile(r"\n\s*\n")


def _split_plain(text: str, doc_chars: int) -> Iterator[str]:
    """Plain text has no document boundaries: blank-line separated blocks are documents, and a file
    with no blank line at all is one document per line (e.g. one article per line). A block longer
    than doc_chars (0 = no limit) is cut on line boundaries so nothing is thrown away.

    >>> list(_split_plain("a\\nb\\n\\nc\\n", 100)), list(_split_plain("a\\nb\\n\\n", 100))
    (['a\\nb', 'c\\n'], ['a', 'b'])
    """
    # a blank line (spaces allowed) inside the text, not just a trailing one, makes it paragraph-separated
    blocks = _BLANK_LINE.split(text) if _BLANK_LINE.search(text.strip()) else text.split("\n")
    for block in blocks:
        if not block.strip():
            continue
        if not doc_chars or len(block) <= doc_chars:
            yield block
            continue
        piece: list[str] = []
        size = 0
        for line in block.split("\n"):
            if size + len(line) + 1 > doc_chars and piece:
                yield "\n".join(piece)
                piece, size = [], 0
            piece.append(line)
            size += len(line) + 1
        if piece:
            yield "\n".join(piece)


class Document(NamedTuple):
    """One document of a corpus file."""

    text: str
    source: str  # "<file name>#<n>": the n-th row, line, list element or text block of the file, from 0
    meta: dict  # the string values of the record fields asked for (e.g. url, title); {} for plain text


def _iter_file(path: Path, doc_chars: int, stats: CorpusStats, fields: tuple[str, ...]) -> Iterator[Document]:
    name = path.name.removesuffix(".gz")

    def doc(n: int, text: Any, rec: Any) -> Document | None:
        if not isinstance(text, str) or not text.strip():
            stats.bad_records += 1  # a long job skips and counts a bad record
            return None
        meta = {k: rec[k] for k in fields if isinstance(rec.get(k), str) and rec[k]} if isinstance(rec, dict) else {}
        return Document(text, f"{path.name}#{n}", meta)

    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises several types for a bad file
                raise ChatforgeError(f"corpus file '{path}' is not a readable parquet file ({e})") from None
            columns = pf.schema_arrow.names
            if "text" not in columns:
                raise ChatforgeError(f"corpus file '{path}' has no 'text' column (columns: {columns})")
            n = 0
            for batch in pf.iter_batches(columns=["text", *(c for c in fields if c in columns and c != "text")],
                                         batch_size=1024):
                texts = batch.column(0).to_pylist()
                recs = batch.to_pylist() if fields else [None] * len(texts)
                for text, rec in zip(texts, recs):
                    if (d := doc(n, text, rec)) is not None:
                        yield d
                    n += 1
        elif name.endswith((".jsonl", ".json")):
            with _open_text(path) as f:
                first = f.read(256).lstrip()[:1]  # a JSON list may start after whitespace
                f.seek(0)
                if name.endswith(".json") and first == "[":  # a JSON list of records
                    try:
                        records: Iterable[Any] = json.load(f)
                    except json.JSONDecodeError as e:
                        raise ChatforgeError(f"corpus file '{path}' is not valid JSON ({e})") from None
                    for n, rec in enumerate(records):
                        if (d := doc(n, record_text(rec), rec)) is not None:
                            yield d
                    return
                for n, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        rec = None
                    if (d := doc(n, record_text(rec), rec)) is not None:
                        yield d
        else:
            with _open_text(path) as f:
                for n, text in enumerate(_split_plain(f.read(), doc_chars)):
                    yield Document(text, f"{path.name}#{n}", {})
    except UnicodeDecodeError as e:
        raise ChatforgeError(
            f"corpus file '{path}' is not valid UTF-8 (byte {e.object[e.start:e.start + 1]!r} at offset "
            f"~{e.start} of a chunk); convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    except (OSError, EOFError) as e:
        raise ChatforgeError(f"corpus file '{path}' could not be read ({e})") from None


def read_documents(files: Iterable[Path], doc_chars: int = 10_000, max_chars: int = 0,
                   stats: CorpusStats | None = None, fields: tuple[str, ...] = ()) -> Iterator[Document]:
    """The documents of files (from `expand_corpus`): .parquet (the `text` column), .jsonl / .json
    (`record_text` of each record), else UTF-8 text, optionally gzipped. Each is truncated to doc_chars
    (0 = no limit); reading stops after max_chars in total (0 = no limit). `fields` names record fields
    to keep in Document.meta (e.g. ("url", "title") for the search index). Records without text are
    counted in stats.bad_records and skipped; a missing, unreadable or non-UTF-8 file is an error."""
    stats = stats if stats is not None else CorpusStats()
    for path in files:
        stats.files += 1
        for doc in _iter_file(Path(path), doc_chars, stats, fields):
            if doc_chars and len(doc.text) > doc_chars:
                doc = doc._replace(text=doc.text[:doc_chars])
                stats.truncated += 1
            stats.documents += 1
            stats.chars += len(doc.text)
            yield doc
            if max_chars and stats.chars >= max_chars:
                return


def iter_documents(paths: Iterable[str | Path], data_dir_setting: str = "", doc_chars: int = 10_000,
                   max_chars: int = 0, stats: CorpusStats | None = None, run: Any = None) -> Iterator[str]:
    """The text of `read_documents` over `expand_corpus(paths, data_dir_setting, run)`: documents
    truncated to doc_chars, stopping after max_chars in total (0 = no limit). `stats` is filled in as
    documents are read; `run` resolves `stage:NAME` entries."""
    for doc in read_documents(expand_corpus(paths, data_dir_setting, run), doc_chars, max_chars, stats):
        yield doc.text


# ----------------------------------------------------------------------------------------------
# GPT-2 byte <-> unicode mapping used by vocab.json/merges.txt and HF ByteLevel.


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable unicode characters: printable
    latin-1 bytes map to themselves, the rest to chr(256+n) in byte order.

    >>> bytes_to_unicode()[ord(" ")], bytes_to_unicode()[ord("a")]
    ('Ġ', 'a')
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, n = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


@lru_cache(maxsize=None)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_str_to_bytes(token: str, source: str) -> bytes:
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        raise ChatforgeError(f"{source}: token {token!r} is not byte-level BPE text (GPT-2 style)") from None


def _bytes_to_token_str(b: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def _ranks_from_vocab_merges(vocab: dict[str, int], merges: list[tuple[str, str]], source: str):
    """(mergeable_ranks, special_tokens) from a byte-level BPE vocab + merges.

    tiktoken merges by the rank (= id) of the merged token, HF BPE by the merge's position; they
    agree when ids grow with merge order, which holds for GPT-2 and for our own exports. Tokens that
    are neither a single byte nor a merge result (GPT-2's <|endoftext|>) become special tokens.
    """
    merged = {a + b for a, b in merges}
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for tok, idx in vocab.items():
        if len(tok) == 1 or tok in merged:
            ranks[_token_str_to_bytes(tok, source)] = idx
        else:
            specials[tok] = idx
    last = -1
    for a, b in merges:
        idx = vocab.get(a + b)
        if idx is None or a not in vocab or b not in vocab:
            raise ChatforgeError(f"{source}: merge '{a} {b}' uses a token missing from the vocab")
        if idx <= last:
            raise ChatforgeError(f"{source}: token ids do not follow merge order (at merge '{a} {b}'); "
                                 "tiktoken needs rank == id, so this vocab cannot be loaded")
        last = idx
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ChatforgeError(f"{source}: mergeable token ids are not 0..{len(ranks) - 1}")
    return ranks, specials


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run BPE on `token` using only merges ranked below max_rank (used to recover merge pairs)."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


# ----------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """tiktoken-backed byte-level BPE with chatforge's special tokens."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = "gpt4",
                 special_tokens: dict[str, int] | None = None, name: str = "chatforge"):
        import tiktoken

        self.pattern = resolve_pattern(pattern)
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = dict(special_tokens or {})
        self.name = name
        try:
            self.enc = tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=mergeable_ranks,
                                         special_tokens=self.special_tokens)
        except Exception as e:  # tiktoken raises ValueError for a bad regex or clashing ids
            raise ChatforgeError(f"tokenizer '{name}': tiktoken rejected it ({e})") from None
        self.id_to_special = {i: s for s, i in self.special_tokens.items()}

    # -- training -------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = "gpt4",
              special_tokens: list[str] = SPECIAL_TOKENS) -> "Tokenizer":
        """Train a byte-level BPE with rustbpe; specials take the last len(special_tokens) ids."""
        import rustbpe

        n_merged = vocab_size - len(special_tokens)
        if n_merged < 256:
            raise ChatforgeError(
                f"--vocab_size {vocab_size} is too small: 256 byte tokens + {len(special_tokens)} special "
                f"tokens need at least {256 + len(special_tokens)}"
            )
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size=n_merged, pattern=resolve_pattern(pattern))
        ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
        if len(ranks) < n_merged:
            # rustbpe stops early when no pair occurs twice: the corpus is too small for this vocab.
            raise ChatforgeError(f"the corpus only supports {len(ranks)} merged tokens, fewer than "
                                 f"--vocab_size {vocab_size} asks for; give more text or a smaller vocab")
        specials = {s: n_merged + i for i, s in enumerate(special_tokens)}
        return cls(ranks, pattern, specials)

    # -- encode / decode -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def bos_id(self) -> int:
        return self.special("<|bos|>")

    def special(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ChatforgeError(f"tokenizer '{self.name}' has no special token {name}") from None

    def encode(self, text: str, allow_special: bool = False, bos: bool = False) -> list[int]:
        """Text to ids. Special-token strings inside `text` are plain text unless allow_special."""
        ids = self.enc.encode(text, allowed_special="all") if allow_special else self.enc.encode_ordinary(text)
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: list[str], num_threads: int = 0, bos: bool = False) -> list[list[int]]:
        """Many texts at once on a thread pool (ordinary text only). tiktoken releases the GIL while
        it encodes, so threads scale; each thread gets a contiguous chunk of texts rather than one
        text per task (tiktoken's own encode_ordinary_batch), whose per-task overhead dominated on
        short documents (bench/RESULTS.md)."""
        threads = num_threads or physical_cores()
        encode = self.enc.encode_ordinary
        if threads == 1 or len(texts) < 2 * threads:
            out = [encode(t) for t in texts]
        else:
            size = -(-len(texts) // (4 * threads))  # ~4 chunks per thread evens out long documents
            chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
            with ThreadPoolExecutor(threads) as pool:
                out = [ids for part in pool.map(lambda c: [encode(t) for t in c], chunks) for ids in part]
        if bos:
            out = [[self.bos_id, *ids] for ids in out]
        return out

    def encode_bytes(self, data: bytes) -> list[int]:
        """Arbitrary bytes (not necessarily UTF-8) to ids; decode_bytes inverts it exactly.
        Uses tiktoken's byte-level entry point (`_encode_bytes`, stable since tiktoken 0.4)."""
        return self.enc._encode_bytes(data)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of every id (0 for specials): the denominator of bits-per-byte."""
        out = [0] * self.vocab_size
        for b, r in self.mergeable_ranks.items():
            out[r] = len(b)
        return out

    # -- chat protocol -------------------------------------------------------------------------

    def render_conversation(self, messages: list[dict], max_tokens: int | None = None, tools: list | None = None):
        """Conversation -> (ids, loss_mask). See `render_conversation` below."""
        return render_conversation(self, messages, max_tokens, tools)

    def render_prompt(self, messages: list[dict], tools: list | None = None) -> list[int]:
        return render_prompt(self, messages, tools)

    def parse_conversation(self, ids: list[int]) -> list[dict]:
        return parse_conversation(self, ids)

    # -- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.tiktoken` (tiktoken's base64 rank format) + `chatforge_tokenizer.json`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(b).decode()} {r}" for b, r in sorted(self.mergeable_ranks.items(),
                                                                           key=lambda kv: kv[1])]
        atomic_write_text(d / RANKS_FILE, "\n".join(lines) + "\n")
        atomic_write_text(d / META_FILE, json.dumps({
            "name": self.name, "pattern": self.pattern, "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size}, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a chatforge tokenizer folder, a GPT-2 folder (vocab.json + merges.txt),
        a Hugging Face tokenizer.json (or its folder), or a .tiktoken rank file (GPT-4 pattern)."""
        p = Path(path)
        if p.is_dir():
            if (p / META_FILE).exists():
                meta = _read_json(p / META_FILE)
                try:
                    pattern, specials = meta["pattern"], meta["special_tokens"]
                except (KeyError, TypeError):
                    raise ChatforgeError(f"tokenizer file '{p / META_FILE}' lacks 'pattern' or 'special_tokens'") from None
                return cls(load_tiktoken_ranks(p / RANKS_FILE), pattern, specials, meta.get("name", p.name))
            if (p / "vocab.json").exists() and (p / "merges.txt").exists():
                return cls.from_gpt2_files(p / "vocab.json", p / "merges.txt")
            if (p / "tokenizer.json").exists():
                return cls.from_hf_json(p / "tokenizer.json")
            raise ChatforgeError(f"tokenizer folder '{p}' has none of {META_FILE}, vocab.json+merges.txt, "
                                 "tokenizer.json; train one with `chatforge tokenizer`")
        if not p.exists():
            raise ChatforgeError(f"tokenizer '{p}' not found")
        if p.name.endswith(".json"):
            return cls.from_hf_json(p)
        return cls(load_tiktoken_ranks(p), "gpt4", {}, p.stem)

    @classmethod
    def from_gpt2_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike) -> "Tokenizer":
        vocab = _read_json(vocab_file)
        if not isinstance(vocab, dict):
            raise ChatforgeError(f"tokenizer file '{vocab_file}' is not a JSON object of token -> id")
        merges = []
        try:
            text = Path(merges_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ChatforgeError(f"tokenizer file '{merges_file}' could not be read ({e})") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line or line.startswith("#version"):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ChatforgeError(f"tokenizer file '{merges_file}' line {n}: expected 'a b', got {line!r}")
            merges.append((pair[0], pair[1]))
        ranks, specials = _ranks_from_vocab_merges(vocab, merges, str(vocab_file))
        return cls(ranks, "gpt2", specials, "gpt2")

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> "Tokenizer":
        data = _read_json(path)
        model = data.get("model", {}) if isinstance(data, dict) else {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise ChatforgeError(f"tokenizer file '{path}' is not a byte-level BPE tokenizer.json "
                                 f"(model type {model.get('type')!r}); only byte-level BPE is supported")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        vocab = dict(model["vocab"])
        for added in data.get("added_tokens", []):
            vocab.setdefault(added["content"], added["id"])
        ranks, specials = _ranks_from_vocab_merges(vocab, merges, str(path))
        return cls(ranks, _hf_pattern(data.get("pre_tokenizer"), path), specials, Path(path).parent.name)

    def export_hf(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json (with the chat template) for transformers."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        vocab = {_bytes_to_token_str(b): r for b, r in self.mergeable_ranks.items()}
        merges = []
        for b, r in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            if len(b) < 2:
                continue
            parts = _bpe_split(self.mergeable_ranks, b, r)
            if len(parts) != 2:
                raise ChatforgeError(f"token {b!r} (id {r}) is not the merge of two earlier tokens; "
                                     "cannot express this vocab as HF BPE merges")
            merges.append((_bytes_to_token_str(parts[0]), _bytes_to_token_str(parts[1])))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        for s, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1]):
            hf.add_special_tokens([AddedToken(s, special=True, normalized=False)])
            if hf.token_to_id(s) != i:
                raise ChatforgeError(f"special token {s} got id {hf.token_to_id(s)} in the HF export, not {i}")
        hf.save(str(d / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": 1_000_000}
        if "<|bos|>" in self.special_tokens:
            config.update(bos_token="<|bos|>", eos_token="<|assistant_end|>", chat_template=CHAT_TEMPLATE)
        atomic_write_text(d / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return d


def _read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatforgeError(f"tokenizer file '{path}' not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"tokenizer file '{path}' is corrupt: not valid JSON ({e})") from None


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read tiktoken's rank format: one `base64(token_bytes) rank` per line."""
    ranks: dict[bytes, int] = {}
    try:
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        raise ChatforgeError(f"tokenizer file '{path}' not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"tokenizer file '{path}' is corrupt: not a tiktoken rank file ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError:
            raise ChatforgeError(f"tokenizer file '{path}' is corrupt at line {n}: expected "
                                 f"'<base64> <rank>', got {line[:60]!r}") from None
    if not ranks:
        raise ChatforgeError(f"tokenizer file '{path}' is empty")
    return ranks


def _hf_pattern(pre: dict | None, path) -> str:
    """The split regex of a HF pre-tokenizer: a Split's regex, or GPT-2's for ByteLevel(use_regex)."""
    if not pre:
        raise ChatforgeError(f"tokenizer file '{path}' has no pre_tokenizer; cannot infer the split pattern")
    items = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for item in items:
        if item.get("type") == "Split" and "Regex" in item.get("pattern", {}):
            return item["pattern"]["Regex"]
    for item in items:
        if item.get("type") == "ByteLevel" and item.get("use_regex", True):
            return PATTERNS["gpt2"]
    raise ChatforgeError(f"tokenizer file '{path}': unsupported pre_tokenizer {pre.get('type')}")


# ----------------------------------------------------------------------------------------------
# Chat protocol
#
# A conversation is a list of messages:
#   {"role": "system", "content": str, "tools": [function schema, ...]}      ("tools" optional)
#   {"role": "user", "content": str}
#   {"role": "assistant", "content": str, "tool_calls": [{"name": str, "arguments": str | dict}]}
#   {"role": "tool", "name": str, "content": str}
# A tool call and its output live inside one assistant turn, the way the engine produces them:
#   <|assistant_start|>Let me compute.<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>
#   It is 42.<|assistant_end|>
# so an assistant message that ends in a tool call has no <|assistant_end|>, and the assistant message
# after a tool result continues the same turn (no new <|assistant_start|>). Several calls in one
# message are answered by as many tool messages, in order.
#
# Built-in tools vs user-defined functions. A call named "python" or "search" is a built-in tool: its
# arguments are the raw text between that tool's token pair, and the engine runs it. Any other name is a
# user-defined function (OpenAI `tools` / `tool_calls`): it must be declared in the conversation's
# tools, and the call is JSON between the function pair,
#   <|function_start|>{"name": "get_weather", "arguments": {"city": "Paris"}}<|function_end|>
# Dict arguments are written with json.dumps(ensure_ascii=False), which is exactly what transformers'
# `tojson` template filter writes, so the exported HF chat template renders the same ids. String
# arguments (OpenAI sends a JSON string) must hold a JSON object and are written as given. OpenAI's
# {"id", "type": "function", "function": {...}} wrapping is accepted for calls and for tools.
#
# Declared functions go at the end of the first system turn, in this documented rendering:
#   <|system_start|>{content}\n\n{FUNCTIONS_PREAMBLE}{schema 1}\n{schema 2}...<|system_end|>
# one json.dumps(ensure_ascii=False) line per function (the `function` object of an OpenAI tool, or
# the object itself when unwrapped); no "\n\n" when the content is empty, and a system turn of its own
# when the conversation has none. Tools come from the `tools` argument (OpenAI / transformers style)
# or the first system message's "tools" field (how SFT data carries them), not both.

FUNCTIONS_PREAMBLE = (
    "You can call the functions below. To call one, write {\"name\": \"<function name>\", \"arguments\": "
    "<JSON object>} between the function-call tokens; its result comes back as a tool message.\n"
    "Functions, one JSON schema per line:\n"
)

CHAT_TEMPLATE = (
    "{% macro functions(fns) %}{{ " + json.dumps(FUNCTIONS_PREAMBLE) + " }}"
    "{% for t in fns %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ (t['function'] if t['function'] is defined else t) | tojson }}{% endfor %}{% endmacro %}"
    "{% set fns = tools if tools else (messages[0]['tools'] if messages and messages[0]['role'] == 'system' "
    "and messages[0]['tools'] else none) %}"
    "{{ bos_token }}"
    "{% if fns and (messages | length == 0 or messages[0]['role'] != 'system') %}"
    "<|system_start|>{{ functions(fns) }}<|system_end|>{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system_start|>{{ m['content'] or '' }}"
    "{% if loop.first and fns %}{% if m['content'] %}{{ '\\n\\n' }}{% endif %}{{ functions(fns) }}{% endif %}"
    "<|system_end|>"
    "{% elif m['role'] == 'user' %}<|user_start|>{{ m['content'] }}<|user_end|>"
    "{% elif m['role'] == 'tool' %}<|output_start|>{{ m['content'] }}<|output_end|>"
    "{% elif m['role'] == 'assistant' %}"
    "{% if loop.first or loop.previtem['role'] != 'tool' %}<|assistant_start|>{% endif %}"
    "{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}{% set f = c['function'] if c['function'] is defined else c %}"
    "{% if f['name'] in ['python', 'search'] %}<|{{ f['name'] }}_start|>{{ f['arguments'] }}<|{{ f['name'] }}_end|>"
    "{% else %}<|function_start|>{\"name\": {{ f['name'] | tojson }}, \"arguments\": "
    "{% if f['arguments'] is string %}{{ f['arguments'] }}{% else %}{{ f['arguments'] | tojson }}{% endif %}"
    "}<|function_end|>{% endif %}{% endfor %}"
    "{% if not m.get('tool_calls') %}<|assistant_end|>{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and (messages | length == 0 or messages[-1]['role'] != 'tool') %}<|assistant_start|>{% endif %}"
)


def render_functions(functions: list[dict]) -> str:
    """The text that declares functions in the system turn: the preamble, then one JSON line each.

    >>> render_functions([{"name": "f", "parameters": {}}]).splitlines()[-1]
    '{"name": "f", "parameters": {}}'
    """
    return FUNCTIONS_PREAMBLE + "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)


def function_call_text(name: str, arguments: Any) -> str:
    """The JSON written between <|function_start|> and <|function_end|> for one call.

    >>> function_call_text("get_weather", {"city": "Paris"})
    '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    >>> function_call_text("get_weather", '{"city":"Paris"}')  # a JSON string is kept as written
    '{"name": "get_weather", "arguments": {"city":"Paris"}}'
    """
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ChatforgeError(f"call to function {name!r}: its arguments are not valid JSON ({e}): "
                                 f"{arguments[:80]!r}; write them as a JSON object") from None
        if not isinstance(parsed, dict):
            raise ChatforgeError(f"call to function {name!r}: arguments must be a JSON object, got {arguments[:80]!r}")
        text = arguments
    elif isinstance(arguments, dict):
        text = json.dumps(arguments, ensure_ascii=False)
    else:
        raise ChatforgeError(f"call to function {name!r}: arguments must be a JSON object or its text, "
                             f"got {type(arguments).__name__}")
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ' + text + "}"


def parse_function_call(text: str) -> dict:
    """{"name", "arguments"} of the JSON between the function pair; ChatforgeError when it is not a
    call (the server turns that into an error for the client, SFT data sources count and skip it).

    >>> parse_function_call('{"name": "f", "arguments": {"x": 1}}')
    {'name': 'f', 'arguments': {'x': 1}}
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatforgeError(f"function call is not valid JSON ({e}): {text[:80]!r}") from None
    if (not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]
            or not isinstance(obj.get("arguments", {}), dict)):
        raise ChatforgeError(f'function call must be {{"name": str, "arguments": object}}, got {text[:80]!r}')
    return {"name": obj["name"], "arguments": obj.get("arguments", {})}


def _declared_functions(messages: list[dict], tools: list | None) -> list[dict]:
    """The function schemas of a conversation (unwrapped from OpenAI's {"type", "function"})."""
    first = messages[0] if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else None
    in_message = first.get("tools") if first is not None else None
    if tools and in_message:
        raise ChatforgeError("functions are given both as `tools` and in the system message's 'tools'; give them once")
    raw = tools or in_message or []
    if not isinstance(raw, list):
        raise ChatforgeError(f"tools must be a list of function schemas, got {type(raw).__name__}")
    out, seen = [], set()
    for j, t in enumerate(raw):
        f = t["function"] if isinstance(t, dict) and isinstance(t.get("function"), dict) else t
        name = f.get("name") if isinstance(f, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ChatforgeError(f"tool {j}: a function schema needs a non-empty 'name', got {str(t)[:80]}")
        if name in TOOL_TOKENS:
            raise ChatforgeError(f"tool {j}: the function name {name!r} is a built-in tool's; rename the function")
        if name in seen:
            raise ChatforgeError(f"tool {j}: function {name!r} is declared twice")
        seen.add(name)
        out.append(f)
    return out


def _function_ids(tok: Tokenizer, why: str) -> tuple[int, int]:
    start, end = FUNCTION_TOKENS
    if start not in tok.special_tokens or end not in tok.special_tokens:
        raise ChatforgeError(f"{why}, but tokenizer '{tok.name}' predates user-defined functions (it has no "
                             f"{start} token): retrain it with `chatforge tokenizer --force`, or leave the "
                             f"functions out of this conversation")
    return tok.special_tokens[start], tok.special_tokens[end]


def _tool_calls(message: dict, i: int, functions: set[str]) -> list[tuple[str, str]]:
    """[(pair, text)] of an assistant message's calls: pair is "python", "search" or "function"."""
    calls = []
    for c in message.get("tool_calls") or []:
        fn = c.get("function", c) if isinstance(c, dict) else None  # accept OpenAI's {"function": {...}}
        if not isinstance(fn, dict):
            raise ChatforgeError(f"message {i}: a tool call must be a dict with 'name' and 'arguments'")
        name, args = fn.get("name"), fn.get("arguments", "")
        if name in TOOL_TOKENS:
            calls.append((name, args if isinstance(args, str) else json.dumps(args)))
        elif name in functions:
            calls.append(("function", function_call_text(name, args)))
        else:
            declared = ", ".join(sorted(functions)) or "none"
            raise ChatforgeError(f"message {i}: unknown tool {name!r}: not a built-in tool "
                                 f"({', '.join(TOOL_TOKENS)}) nor a declared function ({declared})")
    return calls


def _render(tok: Tokenizer, messages: list[dict], tools: list | None = None) -> tuple[list[int], list[int], bool]:
    """(ids, mask, mid_turn): mid_turn is True when the last message leaves an assistant turn open."""
    functions = _declared_functions(messages, tools)
    names = {f["name"] for f in functions}
    fn_ids = _function_ids(tok, "the conversation declares functions") if functions else None
    ids, mask = [tok.bos_id], [0]

    def add(new: list[int], m: int) -> None:
        ids.extend(new)
        mask.extend([m] * len(new))

    if functions and not (messages and messages[0].get("role") == "system"):
        add([tok.special("<|system_start|>"), *tok.encode(render_functions(functions)),
             tok.special("<|system_end|>")], 0)
    mid_turn = False
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatforgeError(f"message {i}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content") or ""
        if not isinstance(content, str):
            raise ChatforgeError(f"message {i}: content must be a string, got {type(content).__name__}")
        if msg.get("tools") and i > 0:
            raise ChatforgeError(f"message {i}: 'tools' belong to the first message, a system message")
        if role in ("system", "user"):
            if mid_turn:
                raise ChatforgeError(f"message {i}: a {role} message cannot follow an unanswered tool call")
            if role == "system" and i == 0 and functions:
                content = (content + "\n\n" if content else "") + render_functions(functions)
            add([tok.special(f"<|{role}_start|>")], 0)
            add(tok.encode(content), 0)
            add([tok.special(f"<|{role}_end|>")], 0)
        elif role == "assistant":
            if not mid_turn:
                add([tok.special("<|assistant_start|>")], 0)
            add(tok.encode(content), 1)
            calls = _tool_calls(msg, i, names)
            for pair, args in calls:
                start, end = fn_ids if pair == "function" else (tok.special(s) for s in TOOL_TOKENS[pair])
                add([start], 1)
                add(tok.encode(args), 1)
                add([end], 1)
            mid_turn = bool(calls)
            if not calls:
                add([tok.special("<|assistant_end|>")], 1)
        elif role == "tool":
            if not mid_turn:
                raise ChatforgeError(f"message {i}: a tool result must follow an assistant tool call")
            add([tok.special("<|output_start|>")], 0)
            add(tok.encode(content), 0)
            add([tok.special("<|output_end|>")], 0)
        else:
            raise ChatforgeError(f"message {i}: unknown role {role!r} (system, user, assistant, tool)")
    return ids, mask, mid_turn


def render_conversation(tok: Tokenizer, messages: list[dict], max_tokens: int | None = None,
                        tools: list | None = None):
    """Conversation -> (ids, loss_mask). The mask is 1 exactly on what the assistant produces: its
    text, its tool-call tokens and its <|assistant_end|>; 0 on <|bos|>, system, user, the
    <|assistant_start|> that primes a reply, and tool outputs (inserted by the engine or the caller,
    not sampled). `tools` declares user-defined functions (OpenAI style; see above). `max_tokens`
    truncates both."""
    ids, mask, _ = _render(tok, messages, tools)
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_prompt(tok: Tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    """Ids that end exactly where the assistant should write next: after <|assistant_start|>, or
    after a tool output when the assistant's turn is still open."""
    ids, _, mid_turn = _render(tok, messages, tools)
    if not mid_turn:
        ids.append(tok.special("<|assistant_start|>"))
    return ids


def _parse_system(text: str) -> dict:
    """A system message, with the functions rendered into it (if any) back as 'tools'."""
    at = text.find(FUNCTIONS_PREAMBLE)
    if at >= 0:
        try:
            tools = [json.loads(line) for line in text[at + len(FUNCTIONS_PREAMBLE):].split("\n")]
        except json.JSONDecodeError:
            tools = []  # not our rendering: keep the text as it is
        if tools and all(isinstance(t, dict) for t in tools):
            content = text[:at]
            if content:
                content = content[:-2] if content.endswith("\n\n") else content
            return {"role": "system", "content": content, "tools": tools}
    return {"role": "system", "content": text}


def parse_conversation(tok: Tokenizer, ids: list[int]) -> list[dict]:
    """Token ids -> messages, the inverse of render_conversation (a trailing unfinished assistant
    turn is returned as it stands). Declared functions come back as the system message's 'tools'; a
    function call whose JSON does not parse comes back as {"name": "", "arguments": <its text>,
    "error": <why>}."""
    sp = tok.special_tokens
    start_role = {sp[f"<|{r}_start|>"]: r for r in ("system", "user", "assistant")}
    end_role = {sp[f"<|{r}_end|>"]: r for r in ("system", "user", "assistant")}
    pair_start = {sp[s]: name for name, (s, _) in TOOL_TOKENS.items() if s in sp}
    pair_end = {sp[e]: name for name, (_, e) in TOOL_TOKENS.items() if e in sp}
    if all(s in sp for s in FUNCTION_TOKENS):  # an older tokenizer has no function pair
        pair_start[sp[FUNCTION_TOKENS[0]]] = pair_end[sp[FUNCTION_TOKENS[1]]] = "function"
    out_start, out_end = sp["<|output_start|>"], sp["<|output_end|>"]

    messages: list[dict] = []
    role: str | None = None  # open section: system/user/assistant/tool/python/search/function
    buf: list[int] = []
    current: dict | None = None  # the assistant message being built
    pending: list[str] = []  # names of the calls still waiting for their tool message

    def text() -> str:
        s = tok.decode(buf)
        buf.clear()
        return s

    for t in ids:
        if t == tok.bos_id:
            continue
        if t in start_role:
            role = start_role[t]
            if role == "assistant":
                current = {"role": "assistant", "content": ""}
        elif t in end_role and role == end_role[t]:
            if role == "assistant":
                current["content"] += text()
                messages.append(current)
                current = None
            elif role == "system":
                messages.append(_parse_system(text()))
            else:
                messages.append({"role": role, "content": text()})
            role = None
        elif t in pair_start and role == "assistant":
            current["content"] += text()
            role = pair_start[t]
        elif t in pair_end and role == pair_end[t]:
            body = text()
            if role == "function":
                try:
                    call = parse_function_call(body)
                except ChatforgeError as e:
                    call = {"name": "", "arguments": body, "error": str(e)}
            else:
                call = {"name": role, "arguments": body}
            current.setdefault("tool_calls", []).append(call)
            role = "assistant"
        elif t == out_start:
            if current is not None:
                current["content"] += text()
                if current["content"] or current.get("tool_calls"):  # not the empty turn between two results
                    messages.append(current)
                    pending = [c["name"] for c in current.get("tool_calls", [])]
            current, role = None, "tool"
        elif t == out_end and role == "tool":
            messages.append({"role": "tool", "name": pending.pop(0) if pending else "python", "content": text()})
            current, role = {"role": "assistant", "content": ""}, "assistant"
        else:
            buf.append(t)
    if current is not None and role is not None:
        current["content"] += text()
        if current["content"] or current.get("tool_calls"):
            messages.append(current)
    return messages
