"""MATH-500: competition problems whose answer is a LaTeX expression in `\\boxed{...}`.

The 500-problem test split of Lightman et al. 2023 ("Let's Verify Step by Step",
https://arxiv.org/abs/2305.20050) drawn from MATH (Hendrycks et al. 2021,
https://arxiv.org/abs/2103.03874). A reply is right when the content of its last `\\boxed{}` equals
the reference answer after normalisation. Normalisation follows the spirit of the MATH paper's
`is_equiv` (strip spacing commands, `\\left`/`\\right`, degrees, dollars, `dfrac` -> `frac`, a leading
`x =`, units in `\\text{}`), and then, when both sides are numbers or simple expressions (fractions,
decimals, roots, pi, + - * / ^), compares their values, so 1/2, 0.5, \\frac12 and \\dfrac{1}{2} agree.

    >>> last_boxed("so the answer is $\\\\boxed{\\\\frac{3}{4}}$.")
    '\\\\frac{3}{4}'
    >>> math_answers_equal("0.75", "\\\\frac34")
    True
    >>> math_answers_equal("\\\\dfrac{\\\\sqrt{2}}{2}", "\\\\frac{1}{\\\\sqrt2}")
    True
    >>> math_answers_equal("(1,2)", "(1, 2)"), math_answers_equal("x=5", "5"), math_answers_equal("4", "5")
    (True, True, False)

This module is the RL stage's verifier for MATH-style rewards: every function is pure, bounded in
time (expressions longer than 200 characters or with exponents above 64 are compared as strings, so a
reply cannot make the checker hang), and never executes model text.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re

from chatforge.common import ChatforgeError, data_path

MAX_EXPR_CHARS = 200
MAX_EXPONENT = 64


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) with nested braces, or of
    `\\boxed 5`; None when there is none or its braces never close."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j].strip()
            continue  # unbalanced: try an earlier box
        bare = re.match(r"[^\s$]+", text[i:])  # "\boxed 5"
        if bare:
            return bare.group(0).rstrip(".")
    return None


def extract_math_answer(reply: str) -> str | None:
    """The reply's answer: its last `\\boxed{}`, else what follows a final "answer is" / "Answer:"
    on its line (trailing period and dollars removed), else None."""
    boxed = last_boxed(reply)
    if boxed is not None:
        return boxed
    m = list(re.finditer(r"(?i)(?:final answer|answer)\s*(?:is|:)\s*([^\n]+)", reply))
    if m:
        ans = m[-1].group(1).strip().strip("$").strip()
        return ans.rstrip(".").strip("$").strip() or None
    return None


def _strip_braces_call(s: str, cmd: str) -> str:
    """Replace `\\cmd{X}` by X (one level of nested braces allowed inside X)."""
    return re.sub(r"\\" + cmd + r"\s*\{((?:[^{}]|\{[^{}]*\})*)\}", r"\1", s)


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}, \\frac{1}2 -> \\frac{1}{2}."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", s)
    return s


def normalize_math_answer(answer: str) -> str:
    """A canonical string for an answer (see the module docstring).

    >>> normalize_math_answer("\\\\left( 3, \\\\frac{\\\\pi}{2} \\\\right)")
    '(3,\\\\frac{\\\\pi}{2})'
    >>> normalize_math_answer("\\\\$1,000."), normalize_math_answer("90^\\\\circ")
    ('1000', '90')
    >>> normalize_math_answer("\\\\text{(C)}")
    '(C)'
    """
    s = str(answer).strip()
    s = s.replace("\n", " ").replace("\\!", "")
    s = re.sub(r"\\\\+", r"\\", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    for sp in ("\\,", "\\;", "\\:", "\\ ", "~"):
        s = s.replace(sp, "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    # units and words: \text{ cm} at the end goes, \text{(C)} keeps its content
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\s*\{\s+[a-zA-Z ]*\}\s*$", "", s)
    for cmd in ("text", "textbf", "mbox", "mathrm", "mathbf", "boxed"):
        s = _strip_braces_call(s, cmd)
    s = s.strip().rstrip(".").strip()
    # "x = 5", "k=-3": keep the value when the left side is a short name
    if s.count("=") == 1:
        left, right = s.split("=")
        if len(left.strip()) <= 2:
            s = right
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # 1,000 (but never a tuple like (1,2))
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


# -- numeric values of simple expressions --------------------------------------------------------

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_NAMES = {"pi": math.pi, "e": math.e}


def _latex_to_python(s: str) -> str | None:
    """\\frac{a}{b} -> ((a)/(b)), \\sqrt{x} -> sqrt(x), ^ -> **, implicit products made explicit.
    None when something else (a letter, a command) is left over."""
    prev = None
    while prev != s:  # innermost first, so nested fractions work
        prev = s
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
        s = re.sub(r"\^\{([^{}]*)\}", r"**(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    s = s.replace("{", "(").replace("}", ")")
    if re.search(r"[^0-9a-z.+\-*/() ]", s) or re.search(r"[a-z]+", re.sub(r"sqrt|pi", "", s)):
        return None
    # implicit multiplication: 2sqrt(3), 2pi, )(, 3(
    s = re.sub(r"(?<=[0-9)])(?=sqrt|pi|\()", "*", s)
    s = re.sub(r"(?<=\))(?=[0-9])", "*", s)
    s = re.sub(r"(?<=pi)(?=[0-9(]|sqrt)", "*", s)
    return s


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(b) > MAX_EXPONENT or abs(a) > 1e6):
            raise ValueError("exponent too large")
        return _BINOPS[type(node.op)](a, b)
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt"
            and len(node.args) == 1 and not node.keywords):
        return math.sqrt(_eval(node.args[0]))
    raise ValueError("not a simple expression")


def math_value(answer: str) -> float | None:
    """The numeric value of a normalised answer that is a number or a simple expression, else None.

    >>> math_value("\\\\frac{1}{2}"), math_value("2\\\\sqrt{2}") == 2 * 2 ** 0.5, math_value("x+1")
    (0.5, True, None)
    """
    s = normalize_math_answer(answer)
    if not s or len(s) > MAX_EXPR_CHARS:
        return None
    py = _latex_to_python(s)
    if py is None:
        return None
    try:
        v = _eval(ast.parse(py, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    return v if isinstance(v, float) and math.isfinite(v) else None


def _split_top(s: str) -> list[str] | None:
    """Items of a tuple/interval "(a,b)" or "[a,b)" split at top-level commas, else None."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    parts, depth, cur = [], 0, ""
    for ch in s[1:-1]:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts if len(parts) > 1 else None


def math_answers_equal(pred: str | None, ref: str) -> bool:
    """Do two answers agree? Normalised strings equal, or equal values (relative 1e-6), or tuples /
    intervals with the same brackets whose items agree one by one."""
    if pred is None:
        return False
    a, b = normalize_math_answer(pred), normalize_math_answer(ref)
    if a == b:
        return True
    va, vb = math_value(a), math_value(b)
    if va is not None and vb is not None:
        return math.isclose(va, vb, rel_tol=1e-6, abs_tol=1e-9)
    ta, tb = _split_top(a), _split_top(b)
    if ta is not None and tb is not None and len(ta) == len(tb) and (a[0], a[-1]) == (b[0], b[-1]):
        return all(math_answers_equal(x, y) for x, y in zip(ta, tb))
    return False


def check_math(reply: str, reference: str) -> bool:
    """Is the reply's boxed answer the reference answer? (The RL reward for MATH-style problems.)"""
    return math_answers_equal(extract_math_answer(reply), reference)


def load_math500(data_dir: str = "") -> list[dict]:
    """MATH-500 problems as {question, answer, subject, level, id}."""
    path = data_path("math/math500/test.jsonl", data_dir)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                out.append({"question": r["problem"], "answer": r["answer"], "subject": r.get("subject", ""),
                            "level": r.get("level"), "id": r.get("unique_id", str(n))})
            except (json.JSONDecodeError, KeyError) as e:
                raise ChatforgeError(f"{path} line {n}: not a MATH-500 record ({e})") from None
    return out


def math_prompt(problem: str) -> list[dict]:
    """Chat messages for a MATH problem; the instruction asks for the boxed form the checker reads."""
    return [{"role": "user", "content": f"{problem}\n\nPut your final answer in \\boxed{{}}."}]
