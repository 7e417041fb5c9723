"""Several processes (``torchrun`` / ``accelerate launch``): who am I, shard the work, wait for the others.

Images are sharded by their content key, not by position, so a re-run with a different number of processes
still finds every finished image in the shared store; metric and judge work on images already in the store
is sharded by position (`my_share`) and merged (`duobench.metrics.base.sync_state`, `gather_indexed`).
Without the launcher's environment variables everything degrades to a single process: every helper here is
then the identity or a no-op, so single-process code needs no branch.

The group's timeout is long (`GROUP_TIMEOUT`, ``DUOBENCH_GROUP_TIMEOUT_MINUTES``): some work runs on one
rank while the others wait at a barrier (a model-changing attack's fine-tuning, a training another job
holds the lock for), and NCCL's 10-minute default would kill such a job.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

T = TypeVar("T")
GROUP_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_info() -> ProcessInfo:
    return ProcessInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed() -> ProcessInfo:
    """Join the process group the launcher set up (gloo on CPU, nccl on GPU); pin this rank's device."""
    info = process_info()
    if info.world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        else:
            # N processes on one CPU: split the cores instead of oversubscribing them N times.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        minutes = os.environ.get("DUOBENCH_GROUP_TIMEOUT_MINUTES")
        timeout = timedelta(minutes=float(minutes)) if minutes else GROUP_TIMEOUT
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    return info


def in_group() -> bool:
    """Whether this process is one rank of an initialised process group of more than one process."""
    from duobench.locks import group_size

    return group_size() > 1


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks once it finished (they then find its downloads
    and caches made). The block must contain no collective call."""
    grouped, main = in_group(), process_info().is_main
    if grouped and not main:
        barrier()
    yield
    if grouped and main:
        barrier()


def my_share(count: int) -> list[int]:
    """The positions ``0..count-1`` this rank works on (every ``world_size``-th, from its rank); all of
    them without a process group."""
    if not in_group():
        return list(range(count))
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return list(range(rank, count, size))


def gather_indexed(pairs: Sequence[tuple[int, T]]) -> list[T]:
    """Every rank's ``(position, value)`` pairs, gathered on every rank and ordered by position: the
    values a single process would have produced in order."""
    if not in_group():
        return [value for _, value in sorted(pairs, key=lambda pair: pair[0])]
    shards: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, list(pairs))
    merged = sorted((pair for shard in shards for pair in shard), key=lambda pair: pair[0])
    return [value for _, value in merged]


def sum_over_ranks(value: int) -> int:
    """The sum of every rank's ``value`` (``value`` itself without a process group)."""
    if not in_group():
        return value
    shards: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, value)
    return sum(shards)


def owns(key: str, info: ProcessInfo) -> bool:
    """Whether this rank generates the item with content key ``key``."""
    return int(key[:8], 16) % info.world_size == info.rank


def rank_device(info: ProcessInfo) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
