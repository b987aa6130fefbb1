"""Serving: an OpenAI-compatible HTTP API with continuous batching, and a web chat UI.

    protocol.py   request validation, OpenAI error bodies
    reply.py      one reply's tokens -> content / tool_calls / streamed deltas (the documented tool form)
    scheduler.py  the thread that owns the engine: continuous | static | no batching, bounded queue
    app.py        FastAPI routes, guards (host, API key, body size, content type), server-sent events
    static/       the web UI (plain HTML/JS/CSS, no external assets; its own safe Markdown renderer)

`chatforge serve CHECKPOINT` (chatforge/stages/serve.py) runs it under uvicorn.
"""

from chatforge.serve.app import create_app

__all__ = ["create_app"]
