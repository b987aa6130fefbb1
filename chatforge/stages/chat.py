"""`chatforge chat CHECKPOINT`: a multi-turn terminal chat with streaming output and tools.

    chatforge chat runs/tiny/sft/checkpoint --system "You are terse." --temperature 0.3

The conversation is kept as OpenAI-style messages and rendered with the tokenizer's chat protocol
(`render_prompt`) on every turn; the reply's tokens, tool calls and tool output included, are parsed
back with `parse_conversation`, so what the model sees next turn is exactly what it produced. Tool
calls and their results are printed on their own lines, marked (and coloured on a terminal):

    you> what is 6*7?
    assistant> Let me compute.
      [python] print(6*7)
      [output] 42
    It is 42.
    (12 tokens, 85.3 tok/s)

Commands: /reset, /temp X, /tokens, /system TEXT, /tools, /help, /quit (or end of input). Ctrl-C
stops the reply being written and returns to the prompt.

The chat survives its own context: the oldest exchanges are dropped when a prompt would leave less
than a quarter of the context for the reply; a tool result is cut to what is left of the context
(`ToolBudget`), keeping room for the answer; a reply cut anywhere (max_tokens, inside a tool call or
its output) is closed by `tokenizer.close_turn`, so the next message always renders; and a history
the protocol refuses is an error line, not the end of the chat.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from chatforge.common import ChatforgeError, setup_threads

HELP = """commands:
  /reset         start a new conversation (keeps the system prompt)
  /temp X        set the sampling temperature (0 = greedy)
  /tokens        show how many tokens the conversation uses of the context
  /system TEXT   set the system prompt (empty TEXT removes it)
  /tools         list the tools the model may call
  /quit          leave (so does end of input / Ctrl-D)"""

STYLES = {"call": "\033[36m", "output": "\033[2m", "error": "\033[31m", "dim": "\033[2m", "reset": "\033[0m"}


class ReplyPrinter:
    """Streams one reply: text as it comes, tool calls and outputs on their own marked lines."""

    def __init__(self, engine, out, color: bool):
        from chatforge.engine import StreamDecoder

        self.tok, self.out, self.color = engine.tok, out, color
        # the engine's own tables of the protocol's control tokens
        self.starts = engine.tool_start  # id -> tool name
        self.ends = set(engine.tool_end.values())
        self.out_start, self.out_end = engine.output_start, engine.output_end
        self.silent = set(engine.default_stop)  # <|assistant_end|>, <|bos|>
        self.dec = StreamDecoder(self.tok)  # flush() resets it, so one serves every section
        self.section = "text"

    def _w(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def _style(self, name: str) -> str:
        return STYLES[name] if self.color else ""

    def _switch(self, section: str, header: str = "") -> None:
        self._w(self.dec.flush())
        if self.section != "text":
            self._w(self._style("reset") + "\n")
        self.section = section
        if header:
            self._w(f"\n  {self._style(section)}{header} ")

    def on_token(self, seq: int, token: int, sampled: bool) -> None:
        if token in self.starts:
            self._switch("call", f"[{self.starts[token]}]")
        elif token in self.ends or token == self.out_end:
            self._switch("text")
        elif token == self.out_start:
            self._switch("output", "[output]")
        elif token in self.silent:
            return
        else:
            self._w(self.dec.push(token))

    def finish(self) -> None:
        self._w(self.dec.flush() + (self._style("reset") if self.section != "text" else "") + "\n")


class ToolBudget:
    """Fits each tool result into what is left of the context, keeping a quarter of that for the
    answer: a search result of 256+ tokens fills a 256-token context before the model can answer
    (issue #10). `room` is set per reply (tokens it may take); `on_token` counts what it has taken;
    `wrap` gives tools whose output is cut, on a token boundary, to the budget at call time."""

    NOTE = "\n...[cut to fit the context]"

    def __init__(self, tok):
        self.tok, self.room, self.used = tok, 0, 0

    def start(self, room: int) -> None:
        self.room, self.used = room, 0

    def on_token(self, seq: int, token: int, sampled: bool) -> None:
        self.used += 1

    def fit(self, text) -> str:
        if not isinstance(text, str):  # what tools.dispatch does with a non-string result
            text = repr(text)
        left = self.room - self.used - 2  # <|output_start|> and <|output_end|> come with it
        budget = max(0, left - left // 4)
        ids = self.tok.encode(text)
        if len(ids) <= budget:
            return text
        note = self.tok.encode(self.NOTE)
        keep = max(0, budget - len(note))
        while True:  # decode/encode can differ at the cut (a split character): shrink until it fits
            cut = self.tok.decode(ids[:keep]).rstrip("\ufffd") + self.NOTE
            if keep == 0 or len(self.tok.encode(cut)) <= budget:
                return cut
            keep -= 1

    def wrap(self, tools: dict) -> dict:
        from chatforge.tools import Tool

        return {name: Tool(t.name, t.description, lambda args, fn=t.fn: self.fit(fn(args)), t.timeout_s)
                for name, t in tools.items()}


def default_index(checkpoint: str) -> Path | None:
    """runs/<run>/<stage>/checkpoint -> runs/<run>/index/search.sqlite, if it exists."""
    p = Path(checkpoint).resolve()
    cand = p.parent.parent / "index" / "search.sqlite"
    return cand if cand.is_file() else None


def build_tools(cfg) -> dict:
    from chatforge.tools import list_tools
    from chatforge.tools.search import search_tool

    tools = {t.name: t for t in list_tools()}
    index = Path(cfg.index) if cfg.index else default_index(cfg.checkpoint)
    if cfg.index and not index.is_file():
        raise ChatforgeError(f"--index {cfg.index}: not found; build one with `chatforge index`")
    tools["search"] = search_tool(index) if index else search_tool(None)
    return tools


def run(cfg, stdin=None, out=None) -> list[dict]:
    """Run the chat loop on stdin/stdout (or the given streams); returns the final conversation."""
    from chatforge.engine import Engine
    from chatforge.tokenizer import close_turn, fit_conversation

    stdin, out = stdin or sys.stdin, out or sys.stdout
    if not cfg.checkpoint:
        raise ChatforgeError("give a CHECKPOINT folder, e.g. runs/tiny/sft/checkpoint")
    cfg.validate()
    setup_threads(cfg.threads)
    tools = build_tools(cfg) if cfg.tools else {}
    engine = Engine.from_checkpoint(cfg.checkpoint, cfg.device, tools=tools)
    tok, ctx = engine.tok, engine.config.max_seq_len
    budget = ToolBudget(tok)
    engine.tools = budget.wrap(tools) if tools else tools
    color = cfg.color == "always" or (cfg.color == "auto" and hasattr(out, "isatty") and out.isatty())
    dim, reset = (STYLES["dim"], STYLES["reset"]) if color else ("", "")
    temperature = cfg.temperature
    system = cfg.system
    messages: list[dict] = []
    turn = 0
    # A prompt may take the context up to what leaves this much for the reply; older exchanges are
    # dropped to get there.
    min_room = min(cfg.max_tokens, ctx // 4)

    def conversation() -> list[dict]:
        return ([{"role": "system", "content": system}] if system else []) + messages

    print(f"chatforge chat: {cfg.checkpoint} ({sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}M parameters, context {ctx}, "
          f"tools: {', '.join(tools) if tools else 'off'}). /help for commands.", file=out, flush=True)
    interactive = stdin is sys.stdin and out is sys.stdout and sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        if interactive:
            try:
                line = input("\nyou> ") + "\n"
            except EOFError:
                line = ""
        else:
            out.write("\nyou> ")
            out.flush()
            line = stdin.readline()
        if not line:  # end of input
            out.write("\n")
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            elif cmd == "/reset":
                messages.clear()
                print("(conversation reset)", file=out)
            elif cmd == "/temp":
                try:
                    value = float(arg)
                    if not 0 <= value <= 100:
                        raise ValueError
                    temperature = value
                    print(f"(temperature {temperature:g})", file=out)
                except ValueError:
                    print(f"(/temp needs a number in [0, 100], got {arg!r})", file=out)
            elif cmd == "/tokens":
                try:
                    n = len(tok.render_prompt(conversation()))
                    print(f"(conversation: {n} tokens of the {ctx}-token context; {len(messages)} messages)", file=out)
                except ChatforgeError as e:
                    print(f"(error: {e}. /reset starts over)", file=out)
            elif cmd == "/system":
                system = arg.strip()
                print(f"(system prompt {'set' if system else 'removed'})", file=out)
            elif cmd == "/tools":
                for t in tools.values():
                    print(f"  {t.name}: {t.description}", file=out)
                if not tools:
                    print("(tools are off)", file=out)
            elif cmd == "/help":
                print(HELP, file=out)
            else:
                print(f"(unknown command {cmd}; /help lists them)", file=out)
            continue
        messages.append({"role": "user", "content": line})
        try:  # a history the protocol refuses is a message, never the end of the chat
            prompt, dropped = fit_conversation(tok, conversation(), ctx - min_room)
        except ChatforgeError as e:
            messages.pop()
            print(f"(error: {e}. /reset starts over)", file=out)
            continue
        if len(prompt) >= ctx:  # this message alone leaves no room: keep the history, drop the message
            messages.pop()
            print(f"(error: that message makes a {len(prompt)}-token prompt and the model's context is {ctx}; "
                  f"shorten it)", file=out)
            continue
        if dropped:
            del messages[:dropped]
            print(f"{dim}(dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to fit the "
                  f"{ctx}-token context){reset}", file=out)
        out.write("assistant> ")
        printer = ReplyPrinter(engine, out, color)
        budget.start(min(cfg.max_tokens, ctx - len(prompt)))

        def on_token(seq: int, token: int, sampled: bool) -> None:
            budget.on_token(seq, token, sampled)
            printer.on_token(seq, token, sampled)

        t0 = time.perf_counter()
        try:
            [reply] = engine.generate([prompt], max_tokens=cfg.max_tokens, temperature=temperature,
                                      top_k=cfg.top_k or None, top_p=cfg.top_p, seed=cfg.seed + turn,
                                      frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty,
                                      on_token=on_token, use_tools=cfg.tools,
                                      max_tool_calls=cfg.max_tool_calls)
        except ChatforgeError as e:
            messages.pop()
            print(f"\n(error: {e}. /reset starts over)", file=out)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            messages.pop()
            print("\n(interrupted; the reply was discarded)", file=out)
            continue
        printer.finish()
        dt = time.perf_counter() - t0
        turn += 1
        # However the reply stopped (max_tokens or the context inside a tool call or its output), the
        # turn is closed so the next user message can follow it.
        new = tok.parse_conversation(prompt + close_turn(tok, reply.tokens))
        messages[:] = new[1:] if system else new  # parse gives back the system message too
        note = " - cut at max_tokens" if reply.finish_reason == "length" else ""
        print(f"{dim}({len(reply.tokens)} tokens, {len(reply.tokens) / max(dt, 1e-9):.1f} tok/s{note}){reset}",
              file=out, flush=True)
    return conversation()
