"""Real conversations for supervised fine-tuning, read from the data directory.

Every source is a generator of conversations in the chat protocol (chatforge/tokenizer.py: a list of
{"role", "content", ...} messages) with the same three arguments:

    split        "train" or "val": a deterministic held-out share, chosen by a hash of each record's
                 key (`split_of`), so the two splits never share a record whatever the seed
    val_fraction that share
    stats        a SourceStats that counts records read, conversations given, records of the other
                 split, and every skipped record by reason (a bad record never stops a long job)

Sources:
    oasst_conversations          OpenAssistant message trees: the best-ranked reply at each turn, multi-turn
    self_instruct_conversations  Self-Instruct seed tasks and user-oriented instructions (instruction + input)
    glaive_conversations         Glaive function calling (ShareGPT turns + JSON tool schemas)
    bfcl_conversations           BFCL simple_python questions answered with their ground-truth call
    gsm8k_tool_conversations     GSM8K solutions whose <<48/2=24>> annotations become python tool calls

`check_conversation` is the validator all of them (and the mixture) use: unknown roles, empty turns,
two assistant (or user) turns in a row, tool results without a call, tool calls with invalid JSON or to
undeclared functions are reasons to skip, named in the counts.
"""

from __future__ import annotations

import ast
import hashlib
import gzip
import json
import math
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from chatforge.common import ChatforgeError, data_path
from chatforge.tokenizer import TOOL_TOKENS

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class SourceStats:
    """Counts of one conversation source: what was read, given, held out (the other split), skipped."""

    name: str = ""
    records: int = 0
    conversations: int = 0
    other_split: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> records

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def as_dict(self) -> dict:
        return {"records": self.records, "conversations": self.conversations, "other_split": self.other_split,
                "skipped": dict(sorted(self.skipped.items()))}


def split_of(key: str, val_fraction: float) -> str:
    """'val' for a fixed ~val_fraction of keys, else 'train': the first 8 bytes of sha256(key) as a
    number in [0, 1). The same key always lands in the same split, on every machine and Python.

    >>> split_of("seed_task_0", 0.1), split_of("seed_task_0", 0.0)
    ('train', 'train')
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ChatforgeError(f"val_fraction {val_fraction}: must be in [0, 1)")
    return "val" if hash_unit(key) < val_fraction else "train"


def hash_unit(key: str) -> float:
    """A key's fixed place in [0, 1): the first 8 bytes of sha256(key) as a fraction (what split_of and
    the preference splits cut)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ChatforgeError(f"split {split!r}: use 'train' or 'val'")


def _declared(messages: list[dict]) -> set[str]:
    first = messages[0] if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else {}
    names = set()
    for t in first.get("tools") or []:
        f = t.get("function", t) if isinstance(t, dict) else {}
        if isinstance(f, dict) and isinstance(f.get("name"), str):
            names.add(f["name"])
    return names


def check_conversation(messages: Any) -> str | None:
    """Why a conversation is unfit for training, or None when it is fine.

    >>> check_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    >>> check_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}])
    'empty_turn'
    """
    if not isinstance(messages, list) or not messages:
        return "empty_conversation"
    functions = _declared(messages)
    open_calls = 0  # calls of the current assistant turn still waiting for a tool message
    prev = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return "not_a_message"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return "unknown_role"
        if content is not None and not isinstance(content, str):
            return "content_not_text"
        text = (content or "").strip()
        calls = m.get("tool_calls") or []
        if role == "system" and i != 0:
            return "misplaced_system"
        if role in ("system", "user") and not text:
            if not (role == "system" and m.get("tools")):
                return "empty_turn"
        if role == "user" and prev == "user":
            return "consecutive_user"
        if role in ("user", "system") and open_calls:
            return "unanswered_tool_call"
        if role == "assistant":
            if not text and not calls:
                return "empty_turn"
            if prev == "assistant" and not open_calls:
                return "consecutive_assistant"  # the turn before ended: two replies in a row
            if open_calls:
                return "unanswered_tool_call"
            for c in calls:
                fn = c.get("function", c) if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    return "bad_tool_call"
                name, args = fn["name"], fn.get("arguments", "")
                if name in TOOL_TOKENS:
                    if not isinstance(args, str) or not args.strip():
                        return "bad_tool_call"
                    continue
                if name not in functions:
                    return "undeclared_function"
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        return "invalid_tool_call_json"
                if not isinstance(args, dict):
                    return "invalid_tool_call_json"
            open_calls = len(calls)
        if role == "tool":
            if open_calls == 0:
                return "tool_without_call"
            if not text:
                return "empty_turn"
            open_calls -= 1
        prev = role
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return "no_assistant_turn"
    if roles[0 if roles[0] != "system" else 1:][:1] != ["user"]:
        return "no_user_first"
    if roles[-1] in ("user", "system"):
        return "ends_without_reply"
    return None


def _emit(messages: list[dict], key: str, split: str, val_fraction: float, stats: SourceStats) -> bool:
    """Count one record; True when it belongs to `split` and passes check_conversation."""
    if split_of(key, val_fraction) != split:
        stats.other_split += 1
        return False
    reason = check_conversation(messages)
    if reason is not None:
        stats.skip(reason)
        return False
    stats.conversations += 1
    return True


def read_jsonl(path, stats: SourceStats, what: str = "conversation") -> Iterator[Any]:
    """Records of a JSON-lines file (.jsonl or .jsonl.gz); a line that is not JSON is counted and skipped."""
    try:
        f = gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8")
    except OSError as e:
        raise ChatforgeError(f"{what} file '{path}' could not be read ({e})") from None
    with f:
        for line in f:
            if not line.strip():
                continue
            stats.records += 1
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                stats.skip("not_json")


def _json_list(path) -> list:
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"conversation file '{path}' is not a readable JSON file ({e})") from None
    if not isinstance(data, list):
        raise ChatforgeError(f"conversation file '{path}' should hold a JSON list of records")
    return data


# ----------------------------------------------------------------------------------------------
# OpenAssistant (https://github.com/LAION-AI/Open-Assistant): message trees with ranked replies

OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _best_reply(replies: list[dict]) -> dict | None:
    """The reply human rankers put first (rank 0 is best); unranked replies after ranked ones, in file
    order. Deleted or review-rejected replies never count."""
    live = [r for r in replies if isinstance(r, dict) and not r.get("deleted") and r.get("review_result") is not False]
    if not live:
        return None
    return min(enumerate(live), key=lambda ir: (ir[1].get("rank") is None, ir[1].get("rank") or 0, ir[0]))[1]


def oasst_conversations(path: str = "chat/oasst/en_100_tree.jsonl", data_dir: str = "", split: str = "train",
                        val_fraction: float = 0.1, stats: SourceStats | None = None) -> Iterator[list[dict]]:
    """One conversation per message tree: from the prompt, follow the best-ranked reply at every turn to
    a leaf (keeps multi-turn threads); a trailing user message with no reply is dropped."""
    _check_split(split)
    stats = stats if stats is not None else SourceStats("oasst")
    for rec in read_jsonl(data_path(path, data_dir), stats):
        node = rec.get("prompt") if isinstance(rec, dict) else None
        if not isinstance(node, dict):
            stats.skip("not_a_tree")
            continue
        messages, bad = [], None
        while node is not None:
            role = OASST_ROLES.get(node.get("role"))
            if role is None:
                bad = "unknown_role"
                break
            messages.append({"role": role, "content": (node.get("text") or "").strip()})
            node = _best_reply(node.get("replies") or [])
        if not bad and not any(m["role"] == "assistant" for m in messages):
            bad = "no_assistant_turn"  # a prompt nobody answered
        if bad:
            stats.skip(bad)
            continue
        while messages and messages[-1]["role"] == "user":
            messages.pop()
        key = str(rec.get("message_tree_id") or messages[:1])
        if _emit(messages, key, split, val_fraction, stats):
            yield messages


# ----------------------------------------------------------------------------------------------
# Self-Instruct (https://github.com/yizhongw/self-instruct): instruction, optional input, output

SELF_INSTRUCT_FILES = ("chat/self_instruct/seed_tasks.jsonl", "chat/self_instruct/user_oriented_instructions.jsonl")


def self_instruct_conversations(paths: Iterable[str] = SELF_INSTRUCT_FILES, data_dir: str = "",
                                split: str = "train", val_fraction: float = 0.1,
                                stats: SourceStats | None = None) -> Iterator[list[dict]]:
    """One single-turn conversation per instance: the user writes the instruction and, when there is
    one, the input after a blank line; the assistant answers with the reference output."""
    _check_split(split)
    stats = stats if stats is not None else SourceStats("self_instruct")
    for path in paths:
        for rec in read_jsonl(data_path(path, data_dir), stats):
            if not isinstance(rec, dict) or not isinstance(rec.get("instances"), list):
                stats.skip("no_instances")
                continue
            for j, inst in enumerate(rec["instances"]):
                if not isinstance(inst, dict):
                    stats.skip("no_instances")
                    continue
                prompt = str(rec.get("instruction") or "").strip()
                extra = str(inst.get("input") or "").strip()
                if extra:
                    prompt = f"{prompt}\n\n{extra}"
                messages = [{"role": "user", "content": prompt},
                            {"role": "assistant", "content": str(inst.get("output") or "").strip()}]
                if _emit(messages, f"{rec.get('id')}#{j}", split, val_fraction, stats):
                    yield messages


# ----------------------------------------------------------------------------------------------
# Function calling: Glaive (ShareGPT turns) and BFCL (question + ground-truth call)

GLAIVE_ROLES = {"human": "user", "gpt": "assistant", "function_call": "call", "observation": "tool"}


def _parse_tools(raw: Any) -> list | None:
    """Function schemas from a JSON string or a list; None when they are not a list of named objects."""
    if isinstance(raw, str):
        if not raw.strip():
            return []
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return None
    if not isinstance(raw, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in raw):
        return None
    return raw


def compact_schema(schema: dict) -> dict:
    """A function schema without the descriptions of its parameters (names, types, enums and `required`
    stay; the function's own description stays): about half the tokens, for small contexts.

    >>> compact_schema({"name": "f", "description": "d", "parameters": {"type": "object",
    ...     "properties": {"x": {"type": "integer", "description": "the x"}}, "required": ["x"]}})
    {'name': 'f', 'description': 'd', 'parameters': {'type': 'object', 'properties': {'x': {'type': 'integer'}}, 'required': ['x']}}
    """
    out = {k: v for k, v in schema.items() if k != "parameters"}
    params = schema.get("parameters")
    if isinstance(params, dict):
        props = params.get("properties")
        if isinstance(props, dict):
            props = {k: {kk: vv for kk, vv in v.items() if kk != "description"} if isinstance(v, dict) else v
                     for k, v in props.items()}
            params = {**params, "properties": props}
        out["parameters"] = params
    return out


def glaive_conversations(path: str = "chat/toolcall/glaive_toolcall_en_demo.json", data_dir: str = "",
                         split: str = "train", val_fraction: float = 0.1, stats: SourceStats | None = None,
                         compact_tools: bool = False) -> Iterator[list[dict]]:
    """Glaive function-calling demonstrations: the record's tools become the system message's 'tools'
    (rendered into the system turn), a `function_call` turn an assistant call with JSON arguments,
    an `observation` the tool message with its result, which the next `gpt` turn uses. Records without
    tools are plain chat (the model also learns when not to call). compact_tools: compact_schema."""
    _check_split(split)
    stats = stats if stats is not None else SourceStats("glaive")
    for rec in _json_list(data_path(path, data_dir)):
        stats.records += 1
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        tools = _parse_tools(rec.get("tools", "")) if isinstance(rec, dict) else None
        if not isinstance(turns, list) or tools is None:
            stats.skip("bad_record")
            continue
        if compact_tools:
            tools = [compact_schema(t) for t in tools]
        messages: list[dict] = [{"role": "system", "content": "", "tools": tools}] if tools else []
        bad, last_call = None, None
        for t in turns:
            kind = GLAIVE_ROLES.get(t.get("from")) if isinstance(t, dict) else None
            value = t.get("value") if isinstance(t, dict) else None
            if kind is None or not isinstance(value, str):
                bad = "unknown_role"
                break
            if kind == "call":
                try:
                    call = json.loads(value)
                except json.JSONDecodeError:
                    bad = "invalid_tool_call_json"
                    break
                if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                    bad = "invalid_tool_call_json"
                    break
                args = call.get("arguments", {})
                if isinstance(args, str):  # some demos double-encode the arguments
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        bad = "invalid_tool_call_json"
                        break
                last_call = call["name"]
                messages.append({"role": "assistant", "content": "",
                                 "tool_calls": [{"name": call["name"], "arguments": args}]})
            elif kind == "tool":
                messages.append({"role": "tool", "name": last_call or "", "content": value.strip()})
            else:
                messages.append({"role": kind, "content": value.strip()})
        if bad:
            stats.skip(bad)
            continue
        key = "glaive:" + next((m["content"] for m in messages if m["role"] == "user"), str(stats.records))
        if _emit(messages, key, split, val_fraction, stats):
            yield messages


BFCL_FILES = ("chat/toolcall/bfcl/BFCL_v4_simple_python.json", "chat/toolcall/bfcl/possible_answer_simple_python.json")


def bfcl_conversations(paths: tuple[str, str] = BFCL_FILES, data_dir: str = "", split: str = "train",
                       val_fraction: float = 0.2, stats: SourceStats | None = None,
                       compact_tools: bool = False) -> Iterator[list[dict]]:
    """BFCL simple_python: the question, answered by one call to the given function with the first
    acceptable value of every argument (an optional argument whose first acceptable value is "" is left
    out, as BFCL's checker allows). The conversation ends with the call: it teaches choosing the function
    and writing its arguments. BFCL is also a benchmark: evaluate on the 'val' split only.
    compact_tools: compact_schema."""
    _check_split(split)
    stats = stats if stats is not None else SourceStats("bfcl")
    qpath, apath = (data_path(p, data_dir) for p in paths)
    answers = {}
    for rec in read_jsonl(apath, SourceStats()):
        if isinstance(rec, dict) and isinstance(rec.get("ground_truth"), list):
            answers[rec.get("id")] = rec["ground_truth"]
    for rec in read_jsonl(qpath, stats):
        if not isinstance(rec, dict):
            stats.skip("bad_record")
            continue
        truth, tools = answers.get(rec.get("id")), _parse_tools(rec.get("function"))
        question = rec.get("question")
        try:
            user = question[0][-1]["content"]  # turn 0's last message (simple: one user message)
        except (TypeError, IndexError, KeyError):
            user = None
        if not truth or not tools or not isinstance(user, str) or len(truth) != 1 or not isinstance(truth[0], dict):
            stats.skip("no_ground_truth" if not truth else "bad_record")
            continue
        (name, options), = truth[0].items()
        if not isinstance(options, dict) or not all(isinstance(v, list) and v for v in options.values()):
            stats.skip("bad_record")
            continue
        args = {k: v[0] for k, v in options.items() if v[0] != ""}
        if compact_tools:
            tools = [compact_schema(t) for t in tools]
        messages = [{"role": "system", "content": "", "tools": tools}, {"role": "user", "content": user.strip()},
                    {"role": "assistant", "content": "", "tool_calls": [{"name": name, "arguments": args}]}]
        if _emit(messages, str(rec.get("id")), split, val_fraction, stats):
            yield messages


# ----------------------------------------------------------------------------------------------
# GSM8K (https://github.com/openai/grade-school-math) with its calculator annotations as python calls

_CALC = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def eval_arithmetic(expr: str) -> int | float:
    """Evaluate +, -, *, /, //, %, ** and parentheses on number literals, nothing else (no names, no
    calls), with Python's own semantics, so the result is what the python tool would compute.

    >>> eval_arithmetic("48/2"), eval_arithmetic("(3+4)*2"), eval_arithmetic("2**10")
    (24.0, 14, 1024)
    """
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](a, b)
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    try:
        value = ev(ast.parse(expr.strip(), mode="eval"))
    except (SyntaxError, ZeroDivisionError, OverflowError, RecursionError) as e:
        raise ValueError(str(e)) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def python_output(expr: str) -> str:
    """What the python tool shows for a bare expression: the repr of its value and a newline (the sandbox
    echoes the last expression like the REPL).

    >>> python_output("48/2"), python_output("5*3")
    ('24.0\\n', '15\\n')
    """
    return repr(eval_arithmetic(expr)) + "\n"


def gsm8k_tool_messages(question: str, answer: str) -> list[dict]:
    """A GSM8K solution as a tool-using conversation: the text before each <<expr=result>> is
    assistant text, the expression a python call, its real output the tool result, and the solution
    continues after it; the final "#### N" line stays. ValueError when an annotation is not arithmetic.

    >>> [m.get("content") for m in gsm8k_tool_messages("Q?", "So 48/2 = <<48/2=24>>24.\\n#### 24")][1:]
    ['So 48/2 = ', '24.0\\n', '24.\\n#### 24']
    """
    messages = [{"role": "user", "content": question.strip()}]
    pos = 0
    for m in _CALC.finditer(answer):
        expr = m.group(1).strip()
        out = python_output(expr)
        messages.append({"role": "assistant", "content": answer[pos:m.start()],
                         "tool_calls": [{"name": "python", "arguments": expr}]})
        messages.append({"role": "tool", "name": "python", "content": out})
        pos = m.end()
    messages.append({"role": "assistant", "content": answer[pos:].strip()})
    return messages


def gsm8k_tool_conversations(path: str = "math/gsm8k/train.jsonl", data_dir: str = "", split: str = "train",
                             val_fraction: float = 0.05, stats: SourceStats | None = None) -> Iterator[list[dict]]:
    """GSM8K training solutions with their calculator annotations as python tool calls (see
    gsm8k_tool_messages). A record whose annotation is not plain arithmetic is skipped and counted."""
    _check_split(split)
    stats = stats if stats is not None else SourceStats("gsm8k_tools")
    for n, rec in enumerate(read_jsonl(data_path(path, data_dir), stats)):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not isinstance(rec.get("answer"), str):
            stats.skip("bad_record")
            continue
        try:
            messages = gsm8k_tool_messages(rec["question"], rec["answer"])
        except ValueError:
            stats.skip("bad_calc_annotation")
            continue
        if _emit(messages, "gsm8k:" + rec["question"], split, val_fraction, stats):
            yield messages
