"""Multiple-choice tasks: the base model's in-context suite (DCLM's CORE) and chat-form MC (ARC, MMLU).

**In-context suite.** A base model is scored by the log-likelihood it gives each answer after a
few worked examples, with no generation (Brown et al. 2020 https://arxiv.org/abs/2005.14165; the
DCLM "CORE" recipe, Li et al. 2024 https://arxiv.org/abs/2406.11794, Appendix G). Three task types:

    multiple_choice  context = few-shot + query + delimiter, one continuation per choice (ARC, ...)
    schema           one context per option, the same continuation after each (WinoGrande)
    language_modeling  context -> continuation; right when greedy decoding reproduces it (LAMBADA)

Each task's delimiter is DCLM's `continuation_delimiter` (eval/heavy.yaml: "\\nAnswer: " for ARC,
PIQA and BoolQ, a space elsewhere); its number of shots and random baseline come from
`eval/core_meta/eval_meta_data.csv` (DCLM's own table). Trailing whitespace of a context moves to the
front of its continuation (the lm-evaluation-harness convention), so "Answer:" + " Paris" tokenizes
as a user's text would and every choice of a question shares exactly the context tokens.

Scoring (chatforge.evaluate does the forward passes): multiple_choice picks the choice with the
highest *mean* log-probability per continuation token (length-normalised, as llm-foundry's
InContextLearningMultipleChoiceAccuracy that produced DCLM's numbers); schema compares the same
continuation under each context, so the sum is used; language_modeling needs every continuation
token to be the greedy one. Accuracy is centred against the random baseline b, (acc - b) / (1 - b),
and CORE is the mean of the centred accuracies.

**Chat form.** A chat model gets the question with lettered choices in a user turn and answers with
a letter; `extract_choice_letter` reads it.

    >>> extract_choice_letter("The answer is (C).", 4), extract_choice_letter("B. Paris", 4)
    ('C', 'B')
    >>> extract_choice_letter("A cat is not a dog", 4) is None
    True
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.common import ChatforgeError, data_dir

LETTERS = "ABCDEFGHIJ"
FEWSHOT_SEPARATOR = "\n\n"
CORE_META = "eval/core_meta/eval_meta_data.csv"


@dataclass
class MCItem:
    """One question. multiple_choice: `query`, `choices` (answers), `gold`. schema: `choices` are the
    context options, `continuation` follows each. language_modeling: `query` is the context,
    `continuation` the text to reproduce."""

    query: str = ""
    choices: list[str] = field(default_factory=list)
    continuation: str = ""
    gold: int = 0


@dataclass(frozen=True)
class CoreTask:
    name: str  # our name; also the row of core_meta (DCLM's label)
    title: str  # for tables
    path: str  # in the data dir (a gzipped twin is found too)
    kind: str  # multiple_choice | schema | language_modeling
    delimiter: str  # DCLM's continuation_delimiter
    norm: str  # mean | sum | exact: how choices are compared (see the module docstring)


# The suite, in DCLM's order; the file layout is shared/data's.
CORE_TASKS: dict[str, CoreTask] = {t.name: t for t in [
    CoreTask("hellaswag", "HellaSwag", "eval/hellaswag/hellaswag_val_full.txt.bz2", "multiple_choice", " ", "mean"),
    CoreTask("arc_easy", "ARC-Easy", "eval/arc/arc_easy.jsonl", "multiple_choice", "\nAnswer: ", "mean"),
    CoreTask("arc_challenge", "ARC-Challenge", "eval/arc/arc_challenge.jsonl", "multiple_choice", "\nAnswer: ",
             "mean"),
    CoreTask("copa", "COPA", "eval/copa/copa.jsonl", "multiple_choice", " ", "mean"),
    CoreTask("piqa", "PIQA", "eval/piqa/piqa.jsonl", "multiple_choice", "\nAnswer: ", "mean"),
    CoreTask("openbook_qa", "OpenBookQA", "eval/openbookqa/openbook_qa.jsonl", "multiple_choice", " ", "mean"),
    CoreTask("lambada_openai", "LAMBADA", "eval/lambada/lambada_openai.jsonl", "language_modeling", " ", "exact"),
    CoreTask("winogrande", "WinoGrande", "eval/winogrande/winogrande.jsonl", "schema", " ", "sum"),
    CoreTask("boolq", "BoolQ", "eval/boolq/boolq.jsonl", "multiple_choice", "\nAnswer: ", "mean"),
]}


# ----------------------------------------------------------------------------------------------
# Files


def find_file(rel: str, data_dir_setting: str = "") -> Path | None:
    """The task file in the data dir (plain, .gz or .bz2 twin), or None when it is absent."""
    root = data_dir(data_dir_setting)
    base = rel.removesuffix(".gz").removesuffix(".bz2")
    for cand in (rel, base, base + ".gz", base + ".bz2"):
        if (root / cand).is_file():
            return root / cand
    return None


def _text_lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from f


def load_core_items(task: CoreTask, data_dir_setting: str = "") -> tuple[list[MCItem], int]:
    """(items, bad records skipped) of one CORE task; a missing file is a ChatforgeError naming it."""
    path = find_file(task.path, data_dir_setting)
    if path is None:
        raise ChatforgeError(f"{task.title}: {task.path} not found in the data dir {data_dir(data_dir_setting)}; "
                             f"fetch it with `chatforge data download {task.path.split('/')[1]}`")
    if task.name == "hellaswag" and not path.name.endswith((".jsonl", ".jsonl.gz")):
        return _hellaswag_text(path)
    items, bad = [], 0
    for line in _text_lines(path):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if task.kind == "multiple_choice":
                item = MCItem(query=r["query"], choices=list(r["choices"]), gold=int(r["gold"]))
            elif task.kind == "schema":
                item = MCItem(choices=list(r["context_options"]), continuation=r["continuation"], gold=int(r["gold"]))
            else:
                item = MCItem(query=r["context"], continuation=r["continuation"])
            if task.kind != "language_modeling" and not 0 <= item.gold < len(item.choices):
                raise ValueError("gold out of range")
            if not all(isinstance(c, str) for c in item.choices):
                raise ValueError("choices must be strings")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
            continue
        items.append(item)
    return items, bad


def _hellaswag_text(path: Path) -> tuple[list[MCItem], int]:
    """klosax/hellaswag_text_data's layout: 6 lines per item (context, gold index, 4 endings)."""
    lines = [ln.rstrip("\n") for ln in _text_lines(path)]
    items, bad = [], 0
    for i in range(0, len(lines) - 5, 6):
        ctx, gold, endings = lines[i], lines[i + 1], lines[i + 2:i + 6]
        try:
            g = int(gold)
            if not 0 <= g < 4:
                raise ValueError
        except ValueError:
            bad += 1
            continue
        items.append(MCItem(query=ctx, choices=endings, gold=g))
    return items, bad + (1 if len(lines) % 6 else 0)


def read_core_meta(data_dir_setting: str = "") -> dict[str, dict]:
    """DCLM's task table: name -> {shots, random_baseline (a fraction), category}. Empty when absent."""
    path = find_file(CORE_META, data_dir_setting)
    if path is None:
        return {}
    out = {}
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            try:
                out[row["Eval Task"].strip()] = {"shots": int(row["#shots"]),
                                                 "random_baseline": float(row["Random baseline"]) / 100.0,
                                                 "category": row.get("Task Category", "")}
            except (KeyError, ValueError):
                continue
    return out


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """DCLM's centring: 0 at chance, 1 at perfect.

    >>> centered_accuracy(0.25, 0.25), centered_accuracy(1.0, 0.25), round(centered_accuracy(0.625, 0.5), 3)
    (0.0, 1.0, 0.25)
    """
    return (accuracy - random_baseline) / (1.0 - random_baseline)


# ----------------------------------------------------------------------------------------------
# Rendering (text; chatforge.evaluate tokenizes and scores)


def sample_fewshot(n_items: int, index: int, shots: int, seed: int) -> list[int]:
    """`shots` distinct example indices other than `index`, fixed by (seed, index)."""
    if shots <= 0 or n_items <= 1:
        return []
    rng = random.Random(f"{seed}:{index}")
    pool = [i for i in range(n_items) if i != index]
    return rng.sample(pool, min(shots, len(pool)))


def _move_space(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context goes to the front of the continuation.

    >>> _move_space("Q?\\nAnswer: ", "Paris")
    ('Q?\\nAnswer:', ' Paris')
    """
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def _shot_text(task: CoreTask, ex: MCItem) -> str:
    if task.kind == "multiple_choice":
        return f"{ex.query}{task.delimiter}{ex.choices[ex.gold]}"
    if task.kind == "schema":
        return f"{ex.choices[ex.gold]}{task.delimiter}{ex.continuation}"
    return f"{ex.query.strip()}{task.delimiter}{ex.continuation}"


def render_item(task: CoreTask, item: MCItem, fewshot: list[MCItem]) -> list[tuple[str, str]]:
    """(context, continuation) text per choice (one pair for language_modeling)."""
    prefix = "".join(_shot_text(task, ex) + FEWSHOT_SEPARATOR for ex in fewshot)
    if task.kind == "multiple_choice":
        return [_move_space(prefix + item.query + task.delimiter, choice) for choice in item.choices]
    if task.kind == "schema":
        return [_move_space(prefix + option + task.delimiter, item.continuation) for option in item.choices]
    return [_move_space(prefix + item.query.strip() + task.delimiter, item.continuation)]


# ----------------------------------------------------------------------------------------------
# Chat-form multiple choice (ARC, MMLU): a letter for an answer


def mc_chat_prompt(question: str, choices: list[str], subject: str = "") -> list[dict]:
    """Chat messages: the question, lettered choices, and the request for a letter."""
    head = f"The following is a multiple choice question about {subject.replace('_', ' ')}.\n\n" if subject else ""
    lines = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    letters = ", ".join(LETTERS[:len(choices)])
    return [{"role": "user", "content": f"{head}{question.strip()}\n\n{lines}\n\nAnswer with the letter of the "
                                        f"correct choice ({letters})."}]


def extract_choice_letter(reply: str, n_choices: int = 4) -> str | None:
    """The letter a reply picks, or None. In order: an explicit "answer is X" / "Answer: (X)" (the
    last one); a reply that starts with the letter ("B", "B.", "(B) Paris", "**B**"); else the one
    distinct letter written as a choice label ("(C)", "C.", "C)", or alone at the end). The article "A"
    in running text is not a choice."""
    valid = LETTERS[:max(1, min(n_choices, len(LETTERS)))]
    text = reply.strip()
    explicit = re.findall(rf"(?i:answer)\s*(?:(?i:is)|:)\s*[:\-]?\s*[\*\(\[]*([{valid}])(?![A-Za-z])", text)
    if explicit:
        return explicit[-1]
    m = re.match(rf"[\s\*\(\[]*([{valid}])(?:\s*$|[.):\]\*,]|\s*\n)", text)
    if m:
        return m.group(1)
    labels = set(re.findall(rf"(?<![A-Za-z])\(?([{valid}])(?:\)|\.(?!\w)|:|\s*$)", text))
    return labels.pop() if len(labels) == 1 else None


def load_arc_chat(which: str, data_dir_setting: str = "") -> list[dict]:
    """ARC questions for the chat form: {question, choices, answer (letter)}; which = easy | challenge."""
    task = CORE_TASKS[f"arc_{which}"]
    items, _ = load_core_items(task, data_dir_setting)
    return [{"question": it.query.removeprefix("Question:").strip(), "choices": it.choices,
             "answer": LETTERS[it.gold]} for it in items if len(it.choices) <= len(LETTERS)]


def load_mmlu(split: str = "test", data_dir_setting: str = "") -> list[dict]:
    """MMLU (Hendrycks et al. 2021, https://arxiv.org/abs/2009.03300) from eval/mmlu/<split>/*.csv[.gz]
    (no header: question, A, B, C, D, answer): {question, choices, answer, subject}, subjects in order."""
    folder = data_dir(data_dir_setting) / "eval" / "mmlu" / split
    files = sorted(folder.glob(f"*_{split}.csv")) + sorted(folder.glob(f"*_{split}.csv.gz"))
    if not files:
        raise ChatforgeError(f"MMLU: no eval/mmlu/{split}/*_{split}.csv files in the data dir {folder.parents[2]}")
    out = []
    for path in sorted(files, key=lambda p: p.name):
        subject = path.name.split(f"_{split}.csv")[0]
        raw = gzip.open(path, "rt", encoding="utf-8").read() if path.suffix == ".gz" else path.read_text("utf-8")
        for row in csv.reader(io.StringIO(raw)):
            if len(row) != 6 or row[5].strip() not in "ABCD" or not row[5].strip():
                continue  # a malformed row is skipped, not fatal
            out.append({"question": row[0], "choices": row[1:5], "answer": row[5].strip(), "subject": subject})
    return out

