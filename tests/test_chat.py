"""`chatforge chat`: the loop driven by scripted stdin, on a tiny random-weight checkpoint."""

from __future__ import annotations

import io
import re

import pytest

from chatforge.common import ChatforgeError

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


def test_penalties_reach_the_reply(ckpt):
    from chatforge.engine import Engine

    path, tok = ckpt
    base = dict(checkpoint=str(path), max_tokens=16, temperature=0, tools=False)
    _, plain = drive(ChatConfig(**base), ["hello"])
    _, penalized = drive(ChatConfig(**base, frequency_penalty=2.0, presence_penalty=0.5), ["hello"])
    prompt = tok.render_prompt([{"role": "user", "content": "hello"}])
    [want] = Engine.from_checkpoint(str(path), "cpu").generate(
        [prompt], max_tokens=16, temperature=0, frequency_penalty=2.0, presence_penalty=0.5, use_tools=False)
    assert penalized[1]["content"] == want.text != plain[1]["content"]


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
    assert "(error: that message makes a" in text and "(conversation: " in text


# ---------------------------------------------------------------------------------------------- issue #10 §3


def scripted(monkeypatch, tok, script):
    """Engine.from_checkpoint gives a ScriptedModel (context 256, the tiny preset's) that writes `script`."""
    from chatforge.engine import Engine

    sp = tok.special

    def fake_from_checkpoint(p, device="auto", tools=None):
        return Engine(ScriptedModel(script, tok.vocab_size, sp("<|output_start|>"), sp("<|output_end|>")), tok,
                      tools=tools)

    monkeypatch.setattr(Engine, "from_checkpoint", staticmethod(fake_from_checkpoint))


def assert_valid_history(tok, conv, ctx=256):
    """What the chat keeps renders, parses back to itself, and takes a next user message."""
    ids = tok.render_conversation(conv)[0]
    assert tok.parse_conversation(ids) == conv
    assert len(tok.render_prompt(conv)) < ctx
    tok.render_prompt(conv + [{"role": "user", "content": "next"}])


def test_search_that_fills_the_context_does_not_end_the_chat(ckpt, monkeypatch, tmp_path):
    """Issue #10: on a 256-token context a search result filled the context, the reply was cut inside
    the tool output, and the next user line ended the chat (`a user message cannot follow an
    unanswered tool call`, exit 2). Now the result is cut to fit, the answer follows it, and the next
    line works (older exchanges make room)."""
    from chatforge.tools.search import build_index

    path, tok = ckpt
    docs = tmp_path / "docs.txt"  # long passages that all match: the search tool's 256-token budget fills up
    docs.write_text("\n\n".join("capital of france paris river mountain " * 40 for _ in range(4)))
    build_index([docs], tmp_path / "search.sqlite")
    sp = tok.special
    script = (tok.encode("Let me search.") + [sp("<|search_start|>")] + tok.encode("capital of france")
              + [sp("<|search_end|>")] + tok.encode("It is paris.") + [sp("<|assistant_end|>")])
    scripted(monkeypatch, tok, script)
    cfg = ChatConfig(checkpoint=str(path), color="never", index=str(tmp_path / "search.sqlite"))
    text, conv = drive(cfg, ["where is it?", "thanks", "/tokens", "and again"])
    assert text.count("assistant> ") == 3 and "(error" not in text
    assert "[cut to fit the context]" in text and "cut at max_tokens" not in text
    assert "(dropped the 4 oldest messages to fit the 256-token context)" in text
    assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"]
    assert conv[0]["content"] == "and again" and conv[-1]["content"] == "It is paris."
    assert "paris river" in conv[2]["content"] and conv[2]["content"].endswith("[cut to fit the context]")
    assert_valid_history(tok, conv)


def test_reply_cut_inside_tool_output_is_closed(ckpt, monkeypatch):
    """max_tokens runs out inside a tool result (an error result, which is short but not fitted): the
    turn is closed with the output as far as it came, and the chat goes on."""
    path, tok = ckpt
    sp = tok.special
    script = ([sp("<|python_start|>")] + tok.encode("@nope: x") + [sp("<|python_end|>")]
              + tok.encode("done") + [sp("<|assistant_end|>")])
    scripted(monkeypatch, tok, script)
    text, conv = drive(ChatConfig(checkpoint=str(path), color="never", max_tokens=14), ["go", "again"])
    assert text.count("assistant> ") == 2 and text.count("cut at max_tokens") == 2 and "(error" not in text
    assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"] * 2
    assert conv[2]["content"].startswith("error") and "unknown tool" not in conv[2]["content"]  # cut inside it
    assert conv[3]["content"] == ""
    assert_valid_history(tok, conv)


def test_close_turn_at_every_cut_point(ckpt):
    """Wherever generation stops -- in text, a call's arguments, between a call and its output, inside
    the output, on <|bos|> -- the closed reply parses to messages that render back to themselves and
    accept a next user message."""
    from chatforge.tokenizer import close_turn

    _, tok = ckpt
    sp = tok.special
    prompt = tok.render_prompt([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    reply = (tok.encode("Let me compute.") + [sp("<|python_start|>")] + tok.encode("print(6*7)")
             + [sp("<|python_end|>"), sp("<|output_start|>")] + tok.encode("42\n") + [sp("<|output_end|>")]
             + tok.encode("Then search.") + [sp("<|search_start|>")] + tok.encode("the cat")
             + [sp("<|search_end|>"), sp("<|output_start|>")] + tok.encode("a cat sat") + [sp("<|output_end|>")]
             + tok.encode("It is 42.") + [sp("<|assistant_end|>")])
    end = sp("<|assistant_end|>")
    for k in range(len(reply) + 1):
        closed = close_turn(tok, reply[:k])
        assert closed[-1] == end and closed.count(end) == 1, k
        conv = tok.parse_conversation(prompt + closed)
        assert conv[-1]["role"] == "assistant" and not conv[-1].get("tool_calls"), k
        assert_valid_history(tok, conv[1:])
        assert_valid_history(tok, conv)
    assert close_turn(tok, reply) == reply  # a complete reply is left as it is
    # cut inside the second call: the unfinished call goes, the first call and its output stay
    cut = reply.index(sp("<|search_start|>")) + 2
    conv = tok.parse_conversation(prompt + close_turn(tok, reply[:cut]))
    assert [m["role"] for m in conv[2:]] == ["assistant", "tool", "assistant"]
    assert conv[-1]["content"] == "Then search." and conv[2]["tool_calls"] == [{"name": "python", "arguments": "print(6*7)"}]
    # cut inside the first output: closed there
    cut = reply.index(sp("<|output_start|>")) + 2
    conv = tok.parse_conversation(prompt + close_turn(tok, reply[:cut]))
    assert conv[3] == {"role": "tool", "name": "python", "content": tok.decode(tok.encode("42\n")[:1])}
    # a stop token sampled inside a call, <|bos|> ending the reply, control tokens out of place
    stray = (tok.encode("a") + [sp("<|user_start|>"), sp("<|output_end|>")] + tok.encode("b")
             + [sp("<|search_start|>")] + tok.encode("q") + [sp("<|assistant_start|>"), end])
    assert close_turn(tok, stray) == tok.encode("a") + tok.encode("b") + [end]
    assert close_turn(tok, tok.encode("x") + [tok.bos_id]) == tok.encode("x") + [end]


def test_history_error_is_a_message_not_the_end(ckpt, monkeypatch):
    """render_prompt used to run outside the error handling: a history the protocol refuses ended the chat."""
    import chatforge.tokenizer as T

    path, tok = ckpt
    real, calls = T.fit_conversation, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise ChatforgeError("message 3: a user message cannot follow an unanswered tool call")
        return real(*a, **k)

    monkeypatch.setattr(T, "fit_conversation", flaky)
    text, conv = drive(ChatConfig(checkpoint=str(path), max_tokens=4, temperature=0, tools=False),
                       ["first", "second"])
    assert "(error: message 3: a user message cannot follow an unanswered tool call. /reset starts over)" in text
    assert text.count("assistant> ") == 1 and [m["content"] for m in conv if m["role"] == "user"] == ["second"]


@pytest.mark.parametrize("cmd,flag,value,msg", [
    ("chat", "--temperature", "-5", "--temperature -5.0: must be in [0, 100]"),
    ("chat", "--max_tokens", "0", "--max_tokens 0: must be at least 1"),
    ("chat", "--color", "purple", "--color purple: must be auto | always | never"),
    ("chat", "--top_p", "0", "--top_p 0.0: must be in (0, 1]"),
    ("chat", "--top_k", "-1", "--top_k -1: must be at least 0"),
    ("chat", "--max_tool_calls", "-1", "--max_tool_calls -1: must be at least 0"),
    ("chat", "--temperature", "nan", "--temperature nan: must be in [0, 100]"),
    ("sample", "--temperature", "101", "--temperature 101.0: must be in [0, 100]"),
    ("sample", "--num_samples", "0", "--num_samples 0: must be at least 1"),
    ("chat", "--frequency_penalty", "3", "--frequency_penalty 3.0: must be in [-2, 2] (0 = off)"),
    ("sample", "--presence_penalty", "-2.5", "--presence_penalty -2.5: must be in [-2, 2] (0 = off)"),
    ("sample", "--threads", "-2", "--threads -2: must be at least 0"),
])
def test_generation_flags_are_validated(ckpt, capsys, cmd, flag, value, msg):
    from chatforge.cli import main

    path, _ = ckpt
    assert main([cmd, str(path), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"chatforge {cmd}: error: {msg}") and err.count("\n") == 1, err


def test_parse_of_ids_cut_inside_tool_output(ckpt):
    """parse_conversation appended the assistant message twice (and the partial output as its text)
    when the ids ended inside a tool result; now it ends with the partial tool message, a mid-turn
    history whose prompt continues the turn."""
    _, tok = ckpt
    sp = tok.special
    ids = (tok.render_prompt([{"role": "user", "content": "hi"}]) + tok.encode("ok") + [sp("<|python_start|>")]
           + tok.encode("1+1") + [sp("<|python_end|>"), sp("<|output_start|>")] + tok.encode("2"))
    conv = tok.parse_conversation(ids)
    assert conv == [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok", "tool_calls": [{"name": "python", "arguments": "1+1"}]},
                    {"role": "tool", "name": "python", "content": "2"}]
    assert tok.render_prompt(conv) == ids + [sp("<|output_end|>")]
