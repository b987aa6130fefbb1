"""OpenAI request validation and error bodies.

Every request body is checked field by field here, before anything is tokenized or queued, and a bad
one becomes an `APIError` that the app answers in OpenAI's error shape
(https://platform.openai.com/docs/guides/error-codes):

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages[1].role", "code": null}}

The message names the field and what would be accepted. Fields OpenAI defines that this server does
not implement (logprobs, logit_bias, response_format json, ...) are refused when set to anything but
their neutral value, rather than silently ignored; fields nobody defines are ignored, as most
OpenAI-compatible servers do, so clients that send extras keep working.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from chatforge.tokenizer import TOOL_TOKENS

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # OpenAI's limit on `stop` sequences
MAX_PROMPTS = 64  # /v1/completions: prompts in one request


class APIError(Exception):
    """An error answered to the client: HTTP status + OpenAI's error object."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
             404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 that says where it broke."""
    try:
        text = raw.decode("utf-8")  # RFC 8259: JSON between systems is UTF-8 (json.loads would guess UTF-16/32)
    except UnicodeDecodeError:
        raise bad(None, "the request body is not UTF-8 text; send JSON encoded as UTF-8") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(None, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                        f"send a JSON object") from None
    except RecursionError:
        raise bad(None, "the request body nests too deeply; send a flat JSON object") from None
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got a JSON {_kind(body)}")
    return body


def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


# ----------------------------------------------------------------------------------------------
# Field readers: each returns the value or raises a 400 naming the field.


def _get(body: dict, name: str, kinds: tuple, default: Any = None, what: str = "") -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds:  # JSON true is not a number
        raise bad(name, f"'{name}' must be {what}, got a boolean")
    if not isinstance(v, kinds):
        raise bad(name, f"'{name}' must be {what}, got a {_kind(v)}")
    return v


def _number(body: dict, name: str, default: float | None, lo: float, hi: float) -> float | None:
    v = _get(body, name, (int, float), default, f"a number between {lo:g} and {hi:g}")
    if v is None:
        return None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise bad(name, f"'{name}' must be between {lo:g} and {hi:g}, got {v}")
    return float(v)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int, code: str | None = None) -> int | None:
    v = _get(body, name, (int, float), default, "an integer")
    if v is None:
        return None
    if isinstance(v, float):
        if not v.is_integer():
            raise bad(name, f"'{name}' must be an integer, got {v}")
        v = int(v)
    if not lo <= v <= hi:
        raise bad(name, f"'{name}' must be between {lo} and {hi}, got {v}", code)
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    return _get(body, name, (bool,), default, "true or false")


def _refuse(body: dict, name: str, neutral: tuple, why: str = "") -> None:
    """A field OpenAI defines and this server does not implement: allowed only at its neutral value."""
    if name in body and body[name] not in neutral:
        raise bad(name, f"'{name}' is not supported by this server{why}; leave it out")


@dataclass
class Sampling:
    """What every generation request shares (OpenAI's names; max_tokens None = the server's default)."""

    model: str = ""
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension (as vLLM): 0 = off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _sampling(body: dict, max_n: int) -> Sampling:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required: the model's id as a string (GET /v1/models lists it)")
    s = Sampling(model=model)
    mt = _int(body, "max_completion_tokens", None, 1, 2**31 - 1)
    s.max_tokens = _int(body, "max_tokens", None, 1, 2**31 - 1) if mt is None else mt
    s.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    s.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if s.top_p == 0.0:
        raise bad("top_p", "'top_p' must be above 0 (use temperature 0 for greedy decoding)")
    s.top_k = _int(body, "top_k", 0, -1, 2**31 - 1)
    s.top_k = max(s.top_k, 0)  # vLLM uses -1 for off
    s.frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    s.presence_penalty = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    s.n = _int(body, "n", 1, 1, max_n)
    s.seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise bad("stop", f"'stop' must be a string or a list of up to {MAX_STOP} strings")
        if len(stop) > MAX_STOP:
            raise bad("stop", f"'stop' has {len(stop)} sequences; at most {MAX_STOP} are allowed")
        if any(x == "" for x in stop):
            raise bad("stop", "'stop' sequences must not be empty strings")
        s.stop = stop
    s.stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("stream_options", f"'stream_options' must be an object, got a {_kind(opts)}")
        if not s.stream:
            raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
        s.include_usage = _get(opts, "include_usage", (bool,), False, "true or false")
    _refuse(body, "logit_bias", (None, {}))
    _refuse(body, "logprobs", (None, False, 0), " (no log-probabilities are returned)")
    _refuse(body, "top_logprobs", (None, 0))
    return s


# ----------------------------------------------------------------------------------------------
# /v1/chat/completions


@dataclass
class ChatRequest:
    sampling: Sampling
    messages: list[dict]  # in chatforge's chat-protocol form (tokenizer.render_prompt)
    tools: list[dict] | None = None  # function schemas (OpenAI `tools`)
    tool_choice: str = "auto"  # auto | none


def _content(v: Any, where: str, allow_null: bool) -> str:
    """A message's content: a string, or OpenAI's list of text parts (joined)."""
    if v is None:
        if allow_null:
            return ""
        raise bad(f"{where}.content", f"'{where}.content' is required: a string")
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        texts = []
        for j, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise bad(f"{where}.content[{j}]", f"'{where}.content[{j}]' must be a text part "
                                                   f"{{\"type\": \"text\", \"text\": ...}}; this model reads text "
                                                   f"only, got {kind!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where}.content", f"'{where}.content' must be a string or a list of text parts, got a {_kind(v)}")


def _tool_calls(v: Any, where: str) -> list[dict]:
    if not isinstance(v, list):
        raise bad(f"{where}.tool_calls", f"'{where}.tool_calls' must be a list, got a {_kind(v)}")
    out = []
    for j, c in enumerate(v):
        w = f"{where}.tool_calls[{j}]"
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(w, f"'{w}' must be {{\"type\": \"function\", \"function\": {{\"name\": str, "
                         f"\"arguments\": str}}}}")
        args = fn.get("arguments", "")
        if not isinstance(args, (str, dict)):
            raise bad(f"{w}.function.arguments", f"'{w}.function.arguments' must be a JSON string, "
                                                 f"got a {_kind(args)}")
        out.append({"name": fn["name"], "arguments": args})
    return out


def _messages(v: Any) -> list[dict]:
    if v is None:
        raise bad("messages", "'messages' is required: a non-empty list of {\"role\", \"content\"} objects")
    if not isinstance(v, list):
        raise bad("messages", f"'messages' must be a list, got a {_kind(v)}")
    if not v:
        raise bad("messages", "'messages' is empty; send at least one message")
    out = []
    for i, m in enumerate(v):
        w = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(w, f"'{w}' must be an object with 'role' and 'content', got a {_kind(m)}")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"{w}.role", f"'{w}.role' is {role!r}; it must be one of {', '.join(ROLES)}")
        calls = _tool_calls(m["tool_calls"], w) if role == "assistant" and m.get("tool_calls") else []
        content = _content(m.get("content"), w, allow_null=role == "assistant")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        msg: dict = {"role": role, "content": content}
        if calls:
            msg["tool_calls"] = calls
        if role == "tool" and isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _tools(body: dict) -> tuple[list[dict] | None, str]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools", f"'tools' must be a list of {{\"type\": \"function\", \"function\": {{...}}}}, "
                               f"got a {_kind(tools)}")
        for j, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise bad(f"tools[{j}]", f"'tools[{j}]' must be {{\"type\": \"function\", \"function\": "
                                         f"{{\"name\": str, \"description\": str, \"parameters\": {{...}}}}}}")
            if "parameters" in fn and not isinstance(fn["parameters"], dict):
                raise bad(f"tools[{j}].function.parameters", f"'tools[{j}].function.parameters' must be a JSON "
                                                            f"schema object")
        tools = tools or None
    if choice is None:
        choice = "auto"
    if choice not in ("auto", "none"):
        raise bad("tool_choice", f"'tool_choice' {json.dumps(choice)[:80]} is not supported; use \"auto\" "
                                 f"(the model decides) or \"none\"")
    return tools, choice


def parse_chat(body: dict, max_n: int) -> ChatRequest:
    s = _sampling(body, max_n)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("response_format", "'response_format' other than {\"type\": \"text\"} is not supported")
    tools, choice = _tools(body)
    messages = _messages(body.get("messages"))
    # The renderer writes whatever calls a history holds (render(parse(ids)) == ids for any model output),
    # so a call to a function the request does not declare is refused here, where the client can fix it.
    declared = {t["function"]["name"] for t in tools or []} | set(TOOL_TOKENS)
    for i, m in enumerate(messages):
        for j, c in enumerate(m.get("tool_calls") or []):
            if c["name"] not in declared:
                raise bad(f"messages[{i}].tool_calls[{j}]", f"messages[{i}]: tool call to unknown tool "
                                                            f"{c['name']!r}; declare it in 'tools'")
    return ChatRequest(s, messages, tools, choice)


# ----------------------------------------------------------------------------------------------
# /v1/completions


@dataclass
class CompletionRequest:
    sampling: Sampling
    prompts: list[str]
    echo: bool = False


def parse_completion(body: dict, max_n: int) -> CompletionRequest:
    s = _sampling(body, max_n)
    p = body.get("prompt")
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = p
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        raise bad("prompt", "'prompt' as token ids is not supported; send the text")
    else:
        raise bad("prompt", "'prompt' is required: a string or a non-empty list of strings")
    if len(prompts) > MAX_PROMPTS:
        raise bad("prompt", f"'prompt' has {len(prompts)} prompts; at most {MAX_PROMPTS} per request")
    if any(x == "" for x in prompts):
        raise bad("prompt", "'prompt' is empty; give the text to continue")
    _refuse(body, "suffix", (None, ""))
    _refuse(body, "best_of", (None, 1))
    return CompletionRequest(s, prompts, _bool(body, "echo"))
