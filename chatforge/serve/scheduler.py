"""The scheduler: one thread that owns the engine and decides which requests decode together.

HTTP handlers run on uvicorn's asyncio loop; the model runs here, in one worker thread, so a long
decode never blocks the loop. A handler `submit`s a Job (prompt ids + sampling settings) and awaits
its `queue`, which the thread fills with the tokens of every step (through the loop's
call_soon_threadsafe); `cancel` (a client that went away) takes effect at the next step boundary.

Three policies (`--batching`), all on the engine's step-level Batch (chatforge/engine.py), so they
differ only in when a waiting request may join:

- continuous (default): between any two decode steps, while the batch has rows free. The engine
  drops finished or cancelled rows from the batch and its KV cache at once, so a short request
  never waits for a long one and the batch stays full under load (Orca, Yu et al. 2022; vLLM).
- static: only when the batch is empty; then up to max_batch_size rows join together (a window of
  STATIC_WINDOW_S lets a burst gather) and run until the last of them ends. The classic baseline:
  one long reply holds up its whole group.
- none: one request at a time.

A cancelled request (its client went away) leaves the batch at the next step boundary under every
policy.

The queue is bounded: `submit` raises QueueFull when max_queue requests are already waiting (the app
answers 429), so memory and waiting time stay bounded however many clients connect.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from chatforge.common import ChatforgeError

STATIC_WINDOW_S = 0.02  # static batching: how long a new group waits for more requests to join
# Continuous batching admits into a running batch in groups: every admission is a prefill forward and
# a KV-cache merge (a copy of the whole cache), so admitting one request per decode step (what a full
# queue and short replies give) spends the step on admissions. A running batch takes waiting requests
# once a quarter of its rows are free; with fewer waiting than that, also once the oldest has waited
# ADMIT_WAIT_S (light load keeps its latency). Measured on the tiny model (bench/RESULTS.md): admitting
# one request per step made continuous batching 0.46-0.7x static at 16-64 clients.
ADMIT_WAIT_S = 0.05
POLICIES = ("continuous", "static", "none")


class QueueFull(Exception):
    """max_queue requests are already waiting."""


@dataclass(frozen=True)
class GenParams:
    """One request's sampling settings (the engine's SamplingParams fields)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop_tokens: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    use_tools: bool = True
    max_tool_calls: int = 4


class Job:
    """One request in the scheduler. The thread posts (tag, kind, payload) to `queue`:
    (tag, "tokens", [(sample index, token, sampled, finish reason or None), ...]) per step, then
    (tag, "done", [Completion, ...]) or (tag, "error", message). Jobs of one HTTP request (one per
    prompt of /v1/completions) can share a queue and tell themselves apart by tag."""

    def __init__(self, prompt: Sequence[int], params: GenParams, queue: asyncio.Queue | None = None, tag: int = 0):
        self.prompt = list(prompt)
        self.params = params
        self.tag = tag
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = queue if queue is not None else asyncio.Queue()
        self.cancelled = False
        self.done = False
        self.request = None  # the engine's Request while in a continuous batch
        self.t_submit = time.perf_counter()

    def post(self, item: tuple) -> None:
        if item[0] != "tokens":
            self.done = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.tag, *item))
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass


@dataclass
class Stats:
    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0  # queue full
    failed: int = 0
    steps: int = 0
    max_rows: int = 0  # the most rows ever decoded together
    running: int = 0  # requests in the batch now
    rows: int = 0  # rows decoding now
    waiting: int = 0  # requests queued now

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Scheduler:
    def __init__(self, engine, policy: str = "continuous", max_batch_size: int = 16, max_queue: int = 64):
        if policy not in POLICIES:
            raise ChatforgeError(f"--batching {policy}: use one of {', '.join(POLICIES)}")
        if max_batch_size < 1 or max_queue < 0:
            raise ChatforgeError(f"max_batch_size ({max_batch_size}) must be >= 1 and max_queue ({max_queue}) >= 0")
        self.engine, self.policy = engine, policy
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.stats = Stats()
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._cancels: list[Job] = []
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- called from the event loop -------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        if job.params.n > self.max_batch_size:
            raise ChatforgeError(f"n ({job.params.n}) is more than the batch holds ({self.max_batch_size})")
        with self._cv:
            if self._closed:
                raise ChatforgeError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max_queue {self.max_queue})")
            self._waiting.append(job)
            self.stats.submitted += 1
            self.stats.waiting = len(self._waiting)
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away); a no-op once it is done."""
        with self._cv:
            if job.done or job.cancelled:
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self.stats.waiting = len(self._waiting)
                self.stats.cancelled += 1
                job.post(("error", "cancelled"))
            else:
                self._cancels.append(job)
                self._cv.notify()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="chatforge-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        try:
            # Batch.step is inference_mode; cancel() edits the same KV cache tensors, which torch only
            # allows inside inference_mode too, so the whole thread runs in it.
            with torch.inference_mode():
                self._loop()
        finally:  # whatever is left gets an answer, never a hang
            with self._cv:
                left = list(self._waiting)
                self._waiting.clear()
            for job in left:
                job.post(("error", "the server is shutting down"))

    def _take(self, limit_rows: int, limit_jobs: int | None = None) -> list[Job]:
        """Pop waiting jobs, in order, while they fit in limit_rows. Call with the lock held."""
        taken, rows = [], 0
        while self._waiting and rows + self._waiting[0].params.n <= limit_rows:
            if limit_jobs is not None and len(taken) >= limit_jobs:
                break
            job = self._waiting.popleft()
            taken.append(job)
            rows += job.params.n
        self.stats.waiting = len(self._waiting)
        return taken

    def _admit(self, rows: int, busy: bool) -> list[Job]:
        """The policy: which waiting jobs join the batch now. Call with the lock held."""
        if self.policy == "continuous":
            free, group = self.max_batch_size - rows, max(1, self.max_batch_size // 4)
            if busy and self._waiting and free < group and (
                    len(self._waiting) >= group or time.perf_counter() - self._waiting[0].t_submit < ADMIT_WAIT_S):
                return []  # a few more steps: rows finish and the admission grows
            return self._take(free)
        if busy:  # static and none: nothing joins a running group
            return []
        if self.policy == "none":
            return self._take(self.max_batch_size, limit_jobs=1)
        deadline = time.monotonic() + STATIC_WINDOW_S  # static: let a burst gather
        while sum(j.params.n for j in self._waiting) < self.max_batch_size and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cv.wait(left)
        return self._take(self.max_batch_size)

    def _loop(self) -> None:
        from chatforge.engine import SamplingParams

        batch = self.engine.batch(max_batch_size=self.max_batch_size)
        running: dict[int, Job] = {}  # engine request id -> job
        rows = 0
        while True:
            with self._cv:
                while not self._waiting and not running and not self._cancels and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                new = self._admit(rows, busy=bool(running))
                cancels, self._cancels = self._cancels, []
            try:
                for job in cancels:  # between two steps: the engine drops the rows and their cache
                    if job.request is not None and job.request.id in running:
                        batch.cancel(job.request)
                        del running[job.request.id]
                        rows -= job.params.n
                    self.stats.cancelled += 1
                    job.post(("error", "cancelled"))
                for job in new:
                    if job.cancelled:  # (cancel() already answered it)
                        continue
                    p = job.params
                    try:
                        job.request = batch.add(job.prompt, SamplingParams(
                            max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                            frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
                            seed=p.seed, n=p.n, stop_tokens=p.stop_tokens, stop_strings=p.stop_strings,
                            use_tools=p.use_tools, max_tool_calls=p.max_tool_calls))
                    except ChatforgeError as e:
                        self.stats.failed += 1
                        job.post(("error", str(e)))
                        continue
                    running[job.request.id] = job
                    rows += p.n
                self.stats.running, self.stats.rows = len(running), rows
                if not running:
                    continue
                events = batch.step()
                self.stats.steps += 1
                self.stats.max_rows = max(self.stats.max_rows, len(events))
                per_job: dict[int, list] = {}
                for ev in events:
                    per_job.setdefault(ev.request.id, []).append((ev.index, ev.token, ev.sampled, ev.finish_reason))
                for rid, evs in per_job.items():
                    job = running[rid]
                    job.post(("tokens", evs))
                    if job.request.done:
                        del running[rid]
                        rows -= job.params.n
                        self.stats.finished += 1
                        job.post(("done", job.request.completions))
                self.stats.running, self.stats.rows = len(running), rows
            except Exception as e:  # a bug or a device error: the running jobs get the message (500), the
                # thread goes on with a fresh batch instead of dying and leaving every later request hanging
                lost = {id(j): j for j in [*running.values(), *new] if not j.done}
                self.stats.failed += len(lost)
                for job in lost.values():
                    job.post(("error", f"generation failed: {type(e).__name__}: {e}"))
                running.clear()
                rows = 0
                self.stats.running = self.stats.rows = 0
                batch = self.engine.batch(max_batch_size=self.max_batch_size)
