"""Several processes training one model: who this process is, and the few collective steps
chattune itself takes (the gradient all-reduce, sharding and sharded saving are PyTorch's and
accelerate's, driven by transformers' Trainer).

A job is started by ``torchrun`` (``chattune train CONFIG --nproc N`` starts it for one node),
by ``accelerate launch``, or by any launcher that sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. On CUDA the backend is NCCL, on CPU
gloo. One process alone is the same code with a world of one: every function here is then a
no-op that costs nothing.

What chattune does once per job, not once per process: encoding the data (the main process
writes the Arrow cache, the others wait and read it, :func:`main_first`), renaming incomplete
checkpoints before a resume, and writing the run folder, metrics and manifest (rank 0).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder and prints."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The first process of its machine."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def world_from_env() -> World:
    """This process's rank and world size as the launcher set them (torchrun, accelerate,
    MPI); a process started alone is rank 0 of 1."""
    size = _env_int("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", default=1)
    rank = _env_int("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", default=0)
    local = _env_int("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", default=0)
    local_size = _env_int("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", default=size)
    return World(rank, size, local, local_size)


def backend() -> str:
    """The collective backend: NCCL with CUDA, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_seconds: int) -> World:
    """Join the job's process group (once; later calls return the same world). The Trainer
    later finds it set up and uses it: the same backend and ``ddp_timeout``."""
    world = world_from_env()
    if world.distributed and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available(), backend=backend(),
                     timeout=timedelta(seconds=timeout_seconds))
    return world


def barrier() -> None:
    """Wait until every process gets here (nothing with one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextlib.contextmanager
def main_first(world: World) -> Iterator[None]:
    """Run the block on rank 0 first, then on the first process of every other machine, then
    on the rest: what rank 0 writes to a shared disk (the data cache) the others then read,
    and a machine with its own disk writes it once, by its first process."""
    if not world.distributed:
        yield
        return
    if world.is_main:
        yield
    barrier()  # rank 0 is done
    if world.is_local_main and not world.is_main:
        yield
    barrier()  # each machine's first process is done
    if not world.is_local_main:
        yield
    barrier()


def all_agree(flag: bool) -> bool:
    """True only when ``flag`` is true on every process (itself with one process): for
    decisions each process makes on its own copy of the model (a probe) that must come out
    the same everywhere."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if backend() == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def gather_objects(value, world: World) -> list:
    """Every process's ``value``, in rank order (``[value]`` with one process)."""
    if not (world.distributed and torch.distributed.is_initialized()):
        return [value]
    values = [None] * world.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def main_only_log(world: World, log):
    """``log`` on rank 0, silence on the others (one job, one log)."""
    if world.is_main:
        return log
    return lambda *args, **kwargs: None
