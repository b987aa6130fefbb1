"""Known weak spots of small (and not so small) language models, generated in quantity by code, each
with a checker: counting a letter in a word, spelling a word, reversing a word, comparing decimals
(9.11 vs 9.9) and multi-digit arithmetic. A tokenizer sees "strawberry" as two or three tokens, not ten
letters, so the reliable answer is to call the python tool and state its result; the SFT
conversations teach exactly that (nanochat's SpellingBee task is the model for this).

Public API, shared by SFT (conversations), evaluation and RL (prompts + verifiers):

    make_problems(kind, n, split="train", seed=0) -> list[Problem(prompt, answer, kind, code, output)]
    check_answer(kind, reply_text, answer) -> bool
    problem_conversation(problem, seed=0) -> messages      # user, python call, its output, the answer
    synthetic_conversations(kinds, n, split, seed) -> iterator of messages

Held-out splits are disjoint by construction: a word belongs to 'val' or 'train' by a hash of the
word (so a val word is never seen in training, whatever the letter or template), and a number problem
by a hash of its operands (conversations.split_of). The final sentence of every reply is
"The answer is X." and the checker reads it; for the number kinds it falls back to the last number in
the reply.
"""

from __future__ import annotations

import collections
import random
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from chatforge.common import ChatforgeError
from chatforge.tasks.conversations import split_of

KINDS = ("letter_count", "spelling", "reverse", "decimal_compare", "arithmetic")
VAL_FRACTION = 0.2  # share of words / operand tuples held out for evaluation

# Common English words of every length, the classics of the genre among them ("strawberry",
# "mississippi", "bookkeeper"); a word lands in one split by its hash.
WORDS = tuple(dict.fromkeys("""
strawberry raspberry blueberry banana apple orange lemon cherry peach mango papaya coconut pineapple grape melon
apricot avocado tomato potato carrot onion garlic pepper cabbage lettuce broccoli spinach celery cucumber pumpkin
zucchini mushroom bread butter cheese yogurt coffee chocolate cookie pancake sandwich noodle spaghetti pizza burger
sugar honey vinegar mustard cinnamon mississippi tennessee massachusetts connecticut california alabama minnesota
illinois kentucky louisiana bookkeeper committee accommodate embarrass necessary occurrence parallel
questionnaire millennium possession recommend separate tomorrow beginning believe calendar cemetery conscience
definitely entrepreneur especially existence fluorescent guarantee harass independent knowledge liaison
maintenance mischievous noticeable occasionally pastime privilege receive rhythm schedule successful threshold
vacuum weird elephant giraffe kangaroo hippopotamus crocodile alligator dolphin penguin octopus squirrel rabbit
hamster tortoise butterfly caterpillar mosquito grasshopper scorpion chimpanzee gorilla leopard cheetah panther
buffalo raccoon hedgehog flamingo ostrich peacock pelican sparrow woodpecker computer keyboard monitor printer
internet software hardware algorithm database network program function variable compiler debugger terminal
password browser website download mountain valley river ocean island desert forest glacier volcano canyon meadow
prairie waterfall lagoon peninsula horizon thunder lightning rainbow blizzard hurricane tornado teacher student
doctor nurse engineer farmer painter musician scientist lawyer pilot sailor carpenter plumber electrician
librarian journalist photographer astronaut architect happiness sadness kindness darkness friendship freedom
courage patience wisdom honesty curiosity loyalty gratitude bicycle motorcycle airplane helicopter submarine
railroad highway bridge tunnel harbor lighthouse skyscraper cathedral museum library hospital restaurant
supermarket january february wednesday saturday september november december autumn summer winter spring
umbrella scissors pencil eraser notebook envelope backpack blanket pillow mirror candle lantern bottle kettle
basket bucket hammer ladder balloon puzzle guitar piano violin trumpet drum orchestra symphony melody harmony
address assessment bubble dinner letter little middle puppy success tattoo yellow tree free green sheep wheel
queen quick quiet quilt quartz zebra zigzag jazz fuzzy dizzy buzz crypt lynx nymph gym myth sky fly the and but
for not with you this that have from they will would there their what about which when make like time just know
take people into year your good some could them other than then look only come over think also back after work
first well even want because these give most
""".split()))


@dataclass
class Problem:
    prompt: str  # what the user asks
    answer: str  # the expected answer, as check_answer compares it
    kind: str  # one of KINDS
    code: str = ""  # the python tool call that solves it
    output: str = ""  # what the python tool prints for `code` (repr of the value, newline)


def words(split: str) -> list[str]:
    """The words of a split ('train' or 'val'), disjoint by hash."""
    return [w for w in WORDS if split_of("word:" + w, VAL_FRACTION) == split]


# Invented words (half of the training split's word problems): with only the ~400 real words, the tiny
# model memorised them instead of learning to copy the asked word into its python call. Measured on
# the tiny SFT checkpoint: letter counts right on 93% of training words, 42% of held-out words, the
# wrong ones calling python on another (trained) word. Thousands of one-off words leave copying as the
# only way to fit them: with them, 69% and 57% (100 problems each). They never equal a real word, so the
# held-out split stays unseen.
INVENTED_SHARE = 0.5
_ONSETS = "b c d f g h j k l m n p q r s t v w x y z br ch cl dr fl gr kn pl qu sh sk st th tr wh".split()
_VOWELS = "a e i o u y ai ea ee oo ou ie".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "ck", "ng", "x", "z", "ff", "ss"]
_REAL = frozenset(WORDS)


def invented_word(rng: random.Random) -> str:
    """A pronounceable non-word of 1-4 syllables, e.g. 'brooquen' (never one of WORDS)."""
    while True:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 4)))
        if 3 <= len(w) <= 14 and w not in _REAL:
            return w


def _word_picker(split: str):
    pool = words(split)
    if split == "val":
        return lambda rng: rng.choice(pool)
    return lambda rng: invented_word(rng) if rng.random() < INVENTED_SHARE else rng.choice(pool)


# The python call must copy the asked word, and a tiny model copies tokens, not letters. The gpt4 split
# pattern cuts text before it runs BPE, and what precedes a word changes its tokens: " strawberry" ->
# " straw|ber|ry", " 'strawberry" -> " '|st|raw|ber|ry", but "'strawberry" at the start of a line ->
# "'s|t|raw|ber|ry" ("'s" is a contraction). A call 'strawberry'.count('r') after "in the word strawberry?"
# asks the model to re-spell the word in other tokens, which it cannot do for a word it never saw. So the
# code assigns the word after a space and repeats it exactly as the prompt shows it: bare -> word = ' strawberry'
# (" '" then the prompt's own " straw|ber|ry"), 'strawberry' -> word = 'strawberry', "x" -> word = "x".
# Necessary, not sufficient: on the tiny SFT checkpoint held-out counts stayed ~50% (56% -> 52%, n = 50)
# because the 4-layer model fails to copy even one-token words; bench/RESULTS.md "SFT", copying the word.
def _assign(shown: str, quote: str) -> str:
    """`word = <literal>` repeating `shown` as the prompt wrote it (quote '' = bare, after a space)."""
    return f"word = ' {shown}'" if not quote else f"word = {quote}{shown}{quote}"


def _ask(rng: random.Random, templates: list[tuple[str, str]], shown: str) -> tuple[str, str]:
    """(prompt, the code's first line) from one of (template with {w}, how it quotes the word: '', "'", '"')."""
    template, quote = rng.choice(templates)
    return template.format(w=f"{quote}{shown}{quote}"), _assign(shown, quote)


def _letter_count(rng: random.Random, pick) -> tuple[str, Problem]:
    word = pick(rng)
    present = sorted(set(word))
    letter = rng.choice(present) if rng.random() < 0.8 else rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word])
    shown = word.upper() if rng.random() < 0.1 else word
    prompt, assign = _ask(rng, [
        (f"How many {letter}'s are in the word {{w}}?", ""),
        (f"How many times does the letter '{letter}' appear in {{w}}?", "'"),
        (f"Count the letter {letter} in {{w}}.", ""),
        (f"In the word {{w}}, how many {letter} are there?", '"'),
        (f"how many {letter} in {{w}}", ""),
    ], shown)
    n = word.count(letter)
    code = f"{assign}\nword.lower().count({letter!r})"
    return f"{word}", Problem(prompt, str(n), "letter_count", code, repr(n) + "\n")


def _spelling(rng: random.Random, pick) -> tuple[str, Problem]:
    word = pick(rng)
    prompt, assign = _ask(rng, [("Spell the word {w}.", ""), ("How do you spell {w} letter by letter?", "'"),
                                 ("Spell out {w} one letter at a time.", ""), ("spell {w}", "")], word)
    answer = "-".join(word)
    return word, Problem(prompt, answer, "spelling", f"{assign}\n'-'.join(word.strip())", repr(answer) + "\n")


def _reverse(rng: random.Random, pick) -> tuple[str, Problem]:
    word = pick(rng)
    prompt, assign = _ask(rng, [("Reverse the word {w}.", ""), ("What is {w} spelled backwards?", "'"),
                                 ("Write {w} backwards.", ""), ("reverse {w}", "")], word)
    return word, Problem(prompt, word[::-1], "reverse", f"{assign}\nword.strip()[::-1]", repr(word[::-1]) + "\n")


def _decimal(rng: random.Random) -> str:
    """A decimal whose repr(float) is itself: no trailing zero in the fraction."""
    whole = rng.randint(0, 99)
    d = rng.choice([1, 2, 3])
    frac = str(rng.randint(1, 10 ** d - 1)).zfill(d).rstrip("0")
    return f"{whole}.{frac}"


def _decimal_compare(rng: random.Random) -> tuple[str, Problem]:
    a = _decimal(rng)
    # the trap: the same whole part with fractions of different lengths (9.11 vs 9.9)
    b = f"{a.split('.')[0]}.{_decimal(rng).split('.')[1]}" if rng.random() < 0.7 else _decimal(rng)
    while float(b) == float(a):
        b = _decimal(rng)
    if rng.random() < 0.5:
        a, b = b, a
    bigger = rng.random() < 0.7
    word = rng.choice(["bigger", "larger", "greater"]) if bigger else "smaller"
    prompt = rng.choice([f"Which is {word}, {a} or {b}?", f"Which number is {word}: {a} or {b}?",
                         f"{a} or {b}: which one is {word}?"])
    fn = "max" if bigger else "min"
    answer = (max if bigger else min)((a, b), key=float)
    return f"{fn}:{sorted((a, b))}", Problem(prompt, answer, "decimal_compare", f"{fn}({a}, {b})",
                                             repr(float(answer)) + "\n")


def _arithmetic(rng: random.Random) -> tuple[str, Problem]:
    op = rng.choice(["+", "-", "*", "*"])
    digits = (rng.randint(2, 4), rng.randint(2, 3)) if op == "*" else (rng.randint(3, 7), rng.randint(3, 7))
    a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1) for d in digits)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    sym = {"+": "plus", "-": "minus", "*": "times"}[op]
    prompt = rng.choice([f"What is {a} {op} {b}?", f"Calculate {a} {op} {b}.", f"What's {a} {sym} {b}?",
                         f"{a} {op} {b} = ?"])
    return f"{a}{op}{b}", Problem(prompt, str(value), "arithmetic", f"{a} {op} {b}", repr(value) + "\n")


def make_problems(kind: str, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
    """n problems of one kind from one split, the same list for the same (kind, n, split, seed).
    Problems are distinct while the split has enough of them, then repeat."""
    if kind not in KINDS:
        raise ChatforgeError(f"unknown synthetic task {kind!r}; choose from {', '.join(KINDS)}")
    if split not in ("train", "val"):
        raise ChatforgeError(f"split {split!r}: use 'train' or 'val'")
    rng = random.Random(f"{kind}|{split}|{seed}")
    pick = _word_picker(split)
    out: list[Problem] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if kind in ("letter_count", "spelling", "reverse"):
            key, p = {"letter_count": _letter_count, "spelling": _spelling, "reverse": _reverse}[kind](rng, pick)
            key = f"{key}|{p.prompt}"  # the word's split is fixed; repeats are the same question
        else:
            key, p = _decimal_compare(rng) if kind == "decimal_compare" else _arithmetic(rng)
            if split_of(f"{kind}:{key}", VAL_FRACTION) != split:
                continue
        if key in seen and tries < 50 * n:
            continue
        seen.add(key)
        out.append(p)
    return out


# ----------------------------------------------------------------------------------------------
# Checking a reply

_ANSWER = re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(reply: str) -> str | None:
    """The text after the last "answer is" on its line, without surrounding quotes, asterisks and the
    final period; None when the reply has no such phrase.

    >>> extract_answer("Python says 3.\\nThe answer is **3**.")
    '3'
    """
    found = _ANSWER.findall(reply)
    if not found:
        return None
    quotes = "*\"'`“”‘’ "
    return found[-1].strip(quotes).rstrip(".!?").strip(quotes)


def _numbers(text: str) -> list[float]:
    out = []
    for m in _NUMBER.findall(text):
        try:
            out.append(float(m.replace(",", "")))
        except ValueError:
            pass
    return out


def check_answer(kind: str, reply_text: str, answer: str) -> bool:
    """Whether reply_text states `answer`. Number kinds compare the number in the "answer is" phrase
    (else the last number of the reply) with the answer; spelling needs the letters one by one, in
    order, separated by anything ("s-k-y", "S K Y", "s, k, y"); reverse needs the reversed word itself.

    >>> check_answer("decimal_compare", "The answer is 9.9.", "9.9"), check_answer("decimal_compare", "The answer is 9.11.", "9.9")
    (True, False)
    >>> check_answer("spelling", "The answer is S, K, Y.", "s-k-y"), check_answer("spelling", "The answer is sky.", "s-k-y")
    (True, False)
    """
    if kind not in KINDS:
        raise ChatforgeError(f"unknown synthetic task {kind!r}; choose from {', '.join(KINDS)}")
    said = extract_answer(reply_text)
    if kind in ("letter_count", "decimal_compare", "arithmetic"):
        nums = _numbers(said) if said is not None else []
        if not nums:
            nums = _numbers(reply_text)[-1:]
        return bool(nums) and nums[0] == float(answer)
    if said is None:
        return False
    if kind == "spelling":
        return [p.lower() for p in re.findall(r"[^\W\d_]+", said)] == answer.split("-")
    return re.sub(r"[^\w]", "", said).lower() == answer.lower()  # reverse


# ----------------------------------------------------------------------------------------------
# Conversations that teach the tool


def problem_conversation(problem: Problem, seed: int = 0) -> list[dict]:
    """user question -> assistant calls python -> the tool's output -> assistant states the answer."""
    rng = random.Random(f"{problem.prompt}|{seed}")
    intro = rng.choice(["Let me check with Python.", "I'll use Python to be exact.", "Let me compute it.",
                        "Python can do this reliably.", ""])
    if problem.kind == "letter_count":
        letter = re.search(r"\.count\('(.)'\)", problem.code).group(1)
        n = int(problem.answer)
        detail = f"The letter '{letter}' appears {n} time{'s' if n != 1 else ''}."
    elif problem.kind == "spelling":
        detail = f"Letter by letter: {problem.answer}."
    elif problem.kind == "reverse":
        detail = f"Backwards it reads {problem.answer}."
    elif problem.kind == "decimal_compare":
        detail = "Comparing the values, not the digit counts:"
    else:
        detail = f"{problem.code} = {problem.answer}."
    return [
        {"role": "user", "content": problem.prompt},
        {"role": "assistant", "content": intro, "tool_calls": [{"name": "python", "arguments": problem.code}]},
        {"role": "tool", "name": "python", "content": problem.output},
        {"role": "assistant", "content": f"{detail} The answer is {problem.answer}."},
    ]


def synthetic_conversations(kinds: Iterable[str] = KINDS, n: int = 200, split: str = "train",
                            seed: int = 0) -> Iterator[list[dict]]:
    """n conversations of each kind (problem_conversation of make_problems), kinds interleaved; a kind
    listed twice gets 2n distinct problems (the mixture's way to weight one kind above the others)."""
    per_kind = [make_problems(k, c * n, split, seed) for k, c in collections.Counter(kinds).items()]
    for i in range(max((len(p) for p in per_kind), default=0)):
        for problems in per_kind:
            if i < len(problems):
                yield problem_conversation(problems[i], seed)
