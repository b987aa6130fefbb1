"""HumanEval: 164 hand-written Python functions to complete, checked by running their unit tests.

Chen et al. 2021 (https://arxiv.org/abs/2107.03374). Each problem has a `prompt` (imports, the
signature and a docstring), an `entry_point` and a `test` defining `check(candidate)`. The model gets
the prompt in a chat turn; its reply is reduced to code (`extract_code`), assembled with the tests
into one program (`build_program`) and run in chatforge's python sandbox (`check_program`, a fresh
limited interpreter with a wall-clock timeout; chatforge/tools/python_sandbox.py). pass@1 is the share
of problems whose greedy reply passes.

    >>> extract_code("Here it is:\\n```python\\ndef f(x):\\n    return x\\n```\\nDone.")
    'def f(x):\\n    return x\\n'
"""

from __future__ import annotations

import gzip
import json
import re

from chatforge.common import ChatforgeError, data_path

FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def load_humaneval(data_dir: str = "") -> list[dict]:
    """HumanEval problems as {task_id, prompt, entry_point, test, canonical_solution}."""
    path = data_path("eval/humaneval/HumanEval.jsonl.gz", data_dir)
    opener = gzip.open if str(path).endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                out.append({k: r[k] for k in ("task_id", "prompt", "entry_point", "test", "canonical_solution")})
            except (json.JSONDecodeError, KeyError) as e:
                raise ChatforgeError(f"{path} line {n}: not a HumanEval record ({e})") from None
    return out


def humaneval_prompt(problem: dict) -> list[dict]:
    """Chat messages asking for the completed function in a code block."""
    return [{"role": "user", "content": "Complete the following Python function. Reply with the whole function "
                                        "in a ```python code block.\n\n```python\n" + problem["prompt"] + "```"}]


def extract_code(reply: str) -> str:
    """The code in a reply: the first fenced block (```python ... ```; an unclosed fence runs to the
    end), else the reply as it is."""
    m = FENCE.search(reply)
    return m.group(1) if m else reply


def _imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (e.g. `from typing import List`)."""
    return "".join(line + "\n" for line in prompt.splitlines() if re.match(r"\s*(?:import|from)\s+\w", line))


def build_program(problem: dict, reply: str) -> str:
    """One program: the completed function, the problem's tests and `check(entry_point)`.

    When the reply's code defines the entry point itself, it replaces the prompt (keeping the prompt's
    imports, which replies often leave out); otherwise it is read as the function's body, continuing
    the prompt (the format of the original benchmark's completions)."""
    code = extract_code(reply)
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        body = _imports(problem["prompt"]) + "\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def check_program(program: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """Run a program in the python sandbox; (passed, why not). It passes when it exits cleanly within
    the timeout: a failed assert, an exception, a timeout or a resource limit all fail."""
    from chatforge.tools.python_sandbox import SandboxLimits, run_python

    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s) + 1))
    r = run_python(program, limits)
    if r.timed_out or r.killed_reason:
        return False, r.killed_reason or "timed out"
    if r.returncode != 0:
        last = (r.error.strip().splitlines() or ["exit code %s" % r.returncode])[-1]
        return False, last[:200]
    return True, ""
