"""Executors: run the same picklable task function over a list of tasks, locally or on Ray.

Both yield results as tasks complete (so the caller can log progress and throughput), and both run
a task in its own process: a task's memory is freed when it ends, and a crash in one (a C extension
hitting a bad page) fails that task only.

- `LocalExecutor(workers)`: a process pool on this machine (the default). `workers=1` runs tasks
  inline in this process, which is what you want under a debugger.
- `RayExecutor(workers, address)`: one Ray task per input file (`pip install ray`); `address=''`
  starts a local Ray instance, `auto` or `ray://host:10001` joins a cluster. The cluster's nodes must
  see the inputs and the run directory (a shared filesystem, or URLs for the inputs).

`remove_stale_temps` clears what killed workers of an earlier attempt left, before a resume.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterator


class LocalExecutor:
    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)

    def map_unordered(self, fn: Callable[[Any], Any], tasks: list) -> Iterator[Any]:
        if self.workers == 1 or len(tasks) <= 1:
            for t in tasks:
                yield fn(t)
            return
        # spawn, not fork: the parent may hold threads (pyarrow, torch) that fork would copy mid-state.
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(tasks)), mp_context=ctx)
        try:
            pending = {pool.submit(fn, t) for t in tasks}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        finally:
            # On Ctrl-C or an error: drop queued tasks; running ones are interrupted too (they get
            # the same SIGINT) and leave only temp files, never a completion marker.
            pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    def __init__(self, workers: int = 1, address: str = ""):
        try:
            import ray
        except ImportError:
            raise ImportError("the ray executor needs Ray: pip install 'chatforge[ray]'") from None
        self.ray = ray
        self.workers = max(1, workers)
        self.address = address
        self._started = False

    def _init(self) -> None:
        if self.ray.is_initialized():
            return
        kwargs: dict[str, Any] = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        if self.address:
            self.ray.init(address=self.address, **kwargs)
        else:
            self.ray.init(num_cpus=self.workers, **kwargs)
            self._started = True

    def map_unordered(self, fn: Callable[[Any], Any], tasks: list) -> Iterator[Any]:
        self._init()
        # One CPU per task; Ray retries a task whose worker died (the task itself is idempotent).
        remote = self.ray.remote(num_cpus=1, max_retries=2)(fn)
        refs = [remote.remote(t) for t in tasks]
        try:
            while refs:
                done, refs = self.ray.wait(refs, num_returns=1)
                yield self.ray.get(done[0])
        finally:
            for r in refs:
                self.ray.cancel(r, force=True)
            if self._started:
                self.ray.shutdown()


def remove_stale_temps(*folders: Path) -> int:
    """Delete the temp files (`.<name>.<...>.tmp`) that killed workers left in `folders`; returns how
    many. Outputs are written under a temp name and renamed when complete, and an exception or Ctrl-C
    removes the temp file, but a SIGKILL (the OOM killer, a preempted node) skips every `finally`.
    Call it before any task of the run starts (nothing may be writing there), as a resume does."""
    n = 0
    for folder in folders:
        for tmp in Path(folder).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def make_executor(kind: str, workers: int, address: str = ""):
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, address)
    raise ValueError(f"unknown executor {kind!r}; choose local or ray")
