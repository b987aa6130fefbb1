"""`chatforge serve`: the OpenAI-compatible API driven by the official `openai` client and raw HTTP,
on a tiny random-weight model, server on 127.0.0.1 in a thread. Replies are checked against the
engine run directly on the same prompt (greedy), so the server must return exactly what the model
wrote; bad requests must get OpenAI's error shape and the right status, and the server must keep
serving after each."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from chatforge.config import ServeConfig
from chatforge.engine import Engine
from chatforge.serve import create_app
from engine_helpers import random_model, train_tokenizer
from serve_helpers import serve

MODEL = "tiny-test"
USER = [{"role": "user", "content": "what is the capital of france?"}]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(512)


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(random_model(tok.vocab_size, max_seq_len=256), tok, tools={})


@pytest.fixture(scope="module")
def base(engine):
    cfg = ServeConfig(checkpoint="unused", max_batch_size=8, max_tokens=40)
    with serve(create_app(engine, cfg, model_name=MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)


def greedy(engine, prompt, max_tokens, chat=True):
    [c] = engine.generate([prompt], max_tokens=max_tokens, temperature=0)
    specials = set(engine.tok.special_tokens.values())
    body = c.tokens[:-1] if c.finish_reason == "stop" else c.tokens
    if chat:  # (completions show control tokens as their text, as the engine's text does)
        assert not specials & set(body), "precondition: the random model's greedy reply has no control tokens"
    return c


def test_chat_non_streaming_is_the_engines_reply(client, engine, tok):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=24, temperature=0)
    prompt = tok.render_prompt(USER)
    c = greedy(engine, prompt, 24)
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content == c.text
    assert choice.finish_reason == c.finish_reason and r.object == "chat.completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(c.tokens)
    assert r.usage.total_tokens == len(prompt) + len(c.tokens)
    # max_completion_tokens is the newer name of the same limit; the default comes from --max_tokens (40)
    r2 = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=24, temperature=0)
    assert r2.choices[0].message.content == c.text
    r3 = client.chat.completions.create(model=MODEL, messages=USER, temperature=0)
    assert r3.choices[0].message.content == greedy(engine, prompt, 40).text


def test_chat_streaming_matches_and_ends_with_done(client, base, engine, tok):
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    c = greedy(engine, tok.render_prompt(USER), 30)
    assert text == c.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [c.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(c.tokens)
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # streamed, not one blob
    # the raw wire format: server-sent events, the last one `data: [DONE]`
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": USER, "max_tokens": 5, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])  # no include_usage: no usage field


def test_completions_for_base_models(client, engine, tok):
    prompts = ["the cat sat on", "six times seven is"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.object == "text_completion"
    for i, p in enumerate(prompts):
        want = greedy(engine, tok.encode(p, bos=True), 12, chat=False)
        assert r.choices[2 * i].text == r.choices[2 * i + 1].text == want.text  # greedy: both samples agree
    assert r.usage.prompt_tokens == sum(len(tok.encode(p, bos=True)) for p in prompts)
    stream = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text
    echo = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=12, temperature=0, echo=True)
    assert echo.choices[0].text == prompts[0] + r.choices[0].text
    # default max_tokens is OpenAI's 16 for completions
    assert client.completions.create(model=MODEL, prompt=prompts[0], temperature=0).usage.completion_tokens <= 16


def test_stop_strings_cut_streamed_and_final_text_alike(client, engine, tok):
    full = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    assert len(text) > 12, "precondition: a reply long enough to cut"
    stop = text[8:11]
    want = text[:text.find(stop)]
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=30, temperature=0, stop=[stop, "@@@@"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=30, temperature=0, stop=stop,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want  # nothing leaked


def test_sampling_seed_n_and_temperature(client):
    kw = dict(model=MODEL, messages=USER, max_tokens=16, temperature=1.0, top_p=0.9, n=3, seed=11)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: reproducible
    assert len({c.message.content for c in a.choices}) > 1  # n samples, not one copied
    other = client.chat.completions.create(**{**kw, "seed": 12})
    assert [c.message.content for c in other.choices] != [c.message.content for c in a.choices]


def test_penalties_reach_the_engine(client, engine, tok):
    """OpenAI's frequency_penalty / presence_penalty: the reply is the engine's with the same penalties."""
    prompt = tok.render_prompt(USER)
    [want] = engine.generate([prompt], max_tokens=24, temperature=0, frequency_penalty=1.2, presence_penalty=0.5)
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=24, temperature=0,
                                       frequency_penalty=1.2, presence_penalty=0.5)
    assert r.choices[0].message.content == want.text
    assert want.tokens != greedy(engine, prompt, 24).tokens  # precondition: the penalties change this reply


def test_models_and_health(client, base, engine):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert models.data[0].model_extra["max_model_len"] == engine.config.max_seq_len
    h = httpx.get(base + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL and h["finished"] >= 1 and h["failed"] == 0


def post(base, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(base + "/v1/chat/completions", content=data, headers=headers, timeout=60, **kw)


def ok(**kw):
    return {"model": MODEL, "messages": USER, "max_tokens": 4, **kw}


BAD = [  # (body, status, param, words in the message)
    (b'{"model": "tiny-test", "messages": [', 400, None, "not valid JSON"),
    (b"\xff\xfe", 400, None, "UTF-8"),
    (b"[1, 2]", 400, None, "JSON object"),
    (b"[" * 200_000, 400, None, "nests too deeply"),
    ({"messages": USER}, 400, "model", "'model' is required"),
    ({"model": "gpt-4", "messages": USER}, 404, "model", "does not exist"),
    (ok(messages=[]), 400, "messages", "empty"),
    (ok(messages="hello"), 400, "messages", "must be a list"),
    (ok(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", "one of system"),
    (ok(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", "string"),
    (ok(messages=[{"role": "user"}]), 400, "messages[0].content", "required"),
    (ok(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages[0].content[0]", "text only"),
    (ok(messages=[{"role": "tool", "content": "42"}]), 400, "messages", "must follow an assistant tool call"),
    (ok(temperature="hot"), 400, "temperature", "number"),
    (ok(temperature=3), 400, "temperature", "between 0 and 2"),
    (ok(top_p=0), 400, "top_p", "above 0"),
    (ok(max_tokens=0), 400, "max_tokens", "between 1"),
    (ok(max_tokens=2.5), 400, "max_tokens", "integer"),
    (ok(max_tokens=True), 400, "max_tokens", "boolean"),
    (ok(max_tokens=100_000), 400, "max_tokens", "maximum context length is 256"),
    (ok(messages=[{"role": "user", "content": "cat " * 400}]), 400, "messages", "maximum context length is 256"),
    (ok(n=0), 400, "n", "between 1 and 8"),
    (ok(n=9), 400, "n", "between 1 and 8"),
    (ok(stop=[""]), 400, "stop", "empty"),
    (ok(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    (ok(stop=5), 400, "stop", "string or a list"),
    (ok(stream="yes"), 400, "stream", "true or false"),
    (ok(stream_options={"include_usage": True}), 400, "stream_options", "only allowed with 'stream': true"),
    (ok(seed="x"), 400, "seed", "integer"),
    (ok(logprobs=True), 400, "logprobs", "not supported"),
    (ok(frequency_penalty=2.5), 400, "frequency_penalty", "between -2 and 2"),
    (ok(presence_penalty="much"), 400, "presence_penalty", "number"),
    (ok(tools="none"), 400, "tools", "must be a list"),
    (ok(tools=[{"type": "function", "function": {"description": "no name"}}]), 400, "tools[0]", "name"),
    (ok(tool_choice="required"), 400, "tool_choice", "not supported"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(base, body, status, param, words):
    r = post(base, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert words in err["message"], err["message"]
    assert err["type"] == "invalid_request_error"
    assert post(base, ok()).status_code == 200  # and the server still serves


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "cat " * 400}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError, match="between 1 and"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=MODEL, prompt="")


def test_body_size_content_type_routes(base):
    big = json.dumps(ok(messages=[{"role": "user", "content": "x" * 1_100_000}]))
    r = post(base, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while the body is read
        for _ in range(40):
            yield b" " * 50_000

    r = httpx.post(base + "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over 1000000 bytes" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/chat/completions", content=json.dumps(ok()), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = httpx.get(base + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    for path in ("/v1/nothing", "/static/../../etc/passwd", "/static/%2e%2e%2fapp.py", "/static/chat.py"):
        r = httpx.get(base + path)
        assert r.status_code == 404 and "error" in r.json(), path
    assert post(base, ok()).status_code == 200


def test_host_header_guard(base):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        r = httpx.get(base + "/v1/models", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    port = base.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert httpx.get(base + "/v1/models", headers={"Host": host}).status_code == 200


def test_api_key(engine, tok):
    cfg = ServeConfig(checkpoint="unused", api_key="s3cret-key", max_tokens=4)
    with serve(create_app(engine, cfg, model_name=MODEL)) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                        {"Authorization": "Bearer s3cret-ke"}):
            r = httpx.get(url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
            assert post(url, ok(), headers=headers).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=USER, max_tokens=3).choices[0].message.content
        assert httpx.get(url + "/health").status_code == 200  # liveness needs no key
        assert httpx.get(url + "/").status_code == 200  # the UI page asks for the key itself


def test_ui_is_served_offline_with_a_strict_policy(base):
    r = httpx.get(base + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    for name in ("chat.js", "chat.css"):
        asset = httpx.get(f"{base}/static/{name}")
        assert asset.status_code == 200 and asset.text
    import re

    from chatforge.serve.app import STATIC_FILES
    for name in STATIC_FILES:  # no CDN, no remote fonts: nothing the page loads is off this server
        text = httpx.get(f"{base}/static/{name}").text
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), name
        assert "@import" not in text and "innerHTML" not in text, name


def test_concurrent_clients_get_what_each_would_get_alone(base, engine, tok):
    """12 clients at once on a batch of 8: requests wait, join the running batch at step boundaries and
    leave it when done; every reply is still the one the engine gives that prompt alone."""
    import asyncio

    questions = [f"question {i}: " + " ".join(["what is the capital of france"] * (i % 4 + 1)) for i in range(12)]
    lengths = [5 + 7 * (i % 5) for i in range(12)]

    async def ask(client, q, n):
        r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                 max_tokens=n, temperature=0)
        return r.choices[0].message.content

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(ask(client, q, n) for q, n in zip(questions, lengths)))

    before = httpx.get(base + "/health").json()
    got = asyncio.run(all_at_once())
    for q, n, text in zip(questions, lengths, got):
        [c] = engine.generate([tok.render_prompt([{"role": "user", "content": q}])], max_tokens=n, temperature=0)
        assert text == c.text, q
    h = httpx.get(base + "/health").json()
    assert h["batching"] == "continuous" and h["max_rows"] > 1 and h["finished"] - before["finished"] == 12
    assert h["running"] == h["waiting"] == 0


def test_cli_serve_loads_a_checkpoint(tmp_path, tok, monkeypatch, capsys):
    """`chatforge serve CHECKPOINT --flags`: the checkpoint's engine behind the app uvicorn is given."""
    import uvicorn

    from chatforge.cli import main
    from engine_helpers import make_checkpoint

    tok.save(tmp_path / "tok")
    ckpt = make_checkpoint(tmp_path / "myrun" / "sft" / "checkpoint", tmp_path / "tok", tok.vocab_size, max_seq_len=64)
    seen = {}

    def fake_run(app, host, port, **kw):  # instead of serving forever: one request, then return
        seen.update(host=host, port=port)
        with serve(app) as url:
            seen["models"] = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
            seen["no_key"] = httpx.get(url + "/v1/models").status_code

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.delenv("CHATFORGE_API_KEY", raising=False)
    assert main(["serve", str(ckpt), "--port", "9123", "--api_key", "k", "--batching", "static", "--threads", "1",
                 "--tools", "false"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 9123 and seen["no_key"] == 401
    card = seen["models"]["data"][0]
    assert card["id"] == "myrun-sft" and card["max_model_len"] == 64 and card["tools"] == []
    assert "http://127.0.0.1:9123/v1" in capsys.readouterr().out
    monkeypatch.setenv("CHATFORGE_API_KEY", "from-env")  # the key can come from the environment (not argv)
    assert main(["serve", str(ckpt), "--batching", "static", "--threads", "1"]) == 0
    assert seen["no_key"] == 401 and seen["models"]["error"]["code"] == "invalid_api_key"
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["serve", str(ckpt), "--batching", "sometimes", "--threads", "1"]) == 2
    assert "--batching sometimes" in capsys.readouterr().err
