"""Ground floor shared by every stage: data directory, device and threads, run directories,
metrics, atomic writes, provenance (git revision, library versions).

A stage's life in its run directory `runs/<run>/<stage>/`:

    config.json    the resolved config            (written at start)
    meta.json      git revision, versions, host   (written at start)
    metrics.jsonl  one JSON object per event      (appended, line-buffered)
    ...artifacts
    DONE           summary JSON, written LAST     (its presence means "complete")

A later stage calls `require_stage(cfg, "tokenizer")` to find a complete earlier stage; a rerun
skips a stage whose DONE exists unless `--force`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

DATA_DIR_ENV = "CHATFORGE_DATA_DIR"
DONE = "DONE"


class ChatforgeError(RuntimeError):
    """An error for the user: the message names the input and says what to do. The CLI prints it
    without a traceback."""


# ----------------------------------------------------------------------------------------------
# Data directory (layout mirrors shared/data)


def data_dir(setting: str = "") -> Path:
    """The dataset folder: the --data_dir setting, else $CHATFORGE_DATA_DIR, else ~/.cache/chatforge/data."""
    if setting:
        return Path(setting).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    return Path.home() / ".cache" / "chatforge" / "data"


def data_path(rel: str | os.PathLike, setting: str = "") -> Path:
    """Find a file in the data dir, accepting a gzipped twin (`x.csv` <-> `x.csv.gz`).

    Absolute paths and paths that exist relative to the current folder are returned as they are.
    """
    p = Path(rel).expanduser()
    if p.is_absolute() or p.exists():
        if p.exists():
            return p
        candidates = [p]
    else:
        root = data_dir(setting)
        candidates = [root / p]
    for c in list(candidates):
        candidates.append(Path(str(c)[:-3]) if str(c).endswith(".gz") else Path(str(c) + ".gz"))
    for c in candidates:
        if c.exists():
            return c
    root = data_dir(setting)
    raise ChatforgeError(
        f"data file '{rel}' not found (looked in {root}). Set ${DATA_DIR_ENV} or --data_dir to a folder "
        f"laid out like shared/data, or fetch it with `chatforge data download NAME` "
        f"(`chatforge data list` shows the names)."
    )


# ----------------------------------------------------------------------------------------------
# Device and threads: chosen once, here.


def physical_cores() -> int:
    """Cores this process may use. Oversubscribing 2 cores makes torch ~10x slower, so we never
    go above the affinity mask."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def setup_threads(threads: int = 0) -> int:
    """Pin torch's intra-op threads (and the env vars read by BLAS/tokenizers) once."""
    n = threads if threads > 0 else physical_cores()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    if "torch" in sys.modules or threads:
        import torch

        torch.set_num_threads(n)
    return n


def get_device(name: str = "auto"):
    """cuda | mps | cpu | auto. Code below this never assumes CUDA."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ChatforgeError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ChatforgeError("--device mps: MPS is not available here; use --device cpu or auto")
    if name.split(":")[0] not in ("cuda", "mps", "cpu"):
        raise ChatforgeError(f"--device {name}: unknown device; use cuda, mps, cpu or auto")
    return torch.device(name)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), where oneDNN runs bf16 matmuls
    in hardware; elsewhere torch's CPU bf16 is emulated in float32 units."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x: fall back to cpuinfo
    if probe is not None:
        return bool(probe())
    try:
        return " amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def amp_dtype(setting: str, device, *, cpu_bf16: bool = False):
    """The autocast dtype a stage's --dtype asks for: torch.bfloat16, or None for float32.

    auto is bf16 on CUDA, and on a CPU with AMX for the stages that measured faster there (cpu_bf16):
    pretraining ran 1.5x faster (tiny shape, 2 cores, bench/RESULTS.md "bf16 on the CPU"), the SFT stage
    slower (its attention is masked per conversation), so only pretraining passes cpu_bf16. Master weights
    and optimizer state stay float32 either way.
    """
    import torch

    if setting == "bfloat16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if setting == "auto" and cpu_bf16 and device.type == "cpu" and cpu_has_amx():
        return torch.bfloat16
    return None


# ----------------------------------------------------------------------------------------------
# Files


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """`write(f)` into a temp file in the same folder, fsync, then rename: readers never see half a
    file. E.g. atomic_write("a.npy", lambda f: np.save(f, array))."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------
# Provenance


def git_revision() -> str:
    """The chatforge source revision (with '-dirty' when the tree has changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in ("chatforge", "torch", "numpy", "tiktoken", "rustbpe", "pyarrow", "safetensors",
                "transformers", "tokenizers"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return out


# ----------------------------------------------------------------------------------------------
# Run directories


def stage_dir(cfg, stage: str) -> Path:
    return Path(cfg.runs_dir) / cfg.run / stage


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / DONE).exists()


# The command that runs a stage, where it is not `chatforge <stage>` (the data stage has sub-actions).
STAGE_COMMANDS = {"data": "data process"}


def require_stage(cfg, stage: str) -> Path:
    """The directory of a complete earlier stage of the same run, or a clear error."""
    d = stage_dir(cfg, stage)
    if not is_complete(d):
        raise ChatforgeError(
            f"stage '{stage}' of run '{cfg.run}' is not complete ({d / DONE} missing); "
            f"run `chatforge {STAGE_COMMANDS.get(stage, stage)} --run {cfg.run}` first"
        )
    return d


def source_checkpoint(cfg, source: str) -> Path:
    """The checkpoint a training stage starts from: `source` is an earlier stage of the same run (its
    checkpoint/ folder, e.g. pretrain or sft) or a checkpoint folder."""
    if "/" not in source and not Path(source).exists():
        return require_stage(cfg, source) / "checkpoint"
    p = Path(source)
    if not (p / "config.json").is_file():
        raise ChatforgeError(f"--source {source}: not a checkpoint folder (no config.json); give a stage of "
                             f"this run (pretrain, sft) or a folder like runs/tiny/sft/checkpoint")
    return p


class StageRun:
    """One stage's run directory: config + provenance at start, metrics while running, DONE last."""

    def __init__(self, cfg, stage: str):
        self.cfg, self.stage = cfg, stage
        self.dir = stage_dir(cfg, stage)
        self.t0 = time.time()
        self._metrics = None

    @property
    def complete(self) -> bool:
        return is_complete(self.dir)

    def start(self) -> "StageRun":
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / DONE).unlink(missing_ok=True)  # a forced rerun is incomplete until it finishes
        write_json(self.dir / "config.json", asdict(self.cfg))
        write_json(self.dir / "meta.json", {
            "stage": self.stage,
            "git_revision": git_revision(),
            "versions": library_versions(),
            "host": platform.node(),
            "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        self._metrics = open(self.dir / "metrics.jsonl", "a", buffering=1, encoding="utf-8")
        return self

    def log(self, **record: Any) -> None:
        """Append one metrics record (a flushed line, so nothing is lost on a crash)."""
        record.setdefault("time", round(time.time() - self.t0, 3))
        self._metrics.write(json.dumps(record, default=float) + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the completion marker last."""
        summary = {"stage": self.stage, "seconds": round(time.time() - self.t0, 2), **summary}
        self.close()
        write_json(self.dir / DONE, summary)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


@contextmanager
def stage_run(cfg, stage: str) -> Iterator[StageRun]:
    """`with stage_run(cfg, 'tokenizer') as run:` -- the caller calls run.finish(summary) on success;
    an exception (or Ctrl-C) leaves the directory without DONE, so it counts as incomplete."""
    run = StageRun(cfg, stage).start()
    try:
        yield run
    finally:
        run.close()


def read_done(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / DONE).read_text())


def log0(*args: Any) -> None:
    """Print from rank 0 only (torchrun sets RANK); stages use this for human-facing lines."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)
