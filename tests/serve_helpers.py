"""Shared pieces of the serving tests: a server on 127.0.0.1 in a thread, and a scripted model whose
replies are forced (chosen by the prompt), for the tests that need the model to call a tool or write
Markdown on cue. A random-weight model cannot be made to do that, so those tests say so: the
*server's* behaviour is what they check, with the model's tokens fixed."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Callable

import torch

from chatforge.model import ModelConfig


@contextlib.contextmanager
def serve(app):
    """Run `app` under uvicorn on a free 127.0.0.1 port in a daemon thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class ScriptModel(torch.nn.Module):
    """A fake model for batch 1 whose logits force a script. At each prefill, `choose(prompt ids)`
    picks the script (a list of token ids; the last one repeats forever). Tokens the engine inserts
    between <|output_start|> and <|output_end|> do not advance the script. `delay` seconds per forward
    make replies slow enough to cancel or queue behind. Every prompt seen is kept in `prompts`."""

    def __init__(self, vocab_size: int, out_start: int, out_end: int, choose: Callable[[list[int]], list[int]],
                 delay: float = 0.0, max_seq_len: int = 256):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8,
                                  max_seq_len=max_seq_len)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.choose, self.delay = choose, delay
        self.out_start, self.out_end = out_start, out_end
        self.prompts: list[list[int]] = []
        self.script: list[int] = []

    def forward(self, idx, kv_cache=None, last_only=False, **kw):
        B, T = idx.shape
        if T > 1:  # prefill
            self.prompts.append(idx[0].tolist())
            self.script, self.k, self.in_output = self.choose(idx[0].tolist()), 0, False
        else:
            last = int(idx[0, -1])
            if last == self.out_start:
                self.in_output = True
            elif last == self.out_end:
                self.in_output = False
            elif not self.in_output:
                self.k += 1
        if self.delay:
            time.sleep(self.delay)
        logits = torch.full((B, T if not last_only else 1, self.config.vocab_size), -1e9)
        logits[:, -1, self.script[min(self.k, len(self.script) - 1)]] = 0.0
        return logits
