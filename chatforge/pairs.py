"""Preference pairs as token ids and batches: what the reward model and DPO both train on.

A pair (chatforge/tasks/preferences.py) becomes the prompt's ids (`render_prompt`: up to and including
<|assistant_start|>) and each reply's ids up to and including its <|assistant_end|>, exactly the tokens
`render_conversation` gives for the whole conversation, so the reward model and the policy read the same
tokens the chat protocol produces. A batch of B pairs holds 2B rows, the B chosen then the B rejected:

    ids            (2B, L) long   prompt + reply, right-padded with <|bos|>
    lengths        (2B,)   long   real tokens per row; the reward model reads position lengths - 1
                                  (the reply's <|assistant_end|>)
    input_ids      (2B, L-1)      ids[:, :-1]   (DPO: log-probs of the reply tokens)
    labels         (2B, L-1)      ids[:, 1:]
    response_mask  (2B, L-1) bool labels[t] is a token of the reply
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

from chatforge.tokenizer import fit_conversation, render_conversation


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    id: str = ""
    source: str = ""


def encode_pair(tok, pair, max_len: int) -> tuple[EncodedPair | None, str]:
    """(EncodedPair, "") or (None, reason). A prompt too long for max_len together with the longer reply
    loses its oldest exchanges first (fit_conversation); a pair that still does not fit is "too_long"."""
    replies = []
    for reply in (pair.chosen, pair.rejected):
        ids, _ = render_conversation(tok, pair.prompt + [{"role": "assistant", "content": reply}])
        replies.append(ids)
    prompt_full = tok.render_prompt(pair.prompt)
    if any(r[:len(prompt_full)] != prompt_full for r in replies):  # the protocol renders turns independently
        return None, "render_mismatch"
    chosen, rejected = (r[len(prompt_full):] for r in replies)
    prompt, _ = fit_conversation(tok, pair.prompt, max_len - max(len(chosen), len(rejected)))
    if len(prompt) + max(len(chosen), len(rejected)) > max_len:
        return None, "too_long"
    return EncodedPair(prompt, chosen, rejected, pair.id, pair.source), ""


def encode_pairs(tok, pairs, max_len: int, skipped: Counter | None = None) -> list[EncodedPair]:
    """encode_pair over a list; the reasons of the pairs left out are counted in `skipped`."""
    out = []
    for p in pairs:
        e, reason = encode_pair(tok, p, max_len)
        if e is None:
            if skipped is not None:
                skipped[reason] += 1
            continue
        out.append(e)
    return out


def collate(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """2B rows (chosen first, then rejected) padded to the longest; see the module docstring."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    L = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # (2B, L)
    reply = torch.zeros((len(rows), L), dtype=torch.bool)  # (2B, L)
    lengths = torch.tensor([len(a) + len(b) for a, b in rows])  # (2B,)
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a) + len(b)] = torch.tensor(a + b)
        reply[i, len(a):len(a) + len(b)] = True
    return {"ids": ids, "lengths": lengths, "input_ids": ids[:, :-1], "labels": ids[:, 1:],
            "response_mask": reply[:, 1:]}


def batches(pairs: list[EncodedPair], batch_size: int, pad_id: int):
    """Collated batches over `pairs` in order (evaluation)."""
    for i in range(0, len(pairs), batch_size):
        yield collate(pairs[i:i + batch_size], pad_id)


class PairSource:
    """A train_loop batch source: `batch_size` pairs per micro-batch, in a seeded order reshuffled each
    pass. Its state is the number of pairs drawn, so a resumed run continues with the same pairs."""

    def __init__(self, pairs: list[EncodedPair], batch_size: int, pad_id: int, seed: int = 0, device=None):
        if not pairs:
            raise ValueError("no preference pairs to train on")
        self.pairs, self.batch_size, self.pad_id, self.seed, self.device = pairs, batch_size, pad_id, seed, device
        self.cursor = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        chosen = []
        for _ in range(self.batch_size):
            pass_, i = divmod(self.cursor, len(self.pairs))
            order = list(range(len(self.pairs)))
            random.Random(f"{self.seed}|{pass_}").shuffle(order)
            chosen.append(self.pairs[order[i]])
            self.cursor += 1
        return {k: v.to(self.device) if self.device is not None else v
                for k, v in collate(chosen, self.pad_id).items()}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, d: dict) -> None:
        self.cursor = int(d["cursor"])


def load_encoded(tok, names: list[str], split: str, max_len: int, *, limit: int = 0, data_dir: str = "",
                 val_fraction: float = 0.1, judge_fraction: float = 0.0, seed: int = 0,
                 controlled_n: int = 1000) -> tuple[dict[str, list[EncodedPair]], dict[str, dict]]:
    """({source: encoded pairs of `split`}, {source: counts}) for several sources of
    chatforge/tasks/preferences.py; the counts hold the records read, the pairs given and every pair left
    out by reason (bad records, other splits, too long for max_len)."""
    from chatforge.tasks.conversations import SourceStats
    from chatforge.tasks.preferences import load_pairs

    out, counts = {}, {}
    for name in names:
        stats = SourceStats(name)
        pairs = load_pairs(name, split, data_dir, limit=limit, val_fraction=val_fraction,
                           judge_fraction=judge_fraction, seed=seed, controlled_n=controlled_n, stats=stats)
        out[name] = encode_pairs(tok, pairs, max_len, stats.skipped)
        counts[name] = dict(stats.as_dict(), pairs=len(out[name]))
        counts[name].pop("conversations")
    return out, counts
