"""The HTTP app: OpenAI-compatible routes, the web chat UI, and the guards in front of them.

    app = create_app(engine, ServeConfig(checkpoint=...))   # a FastAPI app; uvicorn runs it

Routes
    POST /v1/chat/completions   chat (stream: server-sent events ending in `data: [DONE]`)
    POST /v1/completions        plain text completion, for base models
    GET  /v1/models[/{id}]      the one model served
    GET  /health                liveness + the scheduler's counters (no key needed)
    GET  /  and /static/<name>  the web chat UI (files shipped in this package, read once at start)

Guards, in order (`Guard`, a plain ASGI middleware, answers before any route runs):
    Host header       while bound to a loopback address, only localhost / 127.0.0.1 / [::1] hosts are
                      served: a web page elsewhere cannot reach this server by DNS rebinding.
    API key           with --api_key (or $CHATFORGE_API_KEY), /v1 requires `Authorization: Bearer KEY`,
                      compared in constant time (hmac.compare_digest).
    body size         Content-Length above --max_request_bytes is refused (413) unread; a body sent
                      without a length is counted while it is read and refused at the limit.
    content type      POST bodies must be application/json. A cross-site form or fetch cannot send
                      that without a CORS preflight, which this server never approves, so another web
                      page open in the user's browser cannot make it generate (CSRF).
No endpoint takes a file name from the client: the UI's files are a fixed table in memory.

Errors are OpenAI's JSON error object (serve/protocol.py) with the matching status: 400 bad request,
401 key, 403 host, 404 unknown route or model, 405 method, 413 too large, 415 not JSON, 429 queue
full, 500 the model wrote an invalid function call or generation failed.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.common import ChatforgeError
from chatforge.serve.protocol import APIError, bad, parse_chat, parse_completion, parse_json
from chatforge.serve.reply import ProtocolTokens, ReplyBuilder
from chatforge.serve.scheduler import GenParams, Job, QueueFull, Scheduler

STATIC_FILES = {"index.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
                "chat.css": "text/css; charset=utf-8"}
# The UI's pages may load only this server's own files and talk only to it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Guard:
    """ASGI middleware: Host check, API key, Content-Length limit (see the module docstring)."""

    def __init__(self, app, api_key: str = "", max_bytes: int = 1_000_000, loopback_only: bool = True):
        self.app, self.key, self.max_bytes, self.loopback_only = app, api_key.encode(), max_bytes, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        err = self.check(scope, headers)
        if err is not None:
            return await error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)

    def check(self, scope, headers: dict) -> APIError | None:
        if self.loopback_only:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
            if not is_loopback(name):
                return APIError(403, f"Host {host!r} is not this server's name: it serves localhost only. Use "
                                     f"http://127.0.0.1:<port>, or start it with --host to serve other names",
                                code="host_not_allowed")
        if self.key and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):  # constant time: no key guessing by timing
                what = "Incorrect API key provided" if token else "Missing API key: send 'Authorization: Bearer KEY'"
                return APIError(401, f"{what}. This server was started with --api_key.", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return APIError(400, "the Content-Length header is not a number")
            if n > self.max_bytes:
                return APIError(413, f"the request body is {n} bytes; this server accepts at most {self.max_bytes} "
                                     f"(--max_request_bytes)", code="request_too_large")
        return None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, counted as it arrives (a chunked body has no Content-Length to check first)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type is {ctype or 'missing'!r}; send the JSON body with "
                            f"'Content-Type: application/json'", code="unsupported_media_type")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise APIError(413, f"the request body is over {limit} bytes, this server's limit (--max_request_bytes)",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class Server:
    """What the routes share: the engine, its tokenizer, the scheduler, the settings."""

    def __init__(self, engine, cfg, scheduler: Scheduler, model_name: str):
        self.engine, self.cfg, self.scheduler, self.model_name = engine, cfg, scheduler, model_name
        self.tok = engine.tok
        self.ids = ProtocolTokens(self.tok)
        self.ctx = engine.config.max_seq_len
        self.created = int(time.time())
        self.use_tools = bool(cfg.tools) and engine.tools != {}

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model {model!r} does not exist: this server serves {self.model_name!r} "
                                f"(GET /v1/models)", param="model", code="model_not_found")

    def max_tokens(self, asked: int | None, prompt_len: int, what: str) -> int:
        room = self.ctx - prompt_len
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {self.ctx} tokens. However, your "
                                f"{what} {'is' if what == 'prompt' else 'are'} {prompt_len} tokens, which leaves no "
                                f"room for a reply. Please shorten it.", param=what, code="context_length_exceeded")
        if asked is None:
            return min(self.cfg.max_tokens, room)
        if asked > room:
            raise APIError(400, f"This model's maximum context length is {self.ctx} tokens. However, you requested "
                                f"{prompt_len + asked} tokens ({prompt_len} in the {what}, {asked} in the "
                                f"completion). Please reduce the length of the {what} or the max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return asked

    async def run(self, prompts: list[list[int]], params: GenParams, request: Request):
        """Submit one job per prompt; yields (tag, kind, payload) items until every job is done. The jobs
        are cancelled if the consumer stops early (client gone, error) or the client disconnects."""
        queue: asyncio.Queue = asyncio.Queue()
        jobs = []
        try:
            for i, p in enumerate(prompts):
                jobs.append(self.scheduler.submit(Job(p, params, queue=queue, tag=i)))
        except QueueFull as e:
            for j in jobs:
                self.scheduler.cancel(j)
            raise APIError(429, f"The server is busy: {e}. Retry in a moment.", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ChatforgeError as e:
            for j in jobs:
                self.scheduler.cancel(j)
            raise APIError(503, str(e)) from None
        left = len(jobs)
        checked = time.monotonic()
        try:
            while left:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    item = None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # (a streamed reply also learns it from
                    checked = time.monotonic()                      # Starlette, which stops the stream)
                    if await request.is_disconnected():
                        return
                if item is None:
                    continue
                items = [item]
                while not queue.empty():
                    items.append(queue.get_nowait())
                for it in items:
                    if it[1] != "tokens":
                        left -= 1
                yield items
        finally:
            for j in jobs:
                self.scheduler.cancel(j)


def chunk_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def create_app(engine, cfg, scheduler: Scheduler | None = None, model_name: str = "") -> FastAPI:
    """The FastAPI app serving `engine` with the settings of `cfg` (a ServeConfig). The scheduler is
    started and stopped with the app (pass one to share or inspect it)."""
    if engine.tok is None:
        raise ChatforgeError("the server needs a tokenizer: load the engine with Engine.from_checkpoint")
    scheduler = scheduler or Scheduler(engine, cfg.batching, cfg.max_batch_size, cfg.max_queue)
    srv = Server(engine, cfg, scheduler, model_name or "chatforge")
    max_n = min(cfg.max_n, scheduler.max_batch_size)  # a request's samples decode together
    pkg = resources.files("chatforge.serve") / "static"
    static = {name: (pkg / name).read_bytes() for name in STATIC_FILES}  # read once: no file access per request

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if scheduler._thread is None:
            scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="chatforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        msg = {404: f"no route {request.url.path}; the API is under /v1 (chat/completions, completions, models)",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(APIError(e.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}
                                       .get(e.status_code)))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    # -- UI ----------------------------------------------------------------------------------------

    def static_response(name: str) -> Response:
        if name not in static:
            raise APIError(404, f"no file {name!r}", code="not_found")
        return Response(static[name], media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)

    @app.get("/", include_in_schema=False)
    async def index():
        return static_response("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        return static_response(name)

    # -- info ----------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        body = {"status": "ok" if scheduler.alive else "error: the scheduler thread stopped", "model": srv.model_name,
                "batching": scheduler.policy, **scheduler.stats.as_dict()}
        return JSONResponse(body, status_code=200 if scheduler.alive else 503)

    def model_card() -> dict:
        from chatforge.tools import list_tools

        tools = [] if not srv.use_tools else sorted(engine.tools) if engine.tools else [t.name for t in list_tools()]
        return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "chatforge",
                "max_model_len": srv.ctx, "tools": tools}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        srv.check_model(model_id)
        return model_card()

    # -- chat ------------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat(parse_json(await read_body(request, cfg.max_request_bytes)), max_n)
        s = req.sampling
        srv.check_model(s.model)
        try:
            prompt = await run_in_threadpool(srv.tok.render_prompt, req.messages, req.tools)
        except ChatforgeError as e:  # the chat protocol's own checks (tool results, declared functions, ...)
            where = "tools" if str(e).startswith(("tool ", "functions are given")) else "messages"
            raise bad(where, str(e)) from None
        functions = {(t.get("function") or t)["name"] for t in req.tools or []}
        stop_ids = list(engine.default_stop)
        if srv.ids.fn_end is not None:  # a function call ends the reply; without functions it is cut
            stop_ids.append(srv.ids.fn_end if functions and req.tool_choice == "auto" else srv.ids.fn_start)
        params = GenParams(max_tokens=srv.max_tokens(s.max_tokens, len(prompt), "messages"),
                           temperature=s.temperature, top_k=s.top_k or None,
                           top_p=s.top_p if s.top_p < 1 else None, frequency_penalty=s.frequency_penalty,
                           presence_penalty=s.presence_penalty, seed=s.seed, n=s.n, stop_tokens=tuple(stop_ids),
                           stop_strings=tuple(s.stop), use_tools=srv.use_tools, max_tool_calls=cfg.max_tool_calls)
        fns = functions if req.tool_choice == "auto" else set()
        builders = [ReplyBuilder(srv.tok, srv.ids, s.stop, chat=True, functions=fns) for _ in range(s.n)]
        meta = {"id": chunk_id("chatcmpl"), "created": int(time.time()), "model": srv.model_name}
        items = srv.run([prompt], params, request)
        if s.stream:
            first = await _first(items)  # a queue-full error is still an HTTP status, before the stream starts
            return StreamingResponse(_stream_chat(srv, first, items, builders, meta, s, len(prompt)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            async for batch in items:
                for _, kind, payload in batch:
                    _apply(kind, payload, builders)
        finally:
            await items.aclose()
        for b in builders:
            if b.error:
                raise APIError(500, f"The model produced invalid content: {b.error}. Retry, or rephrase the "
                                    f"request.", code="invalid_model_output")
        choices = []
        for i, b in enumerate(builders):
            c = {"index": i, "message": b.message(), "logprobs": None, "finish_reason": b.finish_reason}
            if b.native_messages() is not None:
                c["chatforge_messages"] = b.native_messages()
            choices.append(c)
        done = sum(b.tokens for b in builders)
        return {**meta, "object": "chat.completion", "choices": choices, "system_fingerprint": None,
                "usage": _usage(len(prompt), done)}

    # -- completions -------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion(parse_json(await read_body(request, cfg.max_request_bytes)), max_n)
        s = req.sampling
        srv.check_model(s.model)
        prompts = [srv.tok.encode(p, bos=True) for p in req.prompts]
        longest = max(prompts, key=len)
        max_tokens = srv.max_tokens(s.max_tokens if s.max_tokens is not None else 16, len(longest), "prompt")
        params = GenParams(max_tokens=max_tokens, temperature=s.temperature, top_k=s.top_k or None,
                           top_p=s.top_p if s.top_p < 1 else None, frequency_penalty=s.frequency_penalty,
                           presence_penalty=s.presence_penalty, seed=s.seed, n=s.n, stop_strings=tuple(s.stop),
                           use_tools=False)
        builders = [ReplyBuilder(srv.tok, srv.ids, s.stop, chat=False) for _ in range(len(prompts) * s.n)]
        meta = {"id": chunk_id("cmpl"), "created": int(time.time()), "model": srv.model_name}
        n_prompt = sum(len(p) for p in prompts)
        items = srv.run(prompts, params, request)
        echo = [p if req.echo else "" for p in req.prompts]
        if s.stream:
            first = await _first(items)
            return StreamingResponse(_stream_text(first, items, builders, meta, s, n_prompt, echo),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            async for batch in items:
                for tag, kind, payload in batch:
                    _apply(kind, payload, builders[tag * s.n:(tag + 1) * s.n])
        finally:
            await items.aclose()
        choices = [{"index": i, "text": echo[i // s.n] + b.text, "logprobs": None, "finish_reason": b.finish_reason}
                   for i, b in enumerate(builders)]
        return {**meta, "object": "text_completion", "choices": choices, "system_fingerprint": None,
                "usage": _usage(n_prompt, sum(b.tokens for b in builders))}

    app.add_middleware(Guard, api_key=cfg.api_key, max_bytes=cfg.max_request_bytes,
                       loopback_only=is_loopback(cfg.host))
    return app


# ----------------------------------------------------------------------------------------------
# Shared pieces of the routes.


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _first(items):
    """The first batch of items, awaited before a stream starts (so 429 is still a status)."""
    try:
        return await items.__anext__()
    except StopAsyncIteration:
        return []


def _apply(kind: str, payload, builders: list[ReplyBuilder]) -> list[tuple[int, str, str, str | None]]:
    """Feed one scheduler item to the builders of its job -> [(sample, part, text, finish)] deltas."""
    out = []
    if kind == "tokens":
        for j, token, sampled, fin in payload:
            b = builders[j]
            if b.finish_reason is not None:
                continue
            out += [(j, part, text, None) for part, text in b.push(token, sampled)]
            if fin is not None:
                out += [(j, part, text, None) for part, text in b.finish(fin)]
                out.append((j, "", "", b.finish_reason))
    elif kind == "done":
        for j, comp in enumerate(payload):
            b = builders[j]
            if b.finish_reason is None:
                out += [(j, part, text, None) for part, text in b.finish(comp.finish_reason or "stop")]
                out.append((j, "", "", b.finish_reason))
    else:
        raise APIError(500, f"generation failed: {payload}" if payload != "cancelled" else "the request was cancelled")
    return out


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _merge(deltas):
    """Consecutive deltas of the same sample and part -> one."""
    out = []
    for d in deltas:
        if out and out[-1][0] == d[0] and out[-1][1] == d[1] and d[3] is None and out[-1][3] is None and d[1]:
            out[-1] = (d[0], d[1], out[-1][2] + d[2], None)
        else:
            out.append(d)
    return out


async def _stream_chat(srv, first, items, builders, meta, s, n_prompt):
    base = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None}
    extra = {"usage": None} if s.include_usage else {}

    def chunk(i, delta, finish=None, **more):
        return _sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish,
                                          **more}], **extra})

    try:
        for i in range(len(builders)):
            yield chunk(i, {"role": "assistant", "content": ""})

        async def batches():
            yield first
            async for b in items:
                yield b

        async for batch in batches():
            deltas = []
            for _, kind, payload in batch:
                deltas += _apply(kind, payload, builders)
            for j, part, text, fin in _merge(deltas):
                b = builders[j]
                if fin is None:
                    yield chunk(j, {"content": text, "chatforge_part": part})
                    continue
                if b.error:
                    err = APIError(500, f"The model produced invalid content: {b.error}. Retry, or rephrase the "
                                        f"request.", code="invalid_model_output")
                    yield _sse(err.body())
                    yield b"data: [DONE]\n\n"
                    return
                more = {"chatforge_messages": b.native_messages()} if b.native_messages() is not None else {}
                delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(b.tool_calls)]} if b.tool_calls else {}
                yield chunk(j, delta, b.finish_reason, **more)
        if s.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(n_prompt, sum(b.tokens for b in builders))})
        yield b"data: [DONE]\n\n"
    except APIError as e:
        yield _sse(e.body())
        yield b"data: [DONE]\n\n"
    finally:
        await items.aclose()


async def _stream_text(first, items, builders, meta, s, n_prompt, echo):
    base = {**meta, "object": "text_completion", "system_fingerprint": None}
    extra = {"usage": None} if s.include_usage else {}

    def chunk(i, text, finish=None):
        return _sse({**base, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}],
                     **extra})

    try:
        for i, e in enumerate(echo):
            for j in range(s.n):
                if e:
                    yield chunk(i * s.n + j, e)

        async def batches():
            yield first
            async for b in items:
                yield b

        async for batch in batches():
            deltas = []
            for tag, kind, payload in batch:
                deltas += [(tag * s.n + j, part, text, fin)
                           for j, part, text, fin in _apply(kind, payload, builders[tag * s.n:(tag + 1) * s.n])]
            for i, part, text, fin in _merge(deltas):
                yield chunk(i, text) if fin is None else chunk(i, "", builders[i].finish_reason)
        if s.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(n_prompt, sum(b.tokens for b in builders))})
        yield b"data: [DONE]\n\n"
    except APIError as e:
        yield _sse(e.body())
        yield b"data: [DONE]\n\n"
    finally:
        await items.aclose()
