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

    stdin, out = stdin or sys.stdin, out or sys.stdout
    if not cfg.checkpoint:
        raise ChatforgeError("give a CHECKPOINT folder, e.g. runs/tiny/sft/checkpoint")
    setup_threads(cfg.threads)
    tools = build_tools(cfg) if cfg.tools else {}
    engine = Engine.from_checkpoint(cfg.checkpoint, cfg.device, tools=tools)
    tok, ctx = engine.tok, engine.config.max_seq_len
    color = cfg.color == "always" or (cfg.color == "auto" and hasattr(out, "isatty") and out.isatty())
    temperature = cfg.temperature
    system = cfg.system
    messages: list[dict] = []
    turn = 0

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
                n = len(tok.render_prompt(conversation()))
                print(f"(conversation: {n} tokens of the {ctx}-token context; {len(messages)} messages)", file=out)
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
        prompt = tok.render_prompt(conversation())
        out.write("assistant> ")
        printer = ReplyPrinter(engine, out, color)
        t0 = time.perf_counter()
        try:
            [reply] = engine.generate([prompt], max_tokens=cfg.max_tokens, temperature=temperature,
                                      top_k=cfg.top_k or None, top_p=cfg.top_p, seed=cfg.seed + turn,
                                      on_token=printer.on_token, use_tools=cfg.tools,
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
        new = tok.parse_conversation(prompt + reply.tokens)
        messages[:] = new[1:] if system else new  # parse gives back the system message too
        note = " - cut at max_tokens" if reply.finish_reason == "length" else ""
        dim, reset = (STYLES["dim"], STYLES["reset"]) if color else ("", "")
        print(f"{dim}({len(reply.tokens)} tokens, {len(reply.tokens) / max(dt, 1e-9):.1f} tok/s{note}){reset}",
              file=out, flush=True)
    return conversation()
