"""RL tasks: prompts with reference answers and verifiers that turn a reply into a reward.

The RL stage asks `get_task(name)` for an `RLTask`, draws `task.items(split)` (split 'train' or
'val', disjoint), renders `item.messages`, samples replies and scores each with `task.reward(reply,
item) -> (reward, reason)`. The verifiers are the evaluation checkers (gsm8k.py, math.py, mc.py,
synthetic.py), so what RL optimises is what evaluation measures.

    gsm8k        GSM8K train.jsonl / test.jsonl (held out); the reply's `#### N` or its last number
    svamp        SVAMP, split by a hash of the problem ID; scored like GSM8K
    math500      MATH-500, split by a hash of unique_id; the last \\boxed{} (fractions, decimals, simple
                 expressions normalised by math.py)
    arithmetic1..arithmetic6   generated a op b with operands of d digits (graded difficulty)
    letter_count, spelling     synthetic.py's word problems (val words never appear in train)
    arc_easy     ARC-Easy in chat form, a letter (split by hash)

Bad input never stops a run (`reward`): an empty reply, a reply with no parseable answer and a
verifier that raises all give reward 0 with a reason; a `RewardStats` counts reasons and logs the first
of each kind. `load_task_file` reads a user's JSONL task file and skips (and counts) records with
missing fields. An optional format reward (DeepSeek-R1's accuracy + format rewards,
https://arxiv.org/abs/2501.12948) adds format_weight when the reply states its answer the way the task
asks (`#### N` / "The answer is", `\\boxed{}`, ...).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from chatforge.common import ChatforgeError
from chatforge.tasks.conversations import split_of
from chatforge.tasks import gsm8k, math as mathtask, mc, synthetic

log = logging.getLogger(__name__)
VAL_FRACTION = 0.2  # held-out share for datasets without their own split (SVAMP, MATH-500, ARC)


@dataclass
class RLItem:
    id: str
    messages: list[dict]  # the chat prompt (user turn)
    answer: str  # the reference answer, as the verifier compares it
    meta: dict = field(default_factory=dict)


@dataclass
class RLTask:
    """A task: how to load its items and how to score a reply.

    extract(reply) -> the parsed answer or None (None: reason "no_answer"); check(reply, answer) ->
    bool; formatted(reply) -> bool, for the optional format reward."""

    name: str
    load: Callable[[str, str, int, int], list[RLItem]]  # (split, data_dir, n, seed) -> items
    extract: Callable[[str], object]
    check: Callable[[str, str], bool]
    formatted: Callable[[str], bool] = lambda reply: False
    format_weight: float = 0.0

    def items(self, split: str = "train", data_dir: str = "", n: int = 0, seed: int = 0) -> list[RLItem]:
        """The items of a split ('train' or 'val'); n > 0 keeps the first n (generated tasks make n)."""
        if split not in ("train", "val"):
            raise ChatforgeError(f"split {split!r}: use 'train' or 'val'")
        items = self.load(split, data_dir, n, seed)
        return items[:n] if n else items

    def reward(self, reply: str, item: RLItem) -> tuple[float, str]:
        """(reward, reason), reason one of "correct" (reward 1), "wrong" (0), "no_answer" (0: nothing
        parseable), "empty" (0) and "verifier_error: <Exception>" (0: a verifier bug must not kill a
        run). With format_weight, a correct, wrong or unparseable reply that has the task's answer format
        gets format_weight added (an empty reply or a verifier error never does)."""
        if not isinstance(reply, str) or not reply.strip():
            return 0.0, "empty"
        try:
            bonus = self.format_weight if self.format_weight and self.formatted(reply) else 0.0
            if self.extract(reply) is None:
                return bonus, "no_answer"
            return (1.0 + bonus, "correct") if self.check(reply, item.answer) else (bonus, "wrong")
        except Exception as e:  # noqa: BLE001  (any verifier failure is one bad reward, counted)
            return 0.0, f"verifier_error: {type(e).__name__}"


class RewardStats:
    """A reward function for compute_group_normalized_rewards that counts reasons: call it with
    (reply, item); `counts` is a Counter of reasons, and the first reply of each bad kind is logged."""

    def __init__(self, task: RLTask):
        self.task, self.counts = task, Counter()

    def __call__(self, reply: str, item: RLItem) -> tuple[float, str]:
        reward, reason = self.task.reward(reply, item)
        # "scored": a reward model's score (rlhf_grpo.RewardModelTask), not a failure to warn about
        if reason not in self.counts and reason not in ("correct", "wrong", "scored"):
            log.warning("%s: reward 0 for item %s (%s); counted, the run goes on", self.task.name, item.id, reason)
        self.counts[reason] += 1
        return reward, reason


# ----------------------------------------------------------------------------------------------
# Loaders


def _by_hash(records: list[dict], split: str, prefix: str) -> list[dict]:
    return [r for r in records if split_of(f"{prefix}:{r['id']}", VAL_FRACTION) == split]


def _gsm8k(split, data_dir, n, seed):
    recs = gsm8k.load_gsm8k("train" if split == "train" else "test", data_dir)
    return [RLItem(f"gsm8k/{split}/{i}", gsm8k.word_problem_prompt(r["question"]), r["answer"])
            for i, r in enumerate(recs)]


def _svamp(split, data_dir, n, seed):
    recs = [dict(r, id=str(i)) for i, r in enumerate(gsm8k.load_svamp(data_dir))]
    return [RLItem(f"svamp/{r['id']}", gsm8k.word_problem_prompt(r["question"]), r["answer"])
            for r in _by_hash(recs, split, "svamp")]


def _math500(split, data_dir, n, seed):
    return [RLItem(r["id"], mathtask.math_prompt(r["question"]), r["answer"], {"level": r["level"]})
            for r in _by_hash(mathtask.load_math500(data_dir), split, "math500")]


def _arc_easy(split, data_dir, n, seed):
    recs = [dict(r, id=str(i)) for i, r in enumerate(mc.load_arc_chat("easy", data_dir))]
    return [RLItem(f"arc_easy/{r['id']}", mc.mc_chat_prompt(r["question"], r["choices"]), r["answer"],
                   {"n_choices": len(r["choices"])}) for r in _by_hash(recs, split, "arc_easy")]


def arithmetic_problems(digits: int, n: int, split: str = "train", seed: int = 0) -> list[synthetic.Problem]:
    """n problems a op b (op + - *) with both operands of exactly `digits` digits: difficulty grows
    with digits. The split of a problem is a hash of its operands (as synthetic.py's), so train and
    val never share one; repeats only once a split runs out (1 digit has few problems)."""
    if not 1 <= digits <= 18:
        raise ChatforgeError(f"arithmetic digits {digits}: use 1..18")
    rng = random.Random(f"arithmetic{digits}|{split}|{seed}")
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice("+-*")
        key = f"{a}{op}{b}"
        if split_of(f"arithmetic:{key}", VAL_FRACTION) != split or (key in seen and tries < 50 * n):
            continue
        seen.add(key)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(synthetic.Problem(f"What is {a} {op} {b}?", str(value), "arithmetic", f"{a} {op} {b}",
                                     repr(value) + "\n"))
    return out


def _synthetic_loader(kind: str, digits: int = 0):
    def load(split, data_dir, n, seed):
        n = n or 1000
        probs = arithmetic_problems(digits, n, split, seed) if digits else synthetic.make_problems(kind, n, split, seed)
        return [RLItem(f"{kind}{digits or ''}/{split}/{i}", [{"role": "user", "content": p.prompt}], p.answer)
                for i, p in enumerate(probs)]
    return load


def _synthetic_extract(kind):
    def extract(reply):
        said = synthetic.extract_answer(reply)
        if kind in ("letter_count", "arithmetic"):  # a number: in the "answer is" phrase, else the last one
            number = gsm8k.parse_number(said) if said is not None else None
            return number if number is not None else gsm8k.extract_gsm8k_answer(reply)
        return said
    return extract


_GSM_FORMAT = re.compile(r"####\s*\S|answer is", re.IGNORECASE)


def _task(name: str) -> RLTask:
    if name in ("gsm8k", "svamp"):
        return RLTask(name, _gsm8k if name == "gsm8k" else _svamp, gsm8k.extract_gsm8k_answer, gsm8k.check_gsm8k,
                      lambda r: bool(_GSM_FORMAT.search(r)))
    if name == "math500":
        return RLTask(name, _math500, mathtask.extract_math_answer, mathtask.check_math,
                      lambda r: mathtask.last_boxed(r) is not None)
    if name == "arc_easy":
        return RLTask(name, _arc_easy, mc.extract_choice_letter, lambda r, a: mc.extract_choice_letter(r) == a,
                      lambda r: bool(re.search(r"(?i)answer\s*(is|:)", r)))
    m = re.fullmatch(r"arithmetic(\d+)", name)
    if m or name in ("letter_count", "spelling"):
        kind = "arithmetic" if m else name
        return RLTask(name, _synthetic_loader(kind, int(m.group(1)) if m else 0), _synthetic_extract(kind),
                      lambda r, a, k=kind: synthetic.check_answer(k, r, a),
                      lambda r: synthetic.extract_answer(r) is not None)
    raise ChatforgeError(f"unknown RL task {name!r}; choose from {', '.join(TASK_NAMES)} (arithmetic1..arithmetic18)")


TASK_NAMES = ("gsm8k", "svamp", "math500", "arc_easy", "letter_count", "spelling") + tuple(
    f"arithmetic{d}" for d in range(1, 7))


# Tasks added by users (and tests) at run time: name -> a function making the RLTask.
REGISTERED: dict[str, Callable[[], RLTask]] = {}


def register_task(name: str, make: Callable[[], RLTask]) -> None:
    """Make `chatforge rl --task NAME` (and get_task) use `make()`: a task of your own, with its items
    and verifier, from Python (e.g. a plugin module imported before the stage runs)."""
    REGISTERED[name] = make


def get_task(name: str, format_weight: float = 0.0) -> RLTask:
    """The RL task `name` (TASK_NAMES, arithmeticD for D digits, or a registered one), with an optional
    format reward."""
    task = REGISTERED[name]() if name in REGISTERED else _task(name)
    task.format_weight = format_weight
    return task


def load_task_file(path: str | Path, prompt_key: str = "question", answer_key: str = "answer",
                   ) -> tuple[list[RLItem], Counter]:
    """A user's JSONL task file, one {prompt_key, answer_key} object per line, as RLItems. A line that
    is not JSON, not an object, or lacks a field (or has an empty one) is skipped and counted by reason;
    a summary is logged. Returns (items, skipped). Score the items with a built-in task's verifier,
    e.g. get_task("gsm8k").reward(reply, item)."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"RL task file {path} not found; pass a JSONL file of {{{prompt_key}, {answer_key}}} objects")
    items, skipped = [], Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped["not JSON"] += 1
                continue
            if not isinstance(rec, dict):
                skipped["not an object"] += 1
                continue
            missing = [k for k in (prompt_key, answer_key) if rec.get(k) in (None, "")]
            if missing:
                skipped[f"missing {missing[0]!r}"] += 1
                continue
            items.append(RLItem(f"{path.name}/{n}", [{"role": "user", "content": str(rec[prompt_key])}],
                                str(rec[answer_key])))
    if skipped:
        log.warning("%s: skipped %d of %d records (%s)", path, sum(skipped.values()),
                    sum(skipped.values()) + len(items), ", ".join(f"{k}: {v}" for k, v in skipped.items()))
    return items, skipped
