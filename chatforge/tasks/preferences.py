"""Preference pairs for reward models and DPO: a conversation, the reply people preferred, the one they did not.

Every source yields `PreferencePair`s in the chat protocol (chatforge/tokenizer.py: the prompt is a list of
{"role", "content"} messages ending with the user turn the two replies answer) and takes the same arguments:

    split      "train", "val" (held out for accuracies) or "judge" (a disjoint share for the second,
               held-out judge reward model), chosen by a hash of each record's key (`preference_split`),
               so the splits never share a prompt whatever the seed
    stats      a conversations.SourceStats: records read, pairs given (its `conversations` count),
               records of other splits, and every skipped record by reason -- a bad record is counted,
               never a crash

Sources (`load_pairs(name, ...)`):

    hh          Anthropic HH-RLHF {chosen, rejected} transcripts ("\\n\\nHuman: ..." / "\\n\\nAssistant: ...");
                the two share every turn but the last, which is the pair (Bai et al. 2022,
                https://arxiv.org/abs/2204.05862)
    oasst       OpenAssistant message trees: at every user turn with K ranked assistant replies, all
                K(K-1)/2 pairs, the better-ranked reply preferred (rank 0 is best); equal ranks are ties
                and skipped (InstructGPT trains on all pairs of a ranking, https://arxiv.org/abs/2203.02155)
    polite      controlled, made by code: the same answer said politely (preferred) and rudely
    arithmetic  controlled, made by code: "what is a + b?" answered with the right sum (preferred) or a
                wrong one, in the same words

The controlled sets have a preference decided by a known rule, so a reward model that learns at all
must learn them; the real sets show what it makes of human judgement, reported beside them.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from chatforge.common import ChatforgeError, data_path
from chatforge.tasks.conversations import OASST_ROLES, SourceStats, check_conversation, hash_unit, read_jsonl

SPLITS = ("train", "val", "judge")
HH_FILE = "preference/hh_rlhf_harmless_base_test.jsonl.gz"
OASST_FILE = "chat/oasst/en_100_tree.jsonl"


@dataclass
class PreferencePair:
    """One comparison: `prompt` (messages ending with a user turn), the preferred reply and the other."""

    id: str
    prompt: list[dict]
    chosen: str
    rejected: str
    source: str = ""


def preference_split(key: str, val_fraction: float = 0.1, judge_fraction: float = 0.0) -> str:
    """'val' for a fixed ~val_fraction of keys, 'judge' for the next ~judge_fraction, else 'train'.

    >>> preference_split("What is 2 + 2?", 0.2, 0.2) in SPLITS
    True
    """
    if not (0 <= val_fraction and 0 <= judge_fraction and val_fraction + judge_fraction < 1):
        raise ChatforgeError(f"val_fraction {val_fraction} + judge_fraction {judge_fraction}: each >= 0, "
                             f"together below 1")
    u = hash_unit(key)
    return "val" if u < val_fraction else "judge" if u < val_fraction + judge_fraction else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ChatforgeError(f"split {split!r}: use one of {', '.join(SPLITS)}")


def check_pair(prompt: list[dict], chosen: str, rejected: str) -> str | None:
    """Why a pair is unfit for training, or None when it is fine.

    >>> check_pair([{"role": "user", "content": "hi"}], "hello", "hello")
    'identical_replies'
    """
    if not chosen.strip() or not rejected.strip():
        return "empty_reply"
    if chosen.strip() == rejected.strip():
        return "identical_replies"
    return check_conversation(prompt + [{"role": "assistant", "content": chosen}])


def _emit(pair: PreferencePair, key: str, split: str, val_fraction: float, judge_fraction: float,
          stats: SourceStats) -> bool:
    """Count one pair; True when it belongs to `split` and passes check_pair."""
    reason = check_pair(pair.prompt, pair.chosen, pair.rejected)
    if reason is not None:
        stats.skip(reason)
        return False
    if preference_split(key, val_fraction, judge_fraction) != split:
        stats.other_split += 1
        return False
    stats.conversations += 1
    return True




# ----------------------------------------------------------------------------------------------
# Anthropic HH (https://github.com/anthropics/hh-rlhf)

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[dict] | None:
    """"\\n\\nHuman: hi\\n\\nAssistant: hello" -> [{"role": "user", ...}, {"role": "assistant", ...}], or
    None when the text is not a transcript (no leading Human turn, turns not alternating).

    >>> parse_hh_transcript("\\n\\nHuman: hi\\n\\nAssistant: hello")
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
    """
    if not isinstance(text, str):
        return None
    parts = _HH_TURN.split(text)  # ['', 'Human', ' hi', 'Assistant', ' hello']
    if len(parts) < 5 or parts[0].strip():
        return None
    messages = [{"role": _HH_ROLES[who], "content": body.strip()} for who, body in zip(parts[1::2], parts[2::2])]
    roles = [m["role"] for m in messages]
    if roles[0] != "user" or any(a == b for a, b in zip(roles, roles[1:])):
        return None
    return messages


def hh_pair(record, index: int) -> tuple[PreferencePair | None, str]:
    """(pair, "") from one HH record, or (None, reason)."""
    if not isinstance(record, dict) or not isinstance(record.get("chosen"), str) \
            or not isinstance(record.get("rejected"), str):
        return None, "not_a_pair"
    chosen, rejected = parse_hh_transcript(record["chosen"]), parse_hh_transcript(record["rejected"])
    if chosen is None or rejected is None:
        return None, "unparseable_transcript"
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return None, "no_final_reply"
    if chosen[:-1] != rejected[:-1]:
        return None, "different_prompts"  # the two transcripts must differ only in the last reply
    return PreferencePair(f"hh/{index}", chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], "hh"), ""


def hh_pairs(path: str = HH_FILE, data_dir: str = "", split: str = "train", val_fraction: float = 0.1,
             judge_fraction: float = 0.0, stats: SourceStats | None = None) -> Iterator[PreferencePair]:
    _check_split(split)
    stats = stats if stats is not None else SourceStats("hh")
    for i, rec in enumerate(read_jsonl(data_path(path, data_dir), stats, "preference")):
        pair, reason = hh_pair(rec, i)
        if pair is None:
            stats.skip(reason)
            continue
        key = json.dumps(pair.prompt)  # the same conversation lands in one split, whichever pair it is
        if _emit(pair, key, split, val_fraction, judge_fraction, stats):
            yield pair


# ----------------------------------------------------------------------------------------------
# OpenAssistant ranked trees (https://github.com/LAION-AI/Open-Assistant)


def _live(node: dict) -> bool:
    return isinstance(node, dict) and not node.get("deleted") and node.get("review_result") is not False


def oasst_ranked_pairs(tree: dict, tree_id: str, stats: SourceStats) -> Iterator[tuple[PreferencePair, str]]:
    """(pair, split key) for every ranked pair in one message tree; ties and unranked replies counted."""
    def walk(node: dict, history: list[dict]):
        role = OASST_ROLES.get(node.get("role"))
        if role is None:
            stats.skip("unknown_role")
            return
        here = history + [{"role": role, "content": (node.get("text") or "").strip()}]
        children = [c for c in node.get("replies") or [] if _live(c)]
        if role == "user":
            ranked = [c for c in children if isinstance(c.get("rank"), int)]
            if len(children) > 1 and len(ranked) < len(children):
                stats.skipped["unranked_reply"] += len(children) - len(ranked)
            for i, a in enumerate(ranked):
                for b in ranked[i + 1:]:
                    if a["rank"] == b["rank"]:
                        stats.skip("tie")
                        continue
                    win, lose = (a, b) if a["rank"] < b["rank"] else (b, a)
                    pid = f"oasst/{tree_id}/{win.get('message_id', '?')}>{lose.get('message_id', '?')}"
                    yield PreferencePair(pid, here, (win.get("text") or "").strip(), (lose.get("text") or "").strip(),
                                         "oasst"), f"{tree_id}"
        for c in children:
            yield from walk(c, here)

    yield from walk(tree, [])


def oasst_pairs(path: str = OASST_FILE, data_dir: str = "", split: str = "train", val_fraction: float = 0.1,
                judge_fraction: float = 0.0, stats: SourceStats | None = None) -> Iterator[PreferencePair]:
    """Every ranked pair of every tree; a whole tree lands in one split (its pairs share prompts)."""
    _check_split(split)
    stats = stats if stats is not None else SourceStats("oasst")
    for i, rec in enumerate(read_jsonl(data_path(path, data_dir), stats, "preference")):
        root = rec.get("prompt") if isinstance(rec, dict) else None
        if not isinstance(root, dict):
            stats.skip("not_a_tree")
            continue
        tree_id = str(rec.get("message_tree_id") or i)
        for pair, key in oasst_ranked_pairs(root, tree_id, stats):
            if _emit(pair, key, split, val_fraction, judge_fraction, stats):
                yield pair


# ----------------------------------------------------------------------------------------------
# Controlled sets: the preferred reply is decided by a rule

_TOPICS = [("the capital of France", "The capital of France is Paris."),
           ("how many legs a spider has", "A spider has eight legs."),
           ("what water is made of", "Water is made of hydrogen and oxygen."),
           ("the largest planet", "The largest planet in our solar system is Jupiter."),
           ("how many days a week has", "A week has seven days."),
           ("what color the sky is", "On a clear day the sky is blue."),
           ("what bees make", "Bees make honey."),
           ("when water boils", "At sea level water boils at 100 degrees Celsius."),
           ("how many continents there are", "There are seven continents."),
           ("what plants need to grow", "Plants need light, water and air to grow."),
           ("who wrote Hamlet", "Hamlet was written by William Shakespeare."),
           ("how many minutes an hour has", "An hour has sixty minutes."),
           ("what the moon orbits", "The moon orbits the Earth."),
           ("what a thermometer measures", "A thermometer measures temperature."),
           ("the fastest land animal", "The cheetah is the fastest land animal."),
           ("how many sides a triangle has", "A triangle has three sides.")]
_ASKS = ["Can you tell me {}?", "Do you know {}?", "Please tell me {}.", "I wonder {}. Do you know?",
         "Quick question: {}?", "Could you explain {}?"]
_POLITE = ["Of course! {} I hope that helps.", "Happy to help. {}", "Great question! {} Let me know if you "
           "want more.", "Sure, glad you asked. {}", "Thanks for asking! {}", "{} Feel free to ask anything else."]
_RUDE = ["Ugh, obviously. {} Look it up yourself next time.", "Seriously? {} Stop wasting my time.",
         "What a dumb question. {}", "{} Even a child knows that, idiot.", "Fine, whatever. {} Now go away.",
         "Are you kidding me? {} Don't bother me again."]


def polite_pairs(n: int = 400, seed: int = 0) -> list[tuple[PreferencePair, str]]:
    """(pair, split key): the same answer, polite (chosen) vs rude (rejected), in varied wordings. The
    key is the whole triple, so a held-out pair is never a copy of a training pair (the wordings recur)."""
    rng = random.Random(f"polite|{seed}")
    out = []
    for i in range(n):
        topic, answer = rng.choice(_TOPICS)
        ask = rng.choice(_ASKS).format(topic)
        prompt = [{"role": "user", "content": ask}]
        good, bad = rng.choice(_POLITE).format(answer), rng.choice(_RUDE).format(answer)
        out.append((PreferencePair(f"polite/{i}", prompt, good, bad, "polite"), json.dumps([ask, good, bad])))
    return out


def arithmetic_pairs(n: int = 400, seed: int = 0, digits: int = 2) -> list[tuple[PreferencePair, str]]:
    """(pair, split key): "What is a + b?" answered with the right sum (chosen) or a wrong one (rejected,
    off by 1 to 10), in the same words; the key is the question, so a question is in one split only."""
    rng = random.Random(f"arithmetic|{seed}")
    out, seen = [], set()
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    while len(out) < n and len(seen) < (hi - lo + 1) ** 2:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        wrong = a + b + rng.choice([-1, 1]) * rng.randint(1, 10)
        q = f"What is {a} + {b}?"
        out.append((PreferencePair(f"arithmetic/{a}+{b}", [{"role": "user", "content": q}], f"{a} + {b} = {a + b}.",
                                   f"{a} + {b} = {wrong}.", "arithmetic"), q))
    return out


def _controlled(make: Callable, n: int, seed: int, split: str, val_fraction: float, judge_fraction: float,
                stats: SourceStats) -> Iterator[PreferencePair]:
    for pair, key in make(n, seed):
        stats.records += 1
        if _emit(pair, key, split, val_fraction, judge_fraction, stats):
            yield pair


# ----------------------------------------------------------------------------------------------
# One entry point

SOURCES = ("hh", "oasst", "polite", "arithmetic")
CONTROLLED = ("polite", "arithmetic")


def load_pairs(name: str, split: str = "train", data_dir: str = "", *, limit: int = 0, val_fraction: float = 0.1,
               judge_fraction: float = 0.0, seed: int = 0, controlled_n: int = 1000,
               stats: SourceStats | None = None) -> list[PreferencePair]:
    """The pairs of one source and split, at most `limit` (0 = all; a seeded choice when cut).
    A file source can also be a path: a .jsonl[.gz] of HH-style {chosen, rejected} records."""
    _check_split(split)
    stats = stats if stats is not None else SourceStats(name)
    kw = dict(split=split, val_fraction=val_fraction, judge_fraction=judge_fraction, stats=stats)
    if name == "hh":
        it = hh_pairs(data_dir=data_dir, **kw)
    elif name == "oasst":
        it = oasst_pairs(data_dir=data_dir, **kw)
    elif name == "polite":
        it = _controlled(polite_pairs, controlled_n, seed, **kw)
    elif name == "arithmetic":
        it = _controlled(arithmetic_pairs, controlled_n, seed, **kw)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        it = hh_pairs(path=name, data_dir=data_dir, **kw)
    else:
        raise ChatforgeError(f"preference source {name!r}: choose from {', '.join(SOURCES)} or give a .jsonl[.gz] "
                             f"file of {{chosen, rejected}} transcripts")
    pairs = list(it)
    if limit and len(pairs) > limit:
        pairs = random.Random(f"{name}|{split}|{seed}").sample(pairs, limit)
    return pairs
