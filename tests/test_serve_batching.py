"""The three scheduling policies on the same engine: replies are identical, and only continuous
batching lets a short request that arrives during a long one finish first."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from chatforge.config import ServeConfig
from chatforge.engine import Engine
from chatforge.serve import create_app
from engine_helpers import random_model, train_tokenizer
from serve_helpers import serve

LONG, SHORT = "the cat sat on", "six times seven is"


@pytest.fixture(scope="module")
def engine():
    tok = train_tokenizer(512)
    return Engine(random_model(tok.vocab_size, max_seq_len=256), tok, tools={})


@pytest.mark.parametrize("policy", ["continuous", "static", "none"])
def test_short_request_during_a_long_one(engine, policy):
    tok = engine.tok
    [long_alone] = engine.generate([tok.encode(LONG, bos=True)], max_tokens=200, temperature=0)
    [short_alone] = engine.generate([tok.encode(SHORT, bos=True)], max_tokens=6, temperature=0)
    assert long_alone.finish_reason == "length", "precondition: the long prompt runs to max_tokens"
    app = create_app(engine, ServeConfig(checkpoint="unused", batching=policy), model_name="m")
    done: dict[str, float] = {}

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async def short():
                r = await http.post("/v1/completions", json={"model": "m", "prompt": SHORT, "max_tokens": 6,
                                                            "temperature": 0})
                done["short"] = time.perf_counter()
                return r.json()["choices"][0]["text"]

            body = {"model": "m", "prompt": LONG, "max_tokens": 200, "temperature": 0, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as r:
                lines = r.aiter_lines()
                first = await lines.__anext__()  # the long reply is being decoded
                task = asyncio.create_task(short())
                text = first
                async for line in lines:
                    text += line + "\n"
                done["long"] = time.perf_counter()
            return text, await task

    with serve(app) as url:
        stream, short_text = asyncio.run(scenario(url))
        stats = app.state.server.scheduler.stats
    import json

    chunks = [json.loads(l[6:]) for l in stream.split("\n") if l.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == long_alone.text
    assert short_text == short_alone.text  # the same replies under every policy
    if policy == "continuous":
        assert done["short"] < done["long"] and stats.max_rows == 2  # admitted into the running batch
    else:
        assert done["short"] > done["long"] and stats.max_rows == 1  # waited for the long one to end


def test_cancel_in_a_running_batch_and_recovery_from_a_failed_step(engine, monkeypatch):
    """Clients that leave while others decode beside them: their rows leave the batch (and its KV
    cache) and the others' replies are unchanged. A step that raises fails only the requests in the
    batch then (500), and the server goes on serving."""
    tok = engine.tok
    prompts = [LONG, SHORT, "a river", "paris london"]
    alone = [engine.generate([tok.encode(p, bos=True)], max_tokens=120, temperature=0)[0].text for p in prompts]
    app = create_app(engine, ServeConfig(checkpoint="unused"), model_name="m")
    sched = app.state.server.scheduler

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async def full(p):
                r = await http.post("/v1/completions", json={"model": "m", "prompt": p, "max_tokens": 120,
                                                            "temperature": 0})
                return r.json()["choices"][0]["text"]

            async def leave(p):
                body = {"model": "m", "prompt": p, "max_tokens": 120, "temperature": 0, "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    lines = r.aiter_lines()
                    for _ in range(6):
                        await lines.__anext__()  # it is in the batch, decoding; then the client goes away

            return await asyncio.gather(full(prompts[0]), leave(prompts[1]), full(prompts[2]), leave(prompts[3]))

    with serve(app) as url:
        got = asyncio.run(scenario(url))
        assert [got[0], got[2]] == [alone[0], alone[2]]
        deadline = time.monotonic() + 5
        while (sched.stats.cancelled < 2 or sched.stats.running) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sched.stats.cancelled == 2 and sched.stats.running == 0 and sched.stats.failed == 0
        assert sched.stats.max_rows >= 3

        from chatforge.engine import Batch

        real_step, calls = Batch.step, []

        def failing_once(self):
            if not calls:
                calls.append(1)
                raise RuntimeError("device lost")
            return real_step(self)

        monkeypatch.setattr(Batch, "step", failing_once)
        body = {"model": "m", "prompt": SHORT, "max_tokens": 6, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone_short(engine)
        h = httpx.get(url + "/health")
        assert h.status_code == 200 and h.json()["failed"] == 1


def alone_short(engine):
    return engine.generate([engine.tok.encode(SHORT, bos=True)], max_tokens=6, temperature=0)[0].text


def test_continuous_admission_comes_in_groups(monkeypatch):
    """A running batch takes waiting requests once a quarter of its rows are free (each admission is a
    prefill forward and a KV-cache copy); with fewer waiting than that, also once the oldest waited
    ADMIT_WAIT_S; an idle batch takes them at once."""
    from types import SimpleNamespace

    from chatforge.serve import scheduler as S

    sch = S.Scheduler(engine=None, policy="continuous", max_batch_size=16)
    now = [100.0]
    monkeypatch.setattr(S.time, "perf_counter", lambda: now[0])

    def wait(k, age):
        sch._waiting.extend(SimpleNamespace(params=S.GenParams(max_tokens=8), t_submit=now[0] - age) for _ in range(k))

    wait(6, 0.0)
    assert sch._admit(rows=14, busy=True) == []  # 2 free, 6 waiting: wait for a group of 4
    assert len(sch._admit(rows=12, busy=True)) == 4  # 4 free: the group joins
    sch._waiting.clear()
    wait(2, 0.0)
    assert sch._admit(rows=15, busy=True) == []  # light load, but only just arrived
    now[0] += 2 * S.ADMIT_WAIT_S
    assert len(sch._admit(rows=15, busy=True)) == 1  # waited long enough: what fits joins
    assert len(sch._admit(rows=0, busy=False)) == 1  # an idle batch never waits
