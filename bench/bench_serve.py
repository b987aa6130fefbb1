#!/usr/bin/env python
"""Server benchmark: N concurrent clients against `chatforge serve` on 127.0.0.1, for each batching policy.

    python bench/bench_serve.py --checkpoint runs/tiny/sft/checkpoint   # clients 1, 4, 16, 64; 10 s ramp + 20 s each
    python bench/bench_serve.py --duration 5 --ramp 3 --clients 1,16 --policies continuous,none   # a quick look

The server runs in its own process (`python -m chatforge serve ... --batching POLICY`), started and
stopped here, once per policy, with the same settings (threads, max_batch_size, dtype) for all of
them; the clients are asyncio tasks in this process using httpx, each sending streamed
/v1/chat/completions requests back to back for --duration seconds. Every client sends the same
sequence of requests under every policy (prompt and max_tokens chosen from its index), greedy, so
the replies must be identical across policies: the script compares every reply both policies
produced and stops with an error on a difference before it prints the table.

Measured per (policy, clients), closed loop (each client sends its next request when the last one
ends), over a window that starts after --ramp seconds of the same load (the queue and batch fill up
first) and ends after --duration more; requests still running then are abandoned and not counted: requests/s and
output tokens/s (completion tokens from the usage chunk) of the requests completed in the window, p50/p99 request latency, p50/p99 time to first token (to the first content
chunk), and failed requests (non-200, an error event, or no `data: [DONE]`; the goal is zero).
The replies have mixed lengths (--max_tokens, a list), as a chat server sees: that is where
continuous batching differs from static batches, whose short replies wait for the longest one.

Without --checkpoint, a random-weight model of the `tiny` preset's size (depth 4, vocab 4096,
context 256) is saved with a tokenizer trained on the shared data's wiki text into a temporary
folder (deleted at the end). Random weights give replies that stop at random points or run to
max_tokens; the load is the same for every policy either way.

Run by hand on a quiet machine, never in the test suite; results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is the capital of France?", "Write a short poem about the sea.", "Explain what a Python list is.",
    "How many legs does a spider have?", "Give me three tips for sleeping well.", "What is 17 times 23?",
    "Summarize the plot of Hamlet in two sentences.", "Why is the sky blue?", "Translate 'good morning' to French.",
    "What does HTTP stand for?", "Name a prime number larger than 100.", "Describe a cat to someone who never saw one.",
    "What is the boiling point of water?", "Tell me a fun fact about octopuses.", "How do I reverse a string in Python?",
    "What year did the first person walk on the moon?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_checkpoint(folder: Path) -> Path:
    """A random-weight model of the tiny preset's size with a tokenizer trained on the wiki demo text."""
    sys.path.insert(0, str(ROOT))
    from chatforge.checkpoint import save_checkpoint
    from chatforge.common import data_path
    from chatforge.model import GPT, ModelConfig
    from chatforge.tokenizer import Tokenizer

    text = data_path("text/wiki_demo.txt").read_text(encoding="utf-8", errors="replace")
    tok = Tokenizer.train([p for p in text.split("\n\n") if p.strip()], vocab_size=4096)
    tok.save(folder / "tokenizer")
    import torch

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_depth(4, vocab_size=tok.vocab_size, max_seq_len=256))
    with torch.no_grad():  # the real init zeroes the head: every reply would be the same token
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.05)
    return save_checkpoint(folder / "bench" / "sft" / "checkpoint", model, tokenizer_dir=folder / "tokenizer")


def start_server(args, checkpoint: Path, policy: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "chatforge", "serve", str(checkpoint), "--port", str(port), "--batching", policy,
           "--threads", str(args.threads), "--max_batch_size", str(args.max_batch_size), "--max_queue", "1024",
           "--tools", "false", "--model_name", "bench", "--device", args.device]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CHATFORGE_API_KEY", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


async def one_request(http: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    out = {"ok": False, "latency": None, "ttft": None, "tokens": 0, "text": ""}
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                out["error"] = f"HTTP {r.status_code}"
                return out
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    return out
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    piece = c["delta"].get("content")
                    if piece:
                        if out["ttft"] is None:
                            out["ttft"] = time.perf_counter() - t0
                        out["text"] += piece
            out["ok"] = done
    except httpx.HTTPError as e:
        out["error"] = repr(e)
        return out
    out["latency"] = time.perf_counter() - t0
    return out


async def load(url: str, clients: int, duration: float, mix: list[int], ramp: float = 0.0) -> list[dict]:
    """Closed loop: each client sends its next request as soon as the last one ends. Requests that end
    during the first `ramp` seconds (the batch filling up) are not counted; at the end of the window
    the requests still running are abandoned (the server cancels them) and not counted either."""
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def client(c: int):
            k = 0
            while True:
                body = {"model": "bench", "messages": [{"role": "user", "content": QUESTIONS[(5 * c + k) % len(QUESTIONS)]}],
                        "max_tokens": mix[(c + k) % len(mix)], "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}
                r = await one_request(http, body)
                r["key"] = (c, k)
                if time.perf_counter() >= t_start:
                    results.append(r)
                k += 1

        t_start = time.perf_counter() + ramp
        tasks = [asyncio.create_task(client(c)) for c in range(clients)]
        await asyncio.sleep(ramp + duration)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return results


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="", help="checkpoint folder (default: a random tiny-size model)")
    ap.add_argument("--policies", default="continuous,static,none")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured per (policy, clients)")
    ap.add_argument("--ramp", type=float, default=10.0, help="seconds of load before the measured window")
    ap.add_argument("--max_tokens", default="16,48,96,160", help="reply lengths, cycled over requests")
    ap.add_argument("--max_batch_size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (the clients use this process)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    policies = args.policies.split(",")
    clients_list = [int(x) for x in args.clients.split(",")]
    mix = [int(x) for x in args.max_tokens.split(",")]

    tmp = None
    try:
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
            ckpt = make_tiny_checkpoint(tmp)
        import torch

        print(f"# bench_serve: {ckpt}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, server threads {args.threads}, max_batch_size {args.max_batch_size}, "
              f"{args.ramp:g} s ramp + {args.duration:g} s measured per point, max_tokens cycling {mix}, greedy, streamed")
        table, replies = [], {}
        for policy in policies:
            proc, url = start_server(args, ckpt, policy)
            try:
                asyncio.run(load(url, 1, 1.0, mix))  # warm-up
                for n in clients_list:
                    res = asyncio.run(load(url, n, args.duration, mix, ramp=args.ramp))
                    wall = args.duration
                    good = [r for r in res if r["ok"]]
                    for r in good:
                        replies.setdefault((n, r["key"]), {})[policy] = r["text"]
                    lat = [r["latency"] for r in good]
                    ttft = [r["ttft"] for r in good if r["ttft"] is not None]
                    table.append((policy, n, len(good) / wall, sum(r["tokens"] for r in good) / wall,
                                  pct(lat, 0.5), pct(lat, 0.99), pct(ttft, 0.5), pct(ttft, 0.99), len(res) - len(good)))
                    print(f"  {policy:10s} clients {n:3d}: {table[-1][2]:7.2f} req/s {table[-1][3]:8.1f} tok/s  "
                          f"failed {table[-1][8]}", flush=True)
                    errors = {r.get("error") for r in res if not r["ok"]}
                    if errors:
                        print(f"    errors: {sorted(map(str, errors))[:3]}")
            finally:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        compared = differ = 0
        for key, by_policy in replies.items():
            texts = list(by_policy.values())
            if len(texts) > 1:
                compared += 1
                if len(set(texts)) > 1:
                    differ += 1
                    print(f"reply {key} differs between policies: {by_policy}")
        if differ:
            raise SystemExit(f"{differ} of {compared} replies differ between policies: not a fair comparison")
        print(f"\n{compared} replies produced under more than one policy, all identical.\n")
        print("| policy | clients | req/s | output tok/s | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s | failed |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in table:
            print(f"| {row[0]} | {row[1]} | {row[2]:.2f} | {row[3]:.0f} | {row[4]:.3f} | {row[5]:.3f} | {row[6]:.3f} | "
                  f"{row[7]:.3f} | {row[8]} |")
        by = {(r[0], r[1]): r for r in table}
        if "continuous" in policies:
            print("\noutput tokens/s, continuous over:")
            for other in (p for p in policies if p != "continuous"):
                ratios = [f"{n} clients {by[('continuous', n)][3] / by[(other, n)][3]:.2f}x" for n in clients_list
                          if by[(other, n)][3] > 0]
                print(f"  {other}: " + ", ".join(ratios))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
