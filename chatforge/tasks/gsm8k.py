"""GSM8K and SVAMP: grade-school word problems whose answer is one number.

GSM8K (Cobbe et al. 2021, https://arxiv.org/abs/2110.14168): 1,319 test problems; each reference
solution ends with a line `#### 72`. SVAMP (Patel et al. 2021, https://arxiv.org/abs/2103.07191):
1,000 one-step problems made hard by small changes to the wording; `Body` + `Question`, `Answer` a
float. Both are scored the same way: the model's reply is reduced to one number and compared with
the reference number.

The parser is the verifier the RL stage rewards with, so it is strict about what counts as a number
and lenient about how it is written:

    >>> extract_gsm8k_answer("She makes 9 * 2 = $18 every day.\\n#### 18")
    '18'
    >>> extract_gsm8k_answer("So the total is 1,234.50 dollars.")
    '1234.50'
    >>> check_gsm8k("The answer is 72.", "72"), check_gsm8k("I think 7.", "72")
    (True, False)
"""

from __future__ import annotations

import json
import math
import re

from chatforge.common import ChatforgeError, data_path

# A number as people write it: optional minus, thousands grouped by commas (only in groups of 3, so
# a list "1,2,3" is three numbers) or plain digits, optional decimals; or a bare decimal ".5". The
# lookbehind keeps "3-5" from reading as "-5" and "x2" from reading as "2".
NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])|(?<![\w.])-?\.\d+")
FINAL = re.compile(r"####\s*([^\n]*)")


def parse_number(text: str) -> float | None:
    """The first number in `text` as a float (commas, '$' and a trailing '%' allowed), else None.

    >>> parse_number("$1,000"), parse_number("-3.5%"), parse_number("none")
    (1000.0, -3.5, None)
    """
    m = NUMBER.search(text.replace("$", " "))
    if m is None:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def extract_gsm8k_answer(reply: str) -> str | None:
    """The reply's final answer as a number string: what follows `#### ` when the reply uses the
    GSM8K reference format, else the last number in the reply (commas dropped). None if no number."""
    m = FINAL.findall(reply)
    if m:
        n = NUMBER.search(m[-1].replace("$", " "))
        if n is not None:
            return n.group(0).replace(",", "")
    found = NUMBER.findall(reply.replace("$", " "))
    return found[-1].replace(",", "") if found else None


def numbers_equal(a: str | float | None, b: str | float | None, rel_tol: float = 1e-6) -> bool:
    """Numeric equality with a relative tolerance (18 == 18.0 == "18.00"); None never equals."""
    try:
        x, y = float(str(a).replace(",", "")), float(str(b).replace(",", ""))
    except (TypeError, ValueError):
        return False
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)


def check_gsm8k(reply: str, reference: str | float) -> bool:
    """Is the reply's final number the reference number? (The RL reward for GSM8K and SVAMP.)"""
    return numbers_equal(extract_gsm8k_answer(reply), reference)


def reference_answer(solution: str) -> str:
    """The number after `####` in a GSM8K reference solution.

    >>> reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n#### 72")
    '72'
    """
    m = FINAL.findall(solution)
    if not m:
        raise ValueError("GSM8K solution without a '#### N' line")
    return m[-1].strip().replace(",", "")


def load_gsm8k(split: str = "test", data_dir: str = "") -> list[dict]:
    """GSM8K problems as {question, answer (number string), solution}."""
    path = data_path(f"math/gsm8k/{split}.jsonl", data_dir)
    out = []
    for n, line in enumerate(_open(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.append({"question": rec["question"], "answer": reference_answer(rec["answer"]),
                        "solution": rec["answer"]})
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise ChatforgeError(f"{path} line {n}: not a GSM8K record ({e})") from None
    return out


def load_svamp(data_dir: str = "") -> list[dict]:
    """SVAMP problems as {question, answer (number string)}."""
    path = data_path("math/svamp/SVAMP.json", data_dir)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        return [{"question": f"{r['Body'].strip()} {r['Question'].strip()}", "answer": _fmt(float(r["Answer"]))}
                for r in records]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ChatforgeError(f"{path}: not the SVAMP JSON list of {{Body, Question, Answer}} ({e})") from None


def word_problem_prompt(question: str) -> list[dict]:
    """The chat messages for a word problem: the question alone, as a user would ask it (the SFT
    data teaches the format; GSM8K-style `#### N` and a plain last number both parse)."""
    return [{"role": "user", "content": question}]


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)


def _open(path):
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from f
