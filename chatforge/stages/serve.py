"""`chatforge serve CHECKPOINT`: the OpenAI-compatible API and the web chat UI (chatforge/serve).

    chatforge serve runs/tiny/sft/checkpoint                  # http://127.0.0.1:8000
    chatforge serve runs/tiny/sft/checkpoint --api_key KEY --port 9000 --batching continuous

Reads the checkpoint, builds the engine (with the python and search tools unless --tools false) and
runs the app under uvicorn until Ctrl-C.
"""

from __future__ import annotations

import os
from pathlib import Path

from chatforge.common import ChatforgeError, setup_threads


def model_name(checkpoint: str) -> str:
    """runs/tiny/sft/checkpoint -> "tiny-sft"; any other folder -> its name."""
    p = Path(checkpoint).resolve()
    return f"{p.parent.parent.name}-{p.parent.name}" if p.name == "checkpoint" else p.name


def run(cfg) -> None:
    import uvicorn

    from chatforge.engine import Engine
    from chatforge.serve import create_app
    from chatforge.tools import default_tools

    if not cfg.checkpoint:
        raise ChatforgeError("give a CHECKPOINT folder, e.g. runs/tiny/sft/checkpoint")
    if not cfg.api_key and os.environ.get("CHATFORGE_API_KEY"):
        cfg.api_key = os.environ["CHATFORGE_API_KEY"]
    setup_threads(cfg.threads)
    tools = default_tools(cfg.checkpoint, cfg.index) if cfg.tools else {}
    engine = Engine.from_checkpoint(cfg.checkpoint, cfg.device, tools=tools)
    name = cfg.model_name or model_name(cfg.checkpoint)
    app = create_app(engine, cfg, model_name=name)
    from chatforge.serve.app import is_loopback

    if not is_loopback(cfg.host) and not cfg.api_key:
        print(f"chatforge serve: warning: listening on {cfg.host} without an API key: anyone who can reach this "
              f"port can use the model and its python tool; set --api_key or $CHATFORGE_API_KEY", flush=True)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"chatforge serve: model {name!r} ({cfg.checkpoint}), batching {cfg.batching}, "
          f"tools {'on' if tools else 'off'}, API key {'required' if cfg.api_key else 'off'}\n"
          f"  chat UI:  http://{host}:{cfg.port}/\n  OpenAI API base_url: http://{host}:{cfg.port}/v1", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)
