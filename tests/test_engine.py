"""Inference engine: KV cache vs full recompute, batch vs alone, sampling options, finish reasons,
streaming, and the tool-use state machine (with a scripted model that emits a known call)."""

from __future__ import annotations

import time

import pytest
import torch

from chatforge.common import ChatforgeError
from chatforge.engine import Engine, SamplingParams, StreamDecoder, penalize
from chatforge.tools import Tool, ToolError
from engine_helpers import (BiasedModel, ScriptedModel, greedy_reference, make_checkpoint, random_model,
                            train_tokenizer)

torch.set_num_threads(1)  # tiny models: one thread is as fast, and a busy machine does not stall it

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
    # top_k=3 at a high temperature: the first token is always one of the model's 3 most likely
    with torch.no_grad():
        top3 = model(torch.tensor(PROMPTS[:1]))[0, -1].topk(3).indices.tolist()
    firsts = {c.tokens[0] for c in eng.generate(PROMPTS[:1], n=20, max_tokens=1, temperature=5.0, top_k=3, seed=0)}
    assert firsts <= set(top3) and len(firsts) > 1


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


def greedy_penalized(model, prompt, n, frequency, presence):
    """Reference for OpenAI's penalties: full recompute, then logit - frequency x count - presence x seen
    over the tokens generated so far, then argmax."""
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids)[0, -1].clone()
            for t in set(out):
                logits[t] -= frequency * out.count(t) + presence
            out.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


def test_frequency_and_presence_penalties(model):
    x = torch.zeros(4)  # hand-computed: token 1 twice, token 2 once, token 3 inserted tool output (mask 0)
    penalize(x, [1, 1, 2, 3], [1, 1, 1, 0], 0.5, 0.25)
    assert x.tolist() == [0.0, -(2 * 0.5 + 0.25), -(0.5 + 0.25), 0.0]
    eng = Engine(model)
    plain = eng.generate(PROMPTS, max_tokens=24, temperature=0)
    assert any(len(set(c.tokens)) < len(c.tokens) for c in plain)  # precondition: greedy repeats itself
    for fp, pp in ((0.0, 2.0), (1.5, 0.0), (0.7, 0.4), (-1.0, 0.0)):
        outs = eng.generate(PROMPTS, max_tokens=24, temperature=0, frequency_penalty=fp, presence_penalty=pp)
        for p, c in zip(PROMPTS, outs):
            assert c.tokens == greedy_penalized(model, p, 24, fp, pp), (fp, pp)
    # per request: a penalized request beside an unpenalized one in the same batch gets its own reply
    batch = eng.batch()
    a = batch.add(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, presence_penalty=2.0))
    b = batch.add(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0))
    while batch:
        batch.step()
    assert a.completions[0].tokens == greedy_penalized(model, PROMPTS[0], 24, 0.0, 2.0)
    assert b.completions[0].tokens == plain[0].tokens
    with pytest.raises(ChatforgeError, match=r"in \[-2, 2\]"):
        eng.generate(PROMPTS[:1], max_tokens=2, frequency_penalty=2.5)


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


def test_weights_follow_in_place_updates(model):
    """The engine keeps the model's inference weights (a copy) between calls; an in-place update (an RL
    step between two generate calls) must reach the next call."""
    m = random_model(512, seed=3)
    eng = Engine(m)
    before = eng.generate([[1, 2, 3]], max_tokens=5, temperature=0)[0].tokens
    assert before == greedy_reference(m, [1, 2, 3], 5)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p)) if p.ndim == 2 else None
    after = eng.generate([[1, 2, 3]], max_tokens=5, temperature=0)[0].tokens
    assert after == greedy_reference(m, [1, 2, 3], 5) and after != before


def test_kv_bytes_match_the_cache_under_bf16_autocast(model):
    """kv_bytes_per_token is what the cache really holds per token per row: float32 by default on
    CPU, bf16 under autocast (keys and values both: before the RMSNorm fix the keys were float32)."""
    for dtype, size in ((None, 4), (torch.bfloat16, 2)):
        eng = Engine(model, dtype=dtype)
        batch = eng.batch()
        batch.add(PROMPTS[0], max_tokens=6, temperature=0)
        batch.add(PROMPTS[1], max_tokens=6, temperature=0)
        batch.step()
        k, v = batch.cache.k, batch.cache.v
        assert k.dtype == v.dtype == (dtype or torch.float32)
        assert eng.kv_bytes_per_token() == 2 * 2 * 2 * 16 * size
        assert k.nbytes + v.nbytes == eng.kv_bytes_per_token() * 2 * batch.cache.max_len
        while batch:
            batch.step()


# ----------------------------------------------------------------------------------------------
# Continuous batching: requests admitted into a running batch, cancelled, queued


def drive(batch, schedule: dict, steps: int = 1000) -> list:
    """Step the batch; at step i first run schedule[i]() (adds, cancels). Returns, per step, the
    running rows and the cache's filled slots after it."""
    trace = []
    for i in range(steps):
        if i in schedule:
            schedule[i]()
        if not batch and max(schedule) <= i:
            break
        batch.step()
        trace.append((len(batch), batch.cache.pos if batch.cache is not None else None))
    return trace


def test_requests_admitted_mid_flight_match_alone(model):
    """Greedy requests admitted into a running batch (shorter and longer prompts than the batch's
    filled slots, n=2) produce exactly their tokens alone, by full recomputation. One long reply
    outlives a long prompt's request, so the cache's common padding is trimmed to stay in context."""
    eng = Engine(model)
    batch = eng.batch()
    g = torch.Generator().manual_seed(9)
    long_prompt = torch.randint(0, 512, (100,), generator=g).tolist()
    reqs = {}
    schedule = {
        0: lambda: reqs.update(a=batch.add(PROMPTS[1], max_tokens=120, temperature=0)),  # 2 + 120 < 128
        3: lambda: reqs.update(b=batch.add(PROMPTS[2], max_tokens=9, temperature=0)),  # 13 tokens > 5 slots
        5: lambda: reqs.update(c=batch.add(PROMPTS[3], max_tokens=7, n=2, temperature=0)),  # shorter
        10: lambda: reqs.update(d=batch.add(long_prompt, max_tokens=50, temperature=0)),  # context: 28 left
    }
    sizes, trims = zip(*drive(batch, schedule))
    prompts = {"a": PROMPTS[1], "b": PROMPTS[2], "c": PROMPTS[3], "d": long_prompt}
    for name, r in reqs.items():
        ref = greedy_reference(model, prompts[name], r.params.max_tokens)
        for c in r.completions:
            assert c.tokens == ref, name
        assert r.status == "finished"
    assert len(reqs["d"].completions[0].tokens) == 28 and reqs["d"].completions[0].finish_reason == "length"
    assert max(sizes) == 5 and sizes[-1] == 0
    assert any(p is not None and q is not None and q < p for p, q in zip(trims, trims[1:]))  # trim_left ran
    assert max(p for p in trims if p is not None) <= model.config.max_seq_len


def test_cancel_frees_rows_and_queue_waits_for_room(model):
    eng = Engine(model)
    batch = eng.batch(max_batch_size=3)
    a = batch.add(PROMPTS[0], max_tokens=20, temperature=0)
    b = batch.add(PROMPTS[1], max_tokens=20, temperature=0, n=2)
    c = batch.add(PROMPTS[2], max_tokens=6, temperature=0)  # waits: 3 rows are taken
    batch.step()
    assert len(batch) == 3 and batch.cache.batch_size == 3 and c.status == "waiting"
    batch.step()
    batch.cancel(b)  # its 2 rows leave the batch and the cache now
    assert len(batch) == 1 and batch.cache.batch_size == 1 and b.status == "cancelled"
    assert [x.finish_reason for x in b.completions] == ["cancelled"] * 2 and len(b.completions[0].tokens) == 2
    events = batch.step()  # c is admitted
    assert {(e.request.id, e.index) for e in events} == {(a.id, 0), (c.id, 0)} and len(batch) == 2
    waiting = batch.add(PROMPTS[3], max_tokens=5)
    batch.cancel(waiting)
    batch.cancel(waiting)  # no-op once done
    while batch:
        batch.step()
    assert a.completions[0].tokens == greedy_reference(model, PROMPTS[0], 20)
    assert c.completions[0].tokens == greedy_reference(model, PROMPTS[2], 6)
    assert waiting.completions[0].tokens == [] and waiting.status == "cancelled"
    with pytest.raises(ChatforgeError, match="more than the batch holds"):
        batch.add(PROMPTS[0], n=4)
    with pytest.raises(ChatforgeError, match="outside the model's vocabulary"):
        batch.add([1, 512])
    with pytest.raises(ChatforgeError, match="top_p"):
        batch.add([1, 2], top_p=0)


def test_per_request_sampling_params(model):
    """Each request keeps its own settings in a shared batch: a seeded request samples the same
    tokens alone and next to others (its own random stream), greedy rows stay greedy, stops apply
    per request."""
    eng = Engine(model)
    p = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, seed=123)
    alone = eng.batch()
    r = alone.add(PROMPTS[0], p)
    while alone:
        alone.step()
    batch = eng.batch()
    others = [batch.add(PROMPTS[1], max_tokens=12, temperature=1.3, seed=5),
              batch.add(PROMPTS[2], max_tokens=12, temperature=0)]
    batch.step()
    r2 = batch.add(PROMPTS[0], p)
    ref = greedy_reference(model, PROMPTS[2], 12)
    stopper = batch.add(PROMPTS[2], max_tokens=12, temperature=0, stop_tokens=[ref[3]])
    while batch:
        batch.step()
    assert r2.completions[0].tokens == r.completions[0].tokens
    assert r.completions[0].tokens != greedy_reference(model, PROMPTS[0], 12)  # it did sample
    assert others[1].completions[0].tokens == ref
    cut = ref.index(ref[3]) + 1
    assert stopper.completions[0].tokens == ref[:cut] and stopper.completions[0].finish_reason == "stop"


# ----------------------------------------------------------------------------------------------
# A batch with tool use on the real model


def test_batched_tool_use_on_the_real_model(tok):
    """One batch, a real (random-weight) model: row 0 calls the python tool and is fed its output
    while the other rows keep sampling, a row finishes and is compacted out during that output,
    and every row gets exactly the tokens of running it alone (full recomputation, the tool output
    inserted by the reference). The model is steered to make the call by giving <|python_start|>
    and <|python_end|> head rows just above those of tokens it would write at that point."""
    sp = tok.special
    PS, PE, OS, OE = (sp(s) for s in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"))
    g = torch.Generator().manual_seed(0)
    prompts = [[tok.bos_id] + torch.randint(0, 256, (L,), generator=g).tolist() for L in (5, 9, 3, 12)]
    tools = {"python": Tool("python", "py", lambda code: "forty two")}
    out_ids = tok.encode("forty two")
    # Steering needs a random model where it makes exactly the scenario: row 0 calls the tool once, the
    # other rows call none, and row 2 has a token of its own to stop on while row 0 is inside its tool
    # output. Whether a given random model does depends on the vocabulary (the protocol's special tokens),
    # so take the first seed that does rather than one hard-coded seed.
    for seed in range(20):
        model = random_model(tok.vocab_size, seed=seed)
        plain = Engine(model, tok, tools={})
        first = plain.generate(prompts[:1], max_tokens=30, temperature=0, stop_tokens=[])[0].tokens
        with torch.no_grad():
            model.lm_head.weight[PS] = model.lm_head.weight[first[1]] * 1.5  # python_start where it wrote first[1]
            steered = plain.generate(prompts[:1], max_tokens=30, temperature=0, stop_tokens=[])[0].tokens
            if PS not in steered or steered.index(PS) + 3 >= len(steered):
                continue
            model.lm_head.weight[PE] = model.lm_head.weight[steered[steered.index(PS) + 3]] * 1.5
        refs = [greedy_reference(model, p, 30, tool=(PS, PE, OS, OE, out_ids)) for p in prompts]
        if OS not in refs[0] or refs[0].count(PS) != 1 or any(PS in r for r in refs[1:]):
            continue
        s = refs[0].index(OS)
        if refs[0][s:s + len(out_ids) + 2] != [OS, *out_ids, OE]:
            continue
        # row 2 stops on a token it writes while row 0 is inside its tool output (and not earlier)
        stop = next((t for t in refs[2][s:s + len(out_ids) + 2] if t not in refs[2][:s] and t not in refs[0]
                     and all(t not in r for r in (refs[1], refs[3]))), None)
        if stop is not None:
            break
    else:
        pytest.fail("no random model in 20 seeds makes the scenario")
    refs[2] = refs[2][:refs[2].index(stop) + 1]
    eng = Engine(model, tok, tools=tools)
    batch = eng.batch()
    reqs = [batch.add(p, max_tokens=30, temperature=0, stop_tokens=[stop]) for p in prompts]
    trace = []
    while batch:
        trace.append((len(batch), batch.step()))
    for r, ref in zip(reqs, refs):
        assert r.completions[0].tokens == ref
    assert [len(r.completions[0].tool_calls) for r in reqs] == [1, 0, 0, 0]
    assert reqs[0].completions[0].tool_calls[0].output == "forty two"
    # the scenario happened: while row 0 was fed forced tokens, other rows sampled and row 2 finished
    forced_steps = [i for i, (_, evs) in enumerate(trace) if any(e.request is reqs[0] and not e.sampled for e in evs)]
    assert len(forced_steps) == len(out_ids) + 2
    for i in forced_steps:
        assert sum(e.sampled for e in trace[i][1]) >= 2
    fin = next(i for i, (_, evs) in enumerate(trace) if any(e.request is reqs[2] and e.finish_reason for e in evs))
    assert fin in forced_steps and trace[fin + 1][0] == 3  # compacted out: the next step runs 3 rows


# ----------------------------------------------------------------------------------------------
# Control tokens in an assistant turn


def test_control_tokens_are_masked_in_chat_replies(tok):
    """A model that prefers every control token (a bias of +100 and more on them) still writes only text,
    <|assistant_end|> and, with tools on, well-formed calls in a chat reply; raw prompts keep them."""
    sp = tok.special_tokens
    base = random_model(tok.vocab_size, seed=1)
    forbidden = ["<|bos|>", "<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>",
                 "<|assistant_start|>", "<|output_start|>", "<|output_end|>"]
    tool_tokens = ["<|python_start|>", "<|python_end|>", "<|search_start|>", "<|search_end|>"]
    bias = torch.zeros(tok.vocab_size)
    for i, name in enumerate(forbidden + tool_tokens):
        bias[sp[name]] = 100.0 + 50.0 * i  # the later in the list, the more preferred
    model = BiasedModel(base, bias)
    chat = tok.render_prompt([{"role": "user", "content": "hi"}])
    raw = tok.encode("the cat sat", bos=True)
    text_only = set(range(tok.vocab_size)) - {sp[s] for s in forbidden + tool_tokens}

    off = Engine(model, tok, tools={})
    [c] = off.generate([chat], max_tokens=12, temperature=0)
    assert c.finish_reason == "length" and set(c.tokens) <= text_only
    samples = off.generate([chat], n=4, max_tokens=12, temperature=1.0, seed=0)
    assert all(set(c.tokens) <= text_only for c in samples)
    [r] = off.generate([raw], max_tokens=3, temperature=0, stop_tokens=[])  # raw text: nothing masked
    assert r.tokens[0] == sp["<|search_end|>"]
    [r] = off.generate([raw], max_tokens=6, temperature=0, stop_tokens=[], mask_control=True)
    assert set(r.tokens) <= text_only
    [c] = off.generate([chat], max_tokens=3, temperature=0, mask_control=False)
    assert c.tokens[0] == sp["<|search_end|>"]

    # tools on: outside a call no end token; inside a call only its own end token; never output tokens
    calls = []
    tools = {"python": Tool("python", "py", lambda a: calls.append(a) or "1"),
             "search": Tool("search", "s", lambda a: calls.append(a) or "2")}
    on = Engine(model, tok, tools=tools)
    [c] = on.generate([chat], max_tokens=40, temperature=0, max_tool_calls=9)
    sampled = [t for t, m in zip(c.tokens, c.mask) if m]
    assert not {sp[s] for s in forbidden} & set(sampled)
    assert c.tokens[:2] == [sp["<|search_start|>"], sp["<|search_end|>"]]  # its favourite pair, well formed
    assert len(c.tool_calls) >= 3 and all(not t.error for t in c.tool_calls)
    msgs = tok.parse_conversation(chat + c.tokens)
    assert [m["role"] for m in msgs][:3] == ["user", "assistant", "tool"]


def test_chat_prompt_detection(tok):
    eng = Engine(random_model(tok.vocab_size), tok)
    user = [{"role": "user", "content": "hi"}]
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "python", "arguments": "1"}]}
    assert eng.is_chat_prompt(tok.render_prompt(user))
    assert eng.is_chat_prompt(tok.render_prompt(user + [call, {"role": "tool", "content": "1"}]))  # mid-turn
    assert not eng.is_chat_prompt(tok.encode("plain text", bos=True))
    assert not eng.is_chat_prompt(tok.render_conversation(user + [{"role": "assistant", "content": "x"}])[0])
