"""Inference engine: KV cache vs full recompute, batch vs alone, sampling options, finish reasons,
streaming, and the tool-use state machine (with a scripted model that emits a known call)."""

from __future__ import annotations

import time

import pytest
import torch

from chatforge.common import ChatforgeError
from chatforge.engine import Engine, StreamDecoder
from chatforge.tools import Tool, ToolError
from engine_helpers import ScriptedModel, make_checkpoint, random_model, train_tokenizer

torch.set_num_threads(2)

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [300, 2], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [400, 401, 402]]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(512)


@pytest.fixture(scope="module")
def model():
    return random_model(512)


def greedy_no_cache(model, prompt, n):
    """Reference: re-run the whole sequence every step, no cache, no padding."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids)[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_cache_matches_no_cache_greedy(model):
    eng = Engine(model)  # no tokenizer: no stop tokens, no tools
    outs = eng.generate(PROMPTS, max_tokens=20, temperature=0)
    for p, c in zip(PROMPTS, outs):
        assert c.tokens == greedy_no_cache(model, p, 20)
        assert c.finish_reason == "length" and c.mask == [1] * 20


def test_batch_matches_alone_and_samples_share_prefill(model):
    eng = Engine(model)
    batch = eng.generate(PROMPTS, n=2, max_tokens=16, temperature=0)
    stats = eng.stats
    assert [(c.prompt_index, c.sample_index) for c in batch] == [(i, j) for i in range(4) for j in range(2)]
    for i, p in enumerate(PROMPTS):
        [alone] = eng.generate([p], max_tokens=16, temperature=0)
        assert batch[2 * i].tokens == alone.tokens == batch[2 * i + 1].tokens
    # the cache is sized from the request, not the model's context
    assert stats["cache_positions"] == max(map(len, PROMPTS)) + 16 < model.config.max_seq_len
    assert stats["batch"] == 8


def test_sampling_options(model):
    eng = Engine(model)
    a = eng.generate(PROMPTS[:2], n=3, max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = eng.generate(PROMPTS[:2], n=3, max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert [c.tokens for c in a] == [c.tokens for c in b]  # seeded
    assert len({tuple(c.tokens) for c in a[:3]}) > 1  # samples of one prompt differ
    greedy = eng.generate(PROMPTS[:1], max_tokens=12, temperature=0)[0].tokens
    assert eng.generate(PROMPTS[:1], max_tokens=12, temperature=1.5, top_k=1, seed=1)[0].tokens == greedy
    assert eng.generate(PROMPTS[:1], max_tokens=12, temperature=1.0, top_p=1e-6, seed=2)[0].tokens == greedy


def test_stops_streaming_and_finish_reasons(model):
    eng = Engine(model)
    ref = eng.generate(PROMPTS, max_tokens=12, temperature=0)
    stop = ref[0].tokens[4]  # stop row 0 at its 5th token; other rows keep going (or stop on it too)
    seen: dict[int, list[int]] = {}
    outs = eng.generate(PROMPTS, max_tokens=12, temperature=0, stop_tokens=[stop],
                        on_token=lambda i, t, s: seen.setdefault(i, []).append(t))
    first = ref[0].tokens.index(stop)
    assert outs[0].tokens == ref[0].tokens[:first + 1] and outs[0].finish_reason == "stop"
    for i, (c, r) in enumerate(zip(outs, ref)):
        assert seen[i] == c.tokens  # streamed exactly what was returned
        assert c.tokens == r.tokens[:len(c.tokens)]  # dropping finished rows changes nothing for the rest
        assert c.finish_reason == ("stop" if stop in r.tokens else "length")


def test_rows_that_finish_leave_an_unpadded_batch(model):
    """Equal-length prompts take the one-token decode step (lm_head in the (V, C) layout from 4 rows);
    rows that stop early are compacted out of the cache in place, and every other row still gets the
    tokens it gets alone."""
    prompts = torch.randint(0, 512, (6, 8), generator=torch.Generator().manual_seed(5)).tolist()
    eng = Engine(model)
    alone = [eng.generate([p], max_tokens=14, temperature=0)[0].tokens for p in prompts]
    stops = [alone[1][2], alone[4][6]]  # row 1 ends at step 3, row 4 at step 7 (others may stop on them too)
    outs = eng.generate(prompts, max_tokens=14, temperature=0, stop_tokens=stops)
    finished_early = 0
    for c, ref in zip(outs, alone):
        cut = next((i + 1 for i, t in enumerate(ref) if t in stops), len(ref))
        assert c.tokens == ref[:cut]
        finished_early += cut < len(ref)
    assert finished_early >= 2 and outs[1].finish_reason == "stop" and len(outs[1].tokens) <= 3


def test_stop_strings_and_text(tok, model):
    eng = Engine(model, tok, tools={})
    [ref] = eng.generate([tok.encode("the cat sat", bos=True)], max_tokens=30, temperature=0, stop_tokens=[])
    needle = ref.text[8:12]
    [c] = eng.generate([tok.encode("the cat sat", bos=True)], max_tokens=30, temperature=0, stop_tokens=[],
                       stop_strings=[needle])
    assert c.finish_reason == "stop" and needle not in c.text and ref.text.startswith(c.text)


def test_bad_input(model):
    eng = Engine(model)
    with pytest.raises(ChatforgeError, match="context is 128"):
        eng.generate([[1] * 128], max_tokens=5)
    with pytest.raises(ChatforgeError, match="empty"):
        eng.generate([[]])
    # a prompt near the context gets the room that is left, finish reason "length"
    [c] = eng.generate([[1] * 125], max_tokens=50, temperature=0)
    assert len(c.tokens) == 3 and c.finish_reason == "length"


def test_from_checkpoint(tmp_path, tok):
    tok.save(tmp_path / "tok")
    make_checkpoint(tmp_path / "ckpt", tmp_path / "tok", tok.vocab_size)
    eng = Engine.from_checkpoint(tmp_path / "ckpt", "cpu")
    sp = tok.special
    assert eng.default_stop == [sp("<|assistant_end|>"), sp("<|bos|>")]  # from the checkpoint's tokenizer
    prompt = tok.render_prompt([{"role": "user", "content": "hi"}])
    [ref] = eng.generate([prompt], max_tokens=8, temperature=0, stop_tokens=[])
    assert ref.finish_reason == "length" and len(ref.tokens) == 8  # nothing stops it: the budget does
    stop = ref.tokens[3]
    first = ref.tokens.index(stop)
    [c] = eng.generate([prompt], max_tokens=8, temperature=0, stop_tokens=[stop])
    assert c.finish_reason == "stop" and c.tokens == ref.tokens[:first + 1]  # stop token kept in tokens
    assert c.text == tok.decode(ref.tokens[:first])  # ... and left out of the text
    assert eng.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, fp32


# ----------------------------------------------------------------------------------------------
# Tool use with a scripted model


def scripted(tok, text_before: str, call: str, text_after: str, pair: str = "python"):
    sp = tok.special
    script = (tok.encode(text_before) + [sp(f"<|{pair}_start|>")] + tok.encode(call) + [sp(f"<|{pair}_end|>")]
              + tok.encode(text_after) + [sp("<|assistant_end|>")])
    return ScriptedModel(script, tok.vocab_size, sp("<|output_start|>"), sp("<|output_end|>"))


def run_scripted(tok, model, tools=None, **kw):
    eng = Engine(model, tok, tools=tools)
    prompt = tok.render_prompt([{"role": "user", "content": "What is 6*7?"}])
    [c] = eng.generate([prompt], temperature=0, max_tokens=kw.pop("max_tokens", 120), **kw)
    return c


def output_block(tok, c):
    """(tokens, mask) of the first inserted <|output_start|> ... <|output_end|> block."""
    s = c.tokens.index(tok.special("<|output_start|>"))
    e = c.tokens.index(tok.special("<|output_end|>"), s)
    return c.tokens[s:e + 1], c.mask[s:e + 1]


def test_tool_insertion_python(tok):
    model = scripted(tok, "Let me compute.", "print(6*7)", "It is 42.")
    c = run_scripted(tok, model)
    block, mask = output_block(tok, c)
    assert block == [tok.special("<|output_start|>"), *tok.encode("42\n"), tok.special("<|output_end|>")]
    assert mask == [0] * len(block)  # inserted, not sampled: training masks it out
    assert sum(c.mask) == len(c.mask) - len(block)
    assert c.finish_reason == "stop" and c.tokens[-1] == tok.special("<|assistant_end|>")
    assert c.text.endswith("It is 42.")  # the model continued after the output
    assert [(t.name, t.arguments, t.output, t.error) for t in c.tool_calls] == [("python", "print(6*7)", "42\n", False)]
    # the reply parses back into the chat protocol's messages
    msgs = tok.parse_conversation(tok.render_prompt([{"role": "user", "content": "What is 6*7?"}]) + c.tokens)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[1]["tool_calls"] == [{"name": "python", "arguments": "print(6*7)"}]
    assert msgs[2]["content"] == "42\n" and msgs[3]["content"] == "It is 42."


def test_tool_errors_reach_the_model(tok):
    def crash(_):
        raise RuntimeError("boom")

    def slow(_):
        time.sleep(5)

    def picky(args):
        raise ToolError("arguments must be a city name")

    tools = {"python": Tool("python", "py", lambda code: "ok"), "crash": Tool("crash", "c", crash),
             "slow": Tool("slow", "s", slow, timeout_s=0.2), "picky": Tool("picky", "p", picky)}
    cases = {"@nope: x": "error: unknown tool 'nope'; known tools: crash, picky, python, slow",
             "@crash: x": "error: tool 'crash' crashed: RuntimeError: boom",
             "@slow: x": "error: tool 'slow' did not answer within 0.2 s",
             "@picky: 42": "error: arguments must be a city name"}
    for call, expected in cases.items():
        c = run_scripted(tok, scripted(tok, "", call, "done"), tools=tools)
        assert c.tool_calls[0].error and c.tool_calls[0].output == expected
        assert tok.decode(output_block(tok, c)[0][1:-1]) == expected
        assert c.finish_reason == "stop" and c.text.endswith("done")


def test_malformed_python_and_search_without_index(tok):
    c = run_scripted(tok, scripted(tok, "", "print(6*", "ok"))
    assert "SyntaxError" in c.tool_calls[0].output and c.text.endswith("ok")
    c = run_scripted(tok, scripted(tok, "", "capital of france", "ok", pair="search"))
    assert c.tool_calls[0].error and "chatforge index" in c.tool_calls[0].output


def test_tool_call_limit_and_output_truncation(tok):
    sp = tok.special
    call = [sp("<|python_start|>"), *tok.encode("x"), sp("<|python_end|>")]
    script = call * 4 + tok.encode("done") + [sp("<|assistant_end|>")]
    model = ScriptedModel(script, tok.vocab_size, sp("<|output_start|>"), sp("<|output_end|>"), max_seq_len=512)
    tools = {"python": Tool("python", "py", lambda code: "word " * 500)}
    eng = Engine(model, tok, tools=tools)
    [c] = eng.generate([[tok.bos_id, sp("<|assistant_start|>")]], temperature=0, max_tokens=400,
                       max_tool_calls=2, max_tool_output_tokens=20)
    assert [t.error for t in c.tool_calls] == [False, False, True, True]
    assert "tool call limit reached" in c.tool_calls[2].output
    block, _ = output_block(tok, c)
    assert len(block) == 22 and "truncated" in tok.decode(block)
    assert c.finish_reason == "stop"
    # max_tokens counts inserted tokens too, so a chatty tool cannot blow the budget
    [c] = eng.generate([[tok.bos_id, sp("<|assistant_start|>")]], temperature=0, max_tokens=10)
    assert len(c.tokens) == 10 and c.finish_reason == "length"


def test_stream_decoder_utf8(tok):
    ids = tok.encode("héllo wörld ✓")
    d = StreamDecoder(tok)
    assert "".join(d.push(t) for t in ids) + d.flush() == "héllo wörld ✓"


def test_stream_decoder_multibyte_split_across_tokens_is_incremental(tok):
    """Emoji and CJK are not in this tokenizer's merges, so each of their UTF-8 bytes is its own token:
    a push returns nothing until the token that completes a character, then the whole character.
    Every push decodes only its own token (linear work, not the whole reply again)."""
    text = "ok 😀 你好 ✓!"
    ids = tok.encode(text)
    assert [tok.decode_bytes([i]) for i in tok.encode("😀")] == [b"\xf0", b"\x9f", b"\x98", b"\x80"]

    class Counting:  # the tokenizer, counting how many ids each call decodes
        decoded = 0

        def decode(self, ids):
            Counting.decoded += len(ids)
            return tok.decode(ids)

        def decode_bytes(self, ids):
            Counting.decoded += len(ids)
            return tok.decode_bytes(ids)

    d = StreamDecoder(Counting())
    pieces = [d.push(t) for t in ids]
    assert "".join(pieces) == text and d.flush() == ""
    assert "\ufffd" not in "".join(pieces) and all(len(p) <= 3 for p in pieces)  # never half a character
    emoji = ids.index(tok.encode("😀")[0])
    assert pieces[emoji:emoji + 4] == ["", "", "", "😀"]
    assert [p for p in pieces if p and p in "你好"] == ["你", "好"] and pieces.count("") == 3 + 2 * 2 + 2
    assert Counting.decoded == len(ids)
    # a reply cut inside a character: flush gives the replacement character, as tok.decode does
    d = StreamDecoder(tok)
    assert d.push(ids[emoji]) + d.push(ids[emoji + 1]) == "" and d.flush() == tok.decode(ids[emoji:emoji + 2])


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=4, tie_embeddings=True), dict(n_kv_head=1, head_dim=32)],
                         ids=["gqa", "mha-tied", "mqa-wide-heads"])
def test_fast_cpu_forward_matches_model(kw):
    """The engine's CPU fast path computes GPT.forward's math: prefill (ragged) and decode logits agree."""
    from chatforge.model import KVCache

    model = random_model(512, seed=3, **kw)
    eng = Engine(model)
    c = model.config
    prompts = torch.randint(0, 512, (3, 9))
    pad = torch.tensor([0, 4, 7])
    for fast in (True, False):
        cache = KVCache(3, c.n_layer, c.n_kv_head, c.head_dim, 12, pad=pad)
        fwd = eng._fast_forward if fast else (lambda i, ca, last_only=False: model(i, kv_cache=ca))
        with torch.no_grad():
            logits = [fwd(prompts, cache)] + [fwd(prompts[:, i:i + 1], cache) for i in range(3)]
        if fast:
            ref = logits
    for a, b in zip(ref, logits):
        torch.testing.assert_close(a[:, -1], b[:, -1], rtol=1e-4, atol=1e-4)
    # packed weights follow in-place weight updates (an RL step between two generate calls)
    eng.generate([[1, 2, 3]], max_tokens=5, temperature=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0) if p.ndim == 2 else None
    after = eng.generate([[1, 2, 3]], max_tokens=5, temperature=0)[0].tokens
    assert after == greedy_no_cache(model, [1, 2, 3], 5)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=4, tie_embeddings=True), dict(n_kv_head=1, head_dim=32)],
                         ids=["gqa", "mha-tied", "mqa-wide-heads"])
def test_decode_step_matches_model(kw):
    """The one-token decode step (unpadded batches, what engine.forward dispatches to) computes
    GPT.forward's logits at every step."""
    from chatforge.model import KVCache

    model = random_model(512, seed=4, **kw)
    eng = Engine(model)
    c = model.config
    for B in (2, 5):  # from 4 rows on, the head runs in the other weight layout
        seq = torch.randint(0, 512, (B, 12))
        ours = KVCache(B, c.n_layer, c.n_kv_head, c.head_dim, 12)
        ref = KVCache(B, c.n_layer, c.n_kv_head, c.head_dim, 12)
        with torch.no_grad():
            eng.forward(seq[:, :6], ours)
            model(seq[:, :6], kv_cache=ref)
            for t in range(6, 12):
                a = eng.forward(seq[:, t:t + 1], ours)  # (B, 1, V) through _decode_step
                b = model(seq[:, t:t + 1], kv_cache=ref)
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert ours.pos == ref.pos == 12
