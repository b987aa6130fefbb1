"""Tools the assistant can call while it writes a reply, and the registry the engine looks them up in.

A tool is a name, a one-line description (shown to users and usable in a system prompt) and a
function `fn(arguments: str) -> str`. The engine (chatforge/engine.py) decodes a call from the
model's tokens, runs the tool, and feeds the result back as `<|output_start|>…<|output_end|>`.

Call syntax (the vocabulary has one token pair per built-in tool, chatforge/tokenizer.py):

    <|python_start|>print(6*7)<|python_end|>          -> the Python sandbox (tools/python_sandbox.py)
    <|search_start|>capital of France<|search_end|>    -> the search tool (tools/search.py)
    <|python_start|>@weather: Paris<|python_end|>      -> a user tool named "weather", argument "Paris"

Why the `@name:` prefix for user tools: adding a token pair per tool would change the vocabulary and
with it every trained checkpoint, so user tools ride on an existing pair. `@name:` can never start
valid Python (a decorator is `@name` followed by a newline or `(`; the colon is a syntax error), so
the prefix is unambiguous inside the python pair; it is accepted inside the search pair too. An
unknown `@name:` gets a readable error result naming the known tools, never a crash.

    >>> register_tool(Tool("shout", "upper-cases its argument", lambda s: s.upper()))
    >>> dispatch("python", "@shout: hi").output
    'HI'
    >>> dispatch("python", "@nope: x").output
    "error: unknown tool 'nope'; known tools: python, search, shout"
    >>> unregister_tool("shout")
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable

from chatforge.tokenizer import TOOL_TOKENS


class ToolError(Exception):
    """Raised by a tool for a bad call (malformed arguments, empty query...). The message goes back to
    the model as `error: <message>`, so it should say what a correct call looks like."""


@dataclass
class Tool:
    name: str  # what the model writes after `@` (built-ins: the name of their token pair)
    description: str  # one line for humans and system prompts
    fn: Callable[[str], str]  # arguments (the decoded call text) -> result text
    timeout_s: float = 30.0  # in-process tools: the engine stops waiting after this long


@dataclass
class ToolResult:
    name: str  # the tool that was asked for (possibly unknown)
    arguments: str
    output: str  # what the model sees between <|output_start|> and <|output_end|>
    error: bool = False  # True when output is an error message (unknown tool, crash, timeout, ...)


_REGISTRY: dict[str, Tool] = {}
_CUSTOM_CALL = re.compile(r"\A\s*@([A-Za-z_][\w.-]*):[ \t]?")


def register_tool(tool: Tool, replace: bool = False) -> None:
    """Add a tool the model can call as `@name: arguments` (or a built-in under its own name)."""
    if not re.fullmatch(r"[A-Za-z_][\w.-]*", tool.name):
        raise ValueError(f"tool name {tool.name!r}: use letters, digits, '_', '-', '.'")
    if tool.name in _REGISTRY and not replace:
        raise ValueError(f"a tool named {tool.name!r} is already registered (pass replace=True)")
    _REGISTRY[tool.name] = tool


def unregister_tool(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_tool(name: str) -> Tool | None:
    _ensure_builtins()
    return _REGISTRY.get(name)


def list_tools() -> list[Tool]:
    _ensure_builtins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _ensure_builtins() -> None:
    """Register python and search lazily (the search tool needs an index to be useful; without one it
    answers with an error telling the user how to build it)."""
    if "python" not in _REGISTRY:
        from chatforge.tools.python_sandbox import python_tool

        _REGISTRY["python"] = python_tool()
    if "search" not in _REGISTRY:
        from chatforge.tools.search import search_tool

        _REGISTRY["search"] = search_tool(None)


def parse_call(pair: str, text: str) -> tuple[str, str]:
    """(tool name, arguments) of a call written inside the token pair of tool `pair`.

    >>> parse_call("python", "print(1)")
    ('python', 'print(1)')
    >>> parse_call("search", "@wiki: Ada Lovelace")
    ('wiki', 'Ada Lovelace')
    """
    m = _CUSTOM_CALL.match(text)
    if m:
        return m.group(1), text[m.end():]
    return pair, text


def _run_with_timeout(tool: Tool, arguments: str) -> str:
    """Run an in-process tool in a daemon thread and stop waiting after tool.timeout_s. Python cannot
    kill a thread, so a runaway tool keeps running in the background; tools that run untrusted code
    must use a subprocess (as the python tool does) and enforce their own limit."""
    box: dict = {}

    def target():
        try:
            box["out"] = tool.fn(arguments)
        except BaseException as e:  # a tool must never take the engine down
            box["err"] = e

    t = threading.Thread(target=target, daemon=True, name=f"tool-{tool.name}")
    t.start()
    t.join(tool.timeout_s)
    if t.is_alive():
        raise TimeoutError(f"tool '{tool.name}' did not answer within {tool.timeout_s:g} s")
    if "err" in box:
        raise box["err"]
    return box["out"]


def dispatch(pair: str, text: str, tools: dict[str, Tool] | None = None) -> ToolResult:
    """Run the call found between the `pair` tool tokens and return its result; every failure
    (unknown tool, ToolError, crash, timeout, non-string result) becomes an `error: ...` result."""
    if tools is None:
        _ensure_builtins()
        tools = _REGISTRY
    name, args = parse_call(pair, text)
    tool = tools.get(name)
    if tool is None:
        return ToolResult(name, args, f"error: unknown tool '{name}'; known tools: {', '.join(sorted(tools))}",
                          True)
    try:
        out = _run_with_timeout(tool, args)
    except ToolError as e:
        return ToolResult(name, args, f"error: {e}", True)
    except TimeoutError as e:
        return ToolResult(name, args, f"error: {e}", True)
    except Exception as e:
        return ToolResult(name, args, f"error: tool '{name}' crashed: {type(e).__name__}: {e}", True)
    if not isinstance(out, str):
        out = repr(out)
    return ToolResult(name, args, out, False)


def default_tools(checkpoint: str = "", index: str = "") -> dict[str, Tool]:
    """The tool set a chat front end offers: every registered tool, with search over `index`, or over
    runs/<run>/index/search.sqlite next to the checkpoint's stage folder when that exists."""
    from pathlib import Path

    from chatforge.common import ChatforgeError
    from chatforge.tools.search import search_tool

    tools = {t.name: t for t in list_tools()}
    if index:
        if not Path(index).is_file():
            raise ChatforgeError(f"--index {index}: not found; build one with `chatforge index`")
        path = Path(index)
    else:
        cand = Path(checkpoint).resolve().parent.parent / "index" / "search.sqlite" if checkpoint else None
        path = cand if cand is not None and cand.is_file() else None
    tools["search"] = search_tool(path)
    return tools


__all__ = ["Tool", "ToolError", "ToolResult", "TOOL_TOKENS", "register_tool", "unregister_tool", "get_tool",
           "list_tools", "parse_call", "dispatch"]
