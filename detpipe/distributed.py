"""Data-parallel training under ``torchrun``: the process group, who writes, and the few collectives we need.

``torchrun --nproc_per_node N stages/train.py ...`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; each
process then trains on its share of every batch and DistributedDataParallel averages the gradients. Only
rank 0 writes files and talks to MLflow. Without ``torchrun`` (or with one process) nothing changes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init(device_type: str) -> World:
    """Join the process group that ``torchrun`` set up (NCCL on GPUs, gloo on the CPU); one process: no group."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # rank 0 validates and writes alone while the others wait: allow that much longer than NCCL's 10 minutes
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(hours=4))
    return world


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def any_true(flag: bool, world: World) -> bool:
    """True on every process when it is true on one: all stop together (a NaN loss, an early stop)."""
    if not world.active:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()
