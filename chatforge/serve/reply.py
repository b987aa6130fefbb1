"""One sample's tokens -> what an OpenAI client receives, incrementally (streaming) or at the end.

The engine hands over every token it appends to a reply (chatforge/engine.py); `ReplyBuilder` turns
them into text deltas, each tagged with the part of the reply it belongs to, and at the end into the
OpenAI message (content, tool_calls, finish_reason).

Built-in tools (python, search) run on the server in the middle of a reply. Their calls and results
are part of `content`, in this documented form (Markdown fenced blocks, so any client shows them and
the web UI renders them):

    Let me compute.
    ```python
    print(6*7)
    ```
    ```output
    42
    ```
    It is 42.

(```search for a search call.) Streamed deltas carry an extension field `chatforge_part`: "text",
"python", "search" (the call's arguments), "output" (the tool's result) or "markup" (the fence lines
above), so a client can tell a call from text the model wrote. The same reply in chatforge's native
message form (an assistant message with `tool_calls` named python/search, a `tool` message per
result, then the rest of the reply) is given as `chatforge_messages` on the choice; a client that
sends those back instead of the message continues the conversation exactly as the model saw it.

User-defined functions (the request's `tools`): a call is JSON between <|function_start|> and
<|function_end|> (chatforge/tokenizer.py). The server stops the reply at <|function_end|> and returns
it as OpenAI `tool_calls` with finish_reason "tool_calls"; a call that is not valid JSON, or names a
function the request did not declare, becomes `error` (the app answers 500, as OpenAI does when the
model writes an invalid call). One call per reply: the server does not produce parallel calls.

Stop strings: text that could be the start of a stop string is held back until it cannot be, so a
streamed reply never shows characters that the final reply cuts.
"""

from __future__ import annotations

import json
import secrets

from chatforge.common import ChatforgeError
from chatforge.engine import StreamDecoder
from chatforge.tokenizer import FUNCTION_TOKENS, TOOL_TOKENS, parse_function_call

FENCE_TOOLS = tuple(TOOL_TOKENS)  # "python", "search": a call's fence is named after its tool


class ProtocolTokens:
    """The special ids a reply can contain, looked up once per tokenizer."""

    def __init__(self, tok):
        sp = tok.special_tokens
        self.tool_start = {sp[s]: name for name, (s, _) in TOOL_TOKENS.items() if s in sp}
        self.tool_end = {sp[e]: name for name, (_, e) in TOOL_TOKENS.items() if e in sp}
        self.output_start, self.output_end = sp.get("<|output_start|>"), sp.get("<|output_end|>")
        self.fn_start, self.fn_end = (sp.get(FUNCTION_TOKENS[0]), sp.get(FUNCTION_TOKENS[1]))
        self.quiet = {sp[s] for s in ("<|assistant_end|>", "<|bos|>") if s in sp}  # stop tokens, never shown
        self.special = set(sp.values())


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ReplyBuilder:
    """Feed one sample's tokens in order (`push`), then `finish`. chat=False (/v1/completions): every
    token is text except the stop tokens."""

    def __init__(self, tok, ids: ProtocolTokens, stop: list[str], chat: bool = True,
                 functions: set[str] | None = None):
        self.tok, self.ids, self.stop, self.chat = tok, ids, stop, chat
        self.functions = functions or set()
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that might start a stop string
        self.dec = StreamDecoder(tok)
        self.section = "text"  # text | python | search | output | function
        self.pending = ""  # text section: decoded, not yet emitted (held back for stop strings)
        self.content: list[str] = []  # everything emitted, in order
        self.native: list[dict] = [{"role": "assistant", "content": ""}]  # chatforge_messages
        self.used_builtin = False
        self.call_text: list[str] = []  # the open call's arguments / function JSON
        self.tool_calls: list[dict] = []  # OpenAI tool_calls (user-defined functions)
        self.error: str | None = None  # an invalid function call
        self.finish_reason: str | None = None
        self.tokens = 0
        self.cut = False  # a stop string matched: nothing after it is shown

    # -- helpers -------------------------------------------------------------------------------

    def _emit(self, part: str, text: str, out: list) -> None:
        if text:
            self.content.append(text)
            out.append((part, text))

    def _ends_line(self) -> bool:
        return not self.content or self.content[-1].endswith("\n")

    def _flush_text(self, out: list, final: bool = False) -> None:
        """Emit the held text up to the first stop string (final) or all that cannot start one."""
        text = self.pending
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:  # a stop string: the reply ends before it (the engine stops on this token)
            text, self.pending, self.cut = text[:cut], "", True
        elif final:
            self.pending = ""
        elif self.hold:
            keep = self.hold
            text, self.pending = text[:len(text) - keep] if len(text) > keep else "", text[-keep:]
        else:
            self.pending = ""
        self._emit("text", text, out)
        self.native[-1]["content"] += text

    def _close_section(self, out: list) -> None:
        """Leave the current section (flushing held text, closing a fence)."""
        tail = self.dec.flush()
        if self.section == "text":
            self.pending += tail
            self._flush_text(out, final=True)
        elif self.section in FENCE_TOOLS or self.section == "output":
            self._emit(self.section, tail, out)
            if self.section == "output":
                self.native[-1]["content"] += tail
            else:
                self.call_text.append(tail)
            self._emit("markup", "```\n" if self._ends_line() else "\n```\n", out)
        elif self.section == "function":
            self.call_text.append(tail)

    # -- feeding ---------------------------------------------------------------------------------

    def push(self, token: int, sampled: bool = True) -> list[tuple[str, str]]:
        """One appended token -> [(part, text)] deltas to send now (maybe none)."""
        self.tokens += 1
        out: list[tuple[str, str]] = []
        ids, sec = self.ids, self.section
        if token in ids.quiet or self.cut:
            return out
        if sec == "between" and token != ids.output_start:  # a call that got no output (tools off)
            self.section = sec = "text"
            self.native.append({"role": "assistant", "content": ""})
        if not self.chat:
            self.pending += self.dec.push(token)
            self._flush_text(out)
        elif token in ids.tool_start and sec == "text":
            self._close_section(out)
            self.section, self.call_text, self.used_builtin = ids.tool_start[token], [], True
            self._emit("markup", f"```{self.section}\n" if self._ends_line() else f"\n```{self.section}\n", out)
        elif token in ids.tool_end and sec == ids.tool_end[token]:
            self._close_section(out)
            self.native[-1].setdefault("tool_calls", []).append({"name": sec, "arguments": "".join(self.call_text)})
            self.section = "between"  # the engine inserts the tool's output next
        elif token == ids.output_start and sec == "between":
            self.section = "output"
            self.native.append({"role": "tool", "name": self.native[-1]["tool_calls"][-1]["name"], "content": ""})
            self._emit("markup", "```output\n", out)
        elif token == ids.output_end and sec == "output":
            self._close_section(out)
            self.section = "text"
            self.native.append({"role": "assistant", "content": ""})
        elif token == ids.fn_start and sec == "text":
            self._close_section(out)
            self.section, self.call_text = "function", []
        elif token == ids.fn_end and sec == "function":
            self._close_section(out)
            self._function_call("".join(self.call_text))
            self.section = "done"
        elif sec == "text":
            self.pending += self.dec.push(token)
            self._flush_text(out)
        elif sec == "output":
            piece = self.dec.push(token)
            self._emit("output", piece, out)
            self.native[-1]["content"] += piece
        elif sec == "function" or sec in FENCE_TOOLS:
            piece = self.dec.push(token)
            self.call_text.append(piece)
            if sec != "function":
                self._emit(sec, piece, out)
        # anything else (a token after a finished function call) the engine does not produce: stop tokens end it
        return out

    def _function_call(self, text: str) -> None:
        try:
            call = parse_function_call(text)
        except ChatforgeError as e:
            self.error = f"the model wrote an invalid function call: {e}"
            return
        if call["name"] not in self.functions:
            declared = ", ".join(sorted(self.functions)) or "none"
            self.error = (f"the model called function {call['name']!r}, which the request does not declare "
                          f"(declared: {declared})")
            return
        self.tool_calls.append({"id": new_call_id(), "type": "function",
                                "function": {"name": call["name"],
                                             "arguments": json.dumps(call["arguments"], ensure_ascii=False)}})

    def finish(self, reason: str) -> list[tuple[str, str]]:
        """The engine's finish reason ("stop" | "length" | "cancelled") -> the last deltas."""
        out: list[tuple[str, str]] = []
        if self.section == "function":  # cut inside a function call (max_tokens): no call
            self.dec.flush()
        elif self.section in FENCE_TOOLS:  # cut inside a built-in call: it stays text
            self._close_section(out)
            self.native[-1]["content"] += "".join(self.call_text)
        elif self.section not in ("done", "between"):
            self._close_section(out)
        if self.native[-1]["role"] != "assistant" or self.native[-1].get("tool_calls"):
            self.native.append({"role": "assistant", "content": ""})  # close a turn cut after a tool
        self.finish_reason = "tool_calls" if self.tool_calls else reason
        return out

    # -- results ----------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        return "".join(self.content)

    def message(self) -> dict:
        """The OpenAI assistant message."""
        msg: dict = {"role": "assistant", "content": self.text if (self.text or not self.tool_calls) else None}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg

    def native_messages(self) -> list[dict] | None:
        """chatforge_messages: the reply in the chat protocol's message form, when it used built-in
        tools (otherwise the OpenAI message is already exact)."""
        return self.native if self.used_builtin else None
