"""Distributed set-up for `kdcache build` under torchrun: this process's rank, the world size, and a barrier.

Ranks take disjoint units (see `plan.plan_rank`) and rank 0 consolidates after a barrier. The build's ranks only
synchronise, never exchange tensors, so the CPU-only gloo backend is enough.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """This process's place in the build: rank, world size, and whether this process set up the process group."""

    rank: int = 0
    world: int = 1
    initialised_here: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed() -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("gloo")
        return Dist(tdist.get_rank(), tdist.get_world_size(), True)
    return Dist(tdist.get_rank(), tdist.get_world_size(), False)
