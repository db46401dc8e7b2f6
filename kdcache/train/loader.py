"""The DataLoader around a `TrainStream`: `make_loader` for one pass, `EpochLoader` for every pass of a training run,
and the packing that carries a worker's batch to the main process as one tensor (`PackedBatch`).

    loader = make_loader(spec, split="train", epoch=0, workers=4, student_preprocess=model.visual.preprocess_cfg)
    for batch in loader: ...

The batches, and their order, are the stream's whatever `workers` is (see kdcache/train/data.py). A worker packs each
batch's small tensors into one (one shared-memory segment instead of eight) and the loader unpacks them. Training uses
`EpochLoader`: one pool of workers, forked before the optimizer state exists, serves every epoch and validation pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kdcache.train.data import TrainStream
from kdcache.train.dataspec import DataSpec

_ALIGN = 64  # byte alignment of each tensor in a packed batch (a view as int64/float32 needs at least 8)
_PACK_MAX = 1 << 20  # tensors larger than this (image pixels) travel on their own: copying them costs more


@dataclass(frozen=True)
class PackedBatch:
    """A batch's small tensors as one uint8 tensor plus a layout: what a DataLoader worker sends to the main process.
    Each tensor a worker returns crosses processes as its own shared-memory segment, about 0.3 ms apiece; a text
    batch has eight, so sending them separately cost 2.6 ms a batch against 0.6 ms for one tensor of the same
    bytes. Large tensors (image pixels) and non-tensor entries (texts) travel as they are, in `rest`."""

    data: torch.Tensor                                           # uint8, the small tensors' bytes, each _ALIGN-aligned
    layout: tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]  # (name, dtype, shape, byte offset)
    rest: dict
    order: tuple[str, ...]                                       # the batch's keys, in order

    def pin_memory(self) -> PackedBatch:
        """Called by the DataLoader's pin-memory thread (pin_memory=True, on CUDA machines)."""
        return PackedBatch(self.data.pin_memory(), self.layout,
                           {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.rest.items()},
                           self.order)


def pack_batch(batch: dict) -> PackedBatch:
    """A batch dict as a PackedBatch: its small tensors copied into one tensor, the rest kept as they are."""
    tensors = {k: v.contiguous() for k, v in batch.items()
               if isinstance(v, torch.Tensor) and v.numel() * v.element_size() <= _PACK_MAX}
    layout, offset = [], 0
    for k, v in tensors.items():
        layout.append((k, v.dtype, tuple(v.shape), offset))
        offset += -(-v.numel() * v.element_size() // _ALIGN) * _ALIGN
    data = torch.empty(offset, dtype=torch.uint8)
    for (_, _, _, off), v in zip(layout, tensors.values(), strict=True):
        n = v.numel() * v.element_size()
        if n:
            data[off:off + n] = v.reshape(-1).view(torch.uint8)
    return PackedBatch(data, tuple(layout), {k: v for k, v in batch.items() if k not in tensors}, tuple(batch))


def unpack_batch(batch: PackedBatch | dict) -> dict:
    """A PackedBatch back to the batch dict, in its original key order (views into the one tensor, pinned if it
    was); a dict passes through."""
    if not isinstance(batch, PackedBatch):
        return batch
    out = dict(batch.rest)
    for name, dtype, shape, off in batch.layout:
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        out[name] = batch.data[off:off + n].view(dtype).reshape(shape)
    return {k: out[k] for k in batch.order}


class Batches:
    """A DataLoader over a `TrainStream` that yields batch dicts whether they come from workers (packed) or not."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader
        self.dataset: TrainStream = loader.dataset

    def __iter__(self) -> Iterator[dict]:
        return map(unpack_batch, _worker_errors_as_messages(iter(self.loader)))

    def __len__(self) -> int:
        return len(self.dataset)


def _worker_errors_as_messages(batches: Iterator) -> Iterator:
    """`batches`, with a user error a worker raised (a ValueError subclass: CacheError, DataError, ...) re-raised as
    the same type with its own one-line message, as with --workers 0. The DataLoader re-raises it as "Caught X in
    DataLoader worker process N. Original Traceback ...", which the CLI would print whole."""
    try:
        yield from batches
    except ValueError as e:
        text, kind = str(e), type(e)
        if not text.startswith(f"Caught {kind.__name__} in DataLoader worker"):
            raise
        for mark in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
            if mark in text:
                raise kind(text.rsplit(mark, 1)[1].strip()) from None
        raise


def make_loader(spec: DataSpec, *, split: str, epoch: int, start_step: int = 0, workers: int = 0,
                student_preprocess: dict | None = None, tokenizer: Callable | None = None,
                teacher_preprocess: dict | None = None, return_texts: bool = False,
                pin_memory: bool | None = None, persistent: bool = False, rank: int = 0, ranks: int = 1,
                device_decode: bool = False) -> Batches:
    """The batches of a `TrainStream` through a DataLoader: the same batches in the same order for any `workers` (0 =
    in-process). `teacher_preprocess` and `return_texts` add the online-distillation outputs described in
    `TrainStream`. `persistent` keeps the workers between passes (move the stream with `.dataset.set_position`); see
    `EpochLoader`, which is how training uses it. Under DDP, `rank` of `ranks` gets its slice of every global batch
    (`order.worker_batches`); `start_step` counts global batches."""
    stream = TrainStream(spec, split=split, epoch=epoch, start_step=start_step,
                         student_preprocess=student_preprocess, tokenizer=tokenizer,
                         teacher_preprocess=teacher_preprocess, return_texts=return_texts, rank=rank, ranks=ranks,
                         device_decode=device_decode)
    return Batches(torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers,
        # With batch_size=None the collate function runs in the worker on each batch the stream yields: a worker's
        # batch crosses to the main process packed (in-process batches keep the default, which leaves them as dicts).
        collate_fn=pack_batch if workers > 0 else None,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=persistent and workers > 0))


class EpochLoader:
    """Every pass of a training run (each epoch's training batches, each validation) from one DataLoader whose workers
    are forked once and kept:

        loader = EpochLoader(spec, workers=2, student_preprocess=..., tokenizer=...)   # before the optimizer exists
        for batch in loader.start("train", epoch, start_step): ...
        for batch in loader.start("val", 0): ...
        loader.close()

    A forked worker's resident set starts as a copy of its parent's page tables, so workers forked after training
    has allocated gradients, optimizer state and the allocator's freed activations carry all of that in their RSS;
    a new pair per epoch and per validation did (issue 5: peak tree RSS 1.5x the student alone at --workers 2).
    Forked at the first `start`, before the first step, they carry only what the student-only loop's workers carry.
    Batches are the same as `make_loader`'s for the same (split, epoch, start_step): the position is read by each
    worker at the start of its pass, and batches a worker made for an abandoned pass are discarded by the
    DataLoader when the next pass starts."""

    def __init__(self, spec: DataSpec, *, workers: int = 0, **stream_kw):
        self.batches = make_loader(spec, split="train", epoch=0, workers=workers, persistent=True, **stream_kw)
        self.loader, self.stream = self.batches.loader, self.batches.dataset

    def start(self, split: str, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """The batches of `split` and `epoch` from `start_step` on; starting a pass abandons the previous one."""
        self.stream.set_position(split, epoch, start_step)
        return iter(self.batches)

    def close(self) -> None:
        """Stop the workers now rather than at garbage collection."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
