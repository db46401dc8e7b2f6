"""Training one student on several processes with DistributedDataParallel, under torchrun:

    torchrun --nproc-per-node 8 -m kdcache.cli.main train --cache cache.zarr --tower image --student NAME \
        --device cuda --precision fp16 --batch-size 64 --out runs/ddp          # 8 GPUs, global batch 8 x 64
    torchrun --nproc-per-node 2 -m kdcache.cli.main train ... --device cpu    # a tiny CPU run (gloo)

torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT) say where this process is; `setup` joins the
process group they describe (`env://`; nccl on CUDA, gloo otherwise). Without them, or with WORLD_SIZE=1, `Ranks` is a
single process and every method here is a no-op, so the loop is exactly what it was.

What the loop asks of this module: the rank and world (each rank takes its slice of every global batch,
`order.worker_batches`), the student wrapped in DDP (gradients averaged across ranks), embeddings gathered with their
gradient for losses with in-batch negatives (`gather`), sums and consistency checks across ranks, and barriers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kdcache.train.config import TrainError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes; `world == 1`: one process, nothing distributed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None        # "nccl" | "gloo" when world > 1
    initialised_here: bool = False    # this process started the group, so it ends it (`close`)

    @property
    def main(self) -> bool:
        """The one process that writes the run directory (config, metrics, checkpoints, done.json)."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device this rank trains on: `--device cuda` is cuda:LOCAL_RANK under torchrun. Refuses a device index
        shared by several local ranks, and devices the backend cannot serve."""
        if self.world == 1:
            return device
        dev = torch.device(device)
        if dev.type == "cuda":
            if dev.index is not None and self.local_world > 1:
                raise TrainError(f"--device {device}: {self.local_world} ranks on this node would share one GPU; "
                                 "pass --device cuda (each rank uses cuda:LOCAL_RANK)")
            return f"cuda:{self.local_rank if dev.index is None else dev.index}"
        if dev.type != "cpu":
            raise TrainError(f"--device {device}: DDP training runs on cuda (nccl) or cpu (gloo), not {dev.type}")
        return device

    def wrap(self, student: nn.Module, device: torch.device) -> nn.Module:
        """The student as the training step calls it: DDP (gradients averaged across ranks; rank 0's weights
        broadcast to all at construction) when distributed, else the student itself."""
        if self.world == 1:
            return student
        norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
        if norms and self.main:  # SyncBatchNorm runs on CUDA only, and swapping modules would drop --hint-map hooks
            log.warning("the student has %d BatchNorm layer(s): under DDP each rank normalises with the statistics of "
                        "its own --batch-size rows (running stats: rank 0's), so it trains close to, not exactly as, "
                        "one process with the global batch", norms)
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(student, device_ids=ids)

    def no_sync(self, model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """DDP's no_sync() for a micro-batch whose gradients stay local (`skip`: not the last of an accumulation)."""
        if skip and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `x` ([B, ...], the same B on every rank), concatenated in rank order, keeping the
        gradient: a loss over the gathered rows computed identically on every rank, backpropagated here and averaged
        by DDP, gives the gradient of the one-process loss over the global batch."""
        if self.world == 1:
            return x
        return _GatherRows.apply(x)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sums of `values` over the ranks (float64; on `device`, which nccl needs to be CUDA)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed element-wise over the ranks, in place (the same shape on every rank; NaN and inf propagate, so
        a non-finite value on one rank is non-finite on all)."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Each value averaged over the ranks (the same keys on every rank)."""
        if self.world == 1:
            return values
        sums = self.sum(list(values.values()), device)
        return {k: v / self.world for k, v in zip(values, sums, strict=True)}

    def check_same(self, value, *, what: str, fix: str) -> None:
        """Refuse (TrainError naming `what` on each rank) unless every rank holds the same JSON-able `value`; a
        collective, so it also serves as a barrier."""
        if self.world == 1:
            return
        seen: list = [None] * self.world
        dist.all_gather_object(seen, value)
        if any(v != seen[0] for v in seen):
            detail = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(seen))
            raise TrainError(f"the ranks disagree on {what} ({detail}); {fix}")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group if this process started it."""
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str) -> Ranks:
    """Join the process group torchrun describes (WORLD_SIZE > 1; nccl for a CUDA `device`, else gloo), or return a
    single process. A group a caller already started is used as it is (and left to the caller to end)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as e:
        raise TrainError(f"torchrun's WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE must be integers: {e}") from None
    if world <= 1:
        return Ranks()
    if not dist.is_available():
        raise TrainError(f"WORLD_SIZE={world} asks for DDP training, but this torch has no torch.distributed")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: CUDA is not available (torch.cuda.is_available() is False); use "
                         "--device cpu (DDP over gloo)")
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), *local, dist.get_backend(), False)
    backend = "nccl" if cuda else "gloo"
    if cuda:  # before the group starts, so nccl binds this rank's GPU
        torch.cuda.set_device(torch.device(Ranks(world=world, local_rank=local[0], local_world=local[1])
                                           .device(device)))
    try:
        dist.init_process_group(backend, init_method="env://")
    except (ValueError, RuntimeError) as e:
        raise TrainError(f"WORLD_SIZE={world}: torch.distributed could not start ({backend}, env://): {e}; launch "
                         "with torchrun (which sets RANK, MASTER_ADDR, MASTER_PORT)") from None
    return Ranks(dist.get_rank(), dist.get_world_size(), *local, backend, True)


class _GatherRows(torch.autograd.Function):
    """all_gather with a gradient: forward concatenates every rank's rows; backward sums the gradient of the
    concatenation over the ranks (every rank computed the same loss from it) and returns this rank's rows. An
    all_reduce rather than a reduce-scatter, so any backend serves it (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
