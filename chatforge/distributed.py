"""Data-parallel plumbing shared by every training stage: who am I (rank, world), join the process
group, sum a tensor over ranks, wait for the others.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE; a plain `python -m chatforge` run
has none of them and is rank 0 of a world of 1, where every helper here is a no-op. The backend is
nccl on CUDA and gloo elsewhere, so the multi-process path runs (and is tested) on CPU too.

    d = dist_from_env()
    device = init_distributed(d, get_device("auto"))   # cuda:<local_rank> under torchrun
    ...
    all_reduce_sum(t, d); barrier(d)
    destroy(d)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class Dist:
    """This process's place in the job (torchrun's environment)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    enabled: bool = False  # more than one process: collectives are real

    @property
    def master(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0


def dist_from_env() -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); without it,
    rank 0 of a world of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(rank=int(os.environ.get("RANK", "0")), world=world,
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), enabled=world > 1)


def init_distributed(d: Dist, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo elsewhere) and pick this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if d.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def destroy(d: Dist) -> None:
    """Leave the process group (end of a stage, also after an error)."""
    if d.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum `t` over ranks in place (and return it); a no-op on one process."""
    if d.enabled:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    """Wait until every rank gets here; a no-op on one process."""
    if d.enabled:
        torch.distributed.barrier()


@contextlib.contextmanager
def training_process(threads: int = 0, device: str = "auto") -> Iterator[tuple[Dist, torch.device]]:
    """What every training stage does first and last: read torchrun's environment, give each local
    rank its share of the cores (`threads` 0 = cores / local processes: oversubscribing 2 cores makes
    torch ~10x slower), join the process group on the chosen device, and leave it at the end.

        with training_process(cfg.threads, cfg.device) as (d, device):
            ...
    """
    from chatforge.common import get_device, physical_cores, setup_threads

    d = dist_from_env()
    n = threads or max(1, physical_cores() // max(1, d.local_world))
    setup_threads(n)
    torch.set_num_threads(n)
    dev = init_distributed(d, get_device(device))
    try:
        yield d, dev
    finally:
        destroy(d)
