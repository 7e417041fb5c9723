"""Several processes (``torchrun`` / ``accelerate launch``): who am I, shard the work, wait for the others.

Items are sharded by their content key, not by position, so a re-run with a different number of processes
still finds every finished image in the shared store. Without the launcher's environment variables
everything degrades to a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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
        torch.distributed.init_process_group(backend=backend)
    return info


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def owns(key: str, info: ProcessInfo) -> bool:
    """Whether this rank generates the item with content key ``key``."""
    return int(key[:8], 16) % info.world_size == info.rank


def rank_device(info: ProcessInfo) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
