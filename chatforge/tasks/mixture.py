"""The SFT data mixture: sources with weights, rendered into token rows with an assistant-only loss mask.

    sources = [Source("oasst", lambda: oasst_conversations(stats=st), weight=1.0, stats=st), ...]
    items, counts = build_mixture(sources, seed)             # [(source name, messages)], per-source counts
    rows = render_mixture(tok, items, max_tokens=T + 1, counts=counts)
    loader = ConversationLoader(rows, batch_size=B, seq_len=T, rank=r, world_size=W, grad_accum=G, seed=s)
    x, y = loader.next_batch()                               # (B, T') inputs and targets, -1 = no loss

A weight is how many times each conversation of the source is used: 1 once, 3 three times, 0.5 a
seeded half. Every source reports what it read, skipped (by reason), held out, and what the mixture
used, truncated or dropped, in tokens and trained tokens: the stage writes these to its metrics.

Rows: one conversation per row, right-padded ("pad", the default). chatforge's GPT.forward has no
attention mask for training (its masks serve the engine's left-padded generation), so packing several
conversations into one causal row would let a conversation attend to the ones before it. Padding is
the exact alternative: a padded row computes what the conversation would compute alone, because the
padding comes after it and causal attention never looks ahead; padded targets are -1 (no loss). To
waste less compute, "longest" pads a micro-batch only to its longest row (the same length on every
rank). "pack" (several whole conversations per row, with their document ids and
`document_causal_mask` for block-diagonal attention) is here for a model forward that accepts that
mask; with GPT.forward as it is, use "pad".

Experience replay (`ReplayLoader`): a fixed number of rows of every micro-batch are pretraining
windows (all tokens trained), the rest SFT rows, to measure and limit forgetting.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from chatforge.common import ChatforgeError
from chatforge.tasks.conversations import SourceStats, check_conversation


@dataclass
class Source:
    name: str
    conversations: Callable[[], Iterable[list[dict]]] | Sequence[list[dict]]  # a generator factory or a list
    weight: float = 1.0  # uses of each conversation: 2 = twice, 0.5 = a seeded half, 0 = off
    stats: SourceStats | None = None  # the generator's own counts (records read, skipped), if it keeps them


def build_mixture(sources: Sequence[Source], seed: int = 0) -> tuple[list[tuple[str, list[dict]]], dict]:
    """All sources' conversations, each repeated by its weight, shuffled: ([(source, messages)], counts)."""
    rng = random.Random(f"mixture|{seed}")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ChatforgeError(f"mixture: source names must be unique, got {names}")
    items: list[tuple[str, list[dict]]] = []
    counts: dict[str, dict] = {}
    for s in sources:
        if not s.weight >= 0:
            raise ChatforgeError(f"mixture source '{s.name}': weight {s.weight} must be >= 0")
        convs = list(s.conversations() if callable(s.conversations) else s.conversations)
        whole, frac = int(s.weight), s.weight - int(s.weight)
        chosen = convs * whole + rng.sample(convs, round(frac * len(convs)))
        items += [(s.name, c) for c in chosen]
        counts[s.name] = {"weight": s.weight, "available": len(convs), "used": len(chosen),
                          **({"source": s.stats.as_dict()} if s.stats is not None else {}),
                          "skipped": Counter(), "tokens": 0, "trained_tokens": 0}
    rng.shuffle(items)
    return items, counts


@dataclass
class Rendered:
    ids: np.ndarray  # (L,) int32 token ids, <|bos|> first
    mask: np.ndarray  # (L,) uint8, 1 where the token is trained on (what the assistant writes)
    source: str


def render_mixture(tok, items: Iterable[tuple[str, list[dict]]], max_tokens: int, overflow: str = "truncate",
                   counts: dict | None = None) -> list[Rendered]:
    """Render each (source, messages) with tok.render_conversation. A conversation longer than
    max_tokens (the row length, seq_len + 1) is cut to it ("truncate", counted as too_long_truncated) or
    left out ("drop", counted as too_long_dropped); one with nothing left to train after the cut is
    dropped too. An invalid conversation (check_conversation) or one the tokenizer rejects is counted by
    reason and skipped."""
    if overflow not in ("truncate", "drop"):
        raise ChatforgeError(f"overflow {overflow!r}: use 'truncate' or 'drop'")
    counts = counts if counts is not None else {}
    out = []
    for name, conv in items:
        c = counts.setdefault(name, {"skipped": Counter(), "tokens": 0, "trained_tokens": 0})
        reason = check_conversation(conv)
        if reason is not None:
            c["skipped"][reason] += 1
            continue
        try:
            ids, mask = tok.render_conversation(conv)
        except ChatforgeError:
            c["skipped"]["render_error"] += 1
            continue
        if len(ids) > max_tokens:
            if overflow == "drop" or not any(mask[1:max_tokens]):
                c["skipped"]["too_long_dropped"] += 1
                continue
            ids, mask = ids[:max_tokens], mask[:max_tokens]
            c["skipped"]["too_long_truncated"] += 1
        c["tokens"] += len(ids)
        c["trained_tokens"] += int(sum(mask[1:]))
        out.append(Rendered(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8), name))
    return out


def mixture_metrics(counts: dict) -> dict:
    """counts as plain JSON-ready dicts (Counters become dicts), for metrics.jsonl."""
    return {name: {k: dict(v) if isinstance(v, Counter) else v for k, v in c.items()} for name, c in counts.items()}


# ----------------------------------------------------------------------------------------------
# Rows and batches


def pad_rows(rows: Sequence[Rendered], length: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One conversation per row, right-padded to length + 1 tokens, shifted: inputs (B, length) and
    targets (B, length) with -1 wherever the next token is not trained on (prompt, tool output, padding).

    >>> r = Rendered(np.array([9, 5, 6, 7]), np.array([0, 0, 1, 1], dtype=np.uint8), "s")
    >>> x, y = pad_rows([r], 4)
    >>> x.tolist(), y.tolist()
    ([[9, 5, 6, 7]], [[-1, 6, 7, -1]])
    """
    B = len(rows)
    ids = torch.full((B, length + 1), pad_id, dtype=torch.long)  # (B, L+1)
    tgt_mask = torch.zeros((B, length + 1), dtype=torch.bool)  # (B, L+1): token is a trained target
    for b, r in enumerate(rows):
        n = min(len(r.ids), length + 1)
        ids[b, :n] = torch.from_numpy(r.ids[:n].astype(np.int64))
        tgt_mask[b, :n] = torch.from_numpy(r.mask[:n].astype(bool))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[~tgt_mask[:, 1:]] = -1
    return x, y


def pack_rows(rows: Sequence[Rendered], length: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole conversations placed one after another into rows of length + 1 tokens (a new row when the
    next one does not fit), in the given order: (inputs, targets, doc_ids), each (R, length). doc_ids
    numbers the conversations of a row 0, 1, ... and marks padding -1; use document_causal_mask(doc_ids)
    so no conversation attends to another. A conversation's first target (its <|bos|>) is never trained,
    so nothing learns to predict across a boundary.

    >>> a = Rendered(np.array([9, 5, 6]), np.array([0, 1, 1], dtype=np.uint8), "s")
    >>> x, y, d = pack_rows([a, a], 6)
    >>> x.tolist(), y.tolist(), d.tolist()
    ([[9, 5, 6, 9, 5, 6]], [[5, 6, -1, 5, 6, -1]], [[0, 0, 0, 1, 1, 1]])
    """
    groups: list[list[Rendered]] = []
    used = length + 2  # forces a first row
    for r in rows:
        if len(r.ids) > length + 1:
            raise ChatforgeError(f"a conversation of {len(r.ids)} tokens does not fit a row of {length + 1}; "
                                 f"render with max_tokens={length + 1}")
        if used + len(r.ids) > length + 1:
            groups.append([])
            used = 0
        groups[-1].append(r)
        used += len(r.ids)
    R = len(groups)
    ids = torch.full((R, length + 1), pad_id, dtype=torch.long)  # (R, L+1)
    tgt = torch.zeros((R, length + 1), dtype=torch.bool)  # (R, L+1)
    doc = torch.full((R, length + 1), -1, dtype=torch.long)  # (R, L+1)
    for i, g in enumerate(groups):
        at = 0
        for j, r in enumerate(g):
            n = len(r.ids)
            ids[i, at:at + n] = torch.from_numpy(r.ids.astype(np.int64))
            tgt[i, at:at + n] = torch.from_numpy(r.mask.astype(bool))
            tgt[i, at] = False  # the conversation's <|bos|> is not predicted from the previous one
            doc[i, at:at + n] = j
            at += n
    y = ids[:, 1:].clone()
    y[~tgt[:, 1:]] = -1
    return ids[:, :-1], y, doc[:, :-1]


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal attention for packed rows: doc_ids (B, T) -> bool (B, 1, T, T), True where
    query i may attend key j (j <= i and the same document). Padding (-1) attends only to padding.

    >>> document_causal_mask(torch.tensor([[0, 0, 1]]))[0, 0].int().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)


class ConversationLoader:
    """Shuffled batches of rendered conversations, sharded across ranks, resumable: the SFT counterpart
    of chatforge.dataloader.PackedLoader, with the same constructor, next_batch and state_dict.

    Each epoch visits the conversations in a fresh seeded order. A micro-batch is `batch_size` rows per
    rank out of batch_size * world_size global rows (rank r takes its slice), so 1 process with
    accumulation and W processes see the same rows; epochs end on optimizer-step boundaries. packing:
    "pad" (one conversation per row) returns (x, y); "pack" returns (x, y, doc_ids). pad_to: "longest"
    (the longest row of the global micro-batch) or "max" (always seq_len: static shapes for compile).
    group_by_length (with "pad"): micro-batches of conversations of similar length, as the transformers
    Trainer's group_by_length does: the shuffled order is cut into windows of 32 micro-batches, each
    window sorted by length and cut into micro-batches, whose order is shuffled again. Padding then
    costs little: on the tiny SFT mixture (short tool chats beside 500-token OASST threads) it cut the
    padded tokens per epoch from 2.40x the real ones to 1.03x (111 steps of 8 rows).

    >>> rows = [Rendered(np.array([9, 1, 2, 3]), np.array([0, 0, 1, 1], dtype=np.uint8), "s")] * 4
    >>> x, y = ConversationLoader(rows, batch_size=2, seq_len=8).next_batch()
    >>> tuple(x.shape), y[0].tolist()
    ((2, 3), [-1, 2, 3])
    """

    def __init__(self, rows: Sequence[Rendered], batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1, seed: int = 0, shuffle: bool = True,
                 device="cpu", pad_id: int = 0, packing: str = "pad", pad_to: str = "longest",
                 group_by_length: bool = False):
        if packing not in ("pad", "pack") or pad_to not in ("longest", "max"):
            raise ChatforgeError(f"packing {packing!r} / pad_to {pad_to!r}: use pad|pack and longest|max")
        self.rows, self.B, self.T = list(rows), batch_size, seq_len
        self.rank, self.world, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.device, self.pad_id, self.packing, self.pad_to = torch.device(device), pad_id, packing, pad_to
        self.group_by_length = group_by_length and packing == "pad"
        self.rows_per_micro = batch_size * world_size
        self.rows_per_step = self.rows_per_micro * grad_accum
        if len(self.rows) < self.rows_per_step:
            raise ChatforgeError(f"{len(self.rows)} conversations: fewer than one optimizer step of "
                                 f"{self.rows_per_step} rows; add data or lower the batch size")
        self.epoch, self.position = 0, 0
        self._epoch_rows: tuple[int, list] | None = None

    def _epoch(self) -> list:
        """This epoch's rows: conversation indices ("pad") or packed row tuples ("pack")."""
        if self._epoch_rows is None or self._epoch_rows[0] != self.epoch:
            n = len(self.rows)
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            if self.packing == "pad":
                rows = self._grouped(order.tolist(), rng) if self.group_by_length else order.tolist()
            else:
                x, y, d = pack_rows([self.rows[i] for i in order], self.T, self.pad_id)
                rows = list(zip(x, y, d))
            self._epoch_rows = (self.epoch, rows)
        return self._epoch_rows[1]

    def _grouped(self, order: list[int], rng) -> list[int]:
        m = self.rows_per_micro
        window = 32 * m
        out, tail = [], []
        for s in range(0, len(order), window):
            chunk = sorted(order[s:s + window], key=lambda i: len(self.rows[i].ids))
            batches = [chunk[i:i + m] for i in range(0, len(chunk), m)]
            if len(batches[-1]) < m:  # a short last micro-batch goes last, so every boundary stays on m
                tail = batches.pop()
            for b in rng.permutation(len(batches)):
                out += batches[b]
        return out + tail

    def __len__(self) -> int:
        """Optimizer steps in the current epoch."""
        return len(self._epoch()) // self.rows_per_step

    def next_batch(self):
        rows = self._epoch()
        if self.position % self.rows_per_step == 0 and self.position + self.rows_per_step > len(rows):
            self.epoch, self.position = self.epoch + 1, 0  # drop the ragged tail of the epoch
            rows = self._epoch()
            if len(rows) < self.rows_per_step:
                raise ChatforgeError(f"epoch {self.epoch} packs into {len(rows)} rows: fewer than one optimizer step")
        glob = rows[self.position:self.position + self.rows_per_micro]
        mine = glob[self.rank * self.B:(self.rank + 1) * self.B]
        self.position += self.rows_per_micro
        if self.packing == "pack":
            x, y, d = (torch.stack(t) for t in zip(*mine))
            out = (x, y, d)
        else:
            longest = max(len(self.rows[i].ids) for i in glob) - 1
            length = self.T if self.pad_to == "max" else min(self.T, max(1, longest))
            out = pad_rows([self.rows[i] for i in mine], length, self.pad_id)
        return tuple(t.to(self.device) for t in out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rows_per_step": self.rows_per_step, "seq_len": self.T, "conversations": len(self.rows),
                "group_by_length": self.group_by_length}

    def load_state_dict(self, state: dict) -> None:
        for key, mine, what in (("seq_len", self.T, "--max_seq_len"), ("rows_per_step", self.rows_per_step, "the batch size"),
                                ("conversations", len(self.rows), "the data mixture"),
                                ("group_by_length", self.group_by_length, "group_by_length")):
            if state.get(key, mine) != mine:
                raise ChatforgeError(f"the checkpoint's data position is for {key} {state[key]}, this run has {mine}; "
                                     f"keep {what} unchanged to resume")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))


def iter_conversation_batches(rows: Sequence[Rendered], batch_size: int, seq_len: int, rank: int = 0,
                              world_size: int = 1, pad_id: int = 0, device="cpu"):
    """Validation batches (x, y) over rows in order, this rank's share (row i goes to rank i % world_size).
    Sum the loss (loss_reduction="sum") and divide by the count of targets != -1 for a per-token loss."""
    mine = list(rows)[rank::world_size]
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        length = min(seq_len, max(len(r.ids) for r in chunk) - 1)
        x, y = pad_rows(chunk, max(1, length), pad_id)
        yield x.to(device), y.to(device)


class ReplayLoader:
    """Experience replay: every micro-batch is `sft_loader`'s rows plus `pretrain_loader`'s rows (all of
    their tokens trained), so a fixed share of each step is pretraining text (replay rows / all rows).
    Give the pretraining loader batch_size = round(fraction * total rows) and the SFT loader the rest;
    both advance and resume together. Shorter rows are right-padded (targets -1) to the longest."""

    def __init__(self, sft_loader, pretrain_loader, pad_id: int = 0):
        self.sft, self.pre, self.pad_id = sft_loader, pretrain_loader, pad_id

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        xa, ya = self.sft.next_batch()[:2]
        xb, yb = self.pre.next_batch()
        T = max(xa.size(1), xb.size(1))

        def pad(x, y):
            if x.size(1) == T:
                return x, y
            extra = T - x.size(1)
            return (torch.nn.functional.pad(x, (0, extra), value=self.pad_id),
                    torch.nn.functional.pad(y, (0, extra), value=-1))

        (xa, ya), (xb, yb) = pad(xa, ya), pad(xb, yb)
        return torch.cat([xa, xb]), torch.cat([ya, yb])

    def state_dict(self) -> dict:
        return {"sft": self.sft.state_dict(), "pretrain": self.pre.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sft.load_state_dict(state["sft"])
        self.pre.load_state_dict(state["pretrain"])
