"""`chatforge chat`: the loop driven by scripted stdin, on a tiny random-weight checkpoint."""

from __future__ import annotations

import io
import re

import pytest

from chatforge.config import ChatConfig
from chatforge.stages import chat
from engine_helpers import ScriptedModel, make_checkpoint, train_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    tok = train_tokenizer(512)
    tok.save(d / "tok")
    return make_checkpoint(d / "run" / "sft" / "checkpoint", d / "tok", tok.vocab_size, max_seq_len=256), tok


def drive(cfg, lines: list[str]):
    out = io.StringIO()
    conv = chat.run(cfg, stdin=io.StringIO("".join(l + "\n" for l in lines)), out=out)
    return out.getvalue(), conv


def test_multi_turn_and_commands(ckpt):
    path, tok = ckpt
    cfg = ChatConfig(checkpoint=str(path), max_tokens=12, temperature=0.8, threads=2)
    text, conv = drive(cfg, ["hello there", "/tokens", "/temp 0", "/temp abc", "/system Be terse.",
                             "second question", "/tokens", "/tools", "/help", "/bogus", "/reset", "/tokens", "/quit",
                             "never read"])
    assert text.count("assistant> ") == 2
    assert "(temperature 0)" in text and "/temp needs a number" in text and "(system prompt set)" in text
    assert "unknown command /bogus" in text and "python: run Python code" in text and "/reset" in text
    counts = [int(n) for n in re.findall(r"\(conversation: (\d+) tokens", text)]
    assert counts[0] > 4 and counts[1] > counts[0] and counts[2] < counts[1]  # grows, then reset
    assert "tok/s" in text and "never read" not in text
    assert conv == [{"role": "system", "content": "Be terse."}]  # /reset kept the system prompt


def test_conversation_uses_chat_protocol(ckpt):
    path, tok = ckpt
    cfg = ChatConfig(checkpoint=str(path), max_tokens=8, temperature=0, tools=False)
    _, conv = drive(cfg, ["one", "two"])  # ends at end of input
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
    assert conv[0]["content"] == "one" and conv[2]["content"] == "two"
    # the rendered conversation is what the model saw: it parses back to the same messages
    assert tok.parse_conversation(tok.render_conversation(conv)[0]) == conv


def test_tool_calls_shown_distinctly(ckpt, monkeypatch):
    path, tok = ckpt
    sp = tok.special
    script = (tok.encode("Let me compute.") + [sp("<|python_start|>")] + tok.encode("print(6*7)")
              + [sp("<|python_end|>")] + tok.encode("It is 42.") + [sp("<|assistant_end|>")])
    from chatforge.engine import Engine

    def fake_from_checkpoint(p, device="auto", tools=None):
        return Engine(ScriptedModel(script, tok.vocab_size, sp("<|output_start|>"), sp("<|output_end|>")), tok,
                      tools=tools)

    monkeypatch.setattr(Engine, "from_checkpoint", staticmethod(fake_from_checkpoint))
    text, conv = drive(ChatConfig(checkpoint=str(path), color="always"), ["What is 6*7?"])
    assert "Let me compute." in text and "[python] print(6*7)" in text and "[output] 42" in text
    assert "\033[36m" in text  # coloured when asked
    plain, _ = drive(ChatConfig(checkpoint=str(path), color="never"), ["What is 6*7?"])
    assert "\033[" not in plain and "\n  [python] print(6*7)\n" in plain and "\n  [output] 42\n" in plain
    assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"]
    assert conv[2]["content"] == "42\n" and conv[3]["content"] == "It is 42."


def test_cli_and_errors(ckpt, monkeypatch, capsys):
    from chatforge.cli import main

    path, _ = ckpt
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(path), "--max_tokens", "5", "--temperature", "0", "--threads", "2"]) == 0
    assert "assistant> " in capsys.readouterr().out
    assert main(["chat", str(path.parent / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["chat", str(path), "--index", str(path / "nope.sqlite")]) == 2
    # a conversation that outgrows the context is an error message, not a crash
    cfg = ChatConfig(checkpoint=str(path), max_tokens=5, temperature=0)
    text, _ = drive(cfg, ["word " * 400, "/tokens"])
    assert "(error: prompt 0 is" in text and "(conversation:" in text
