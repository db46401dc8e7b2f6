"""The data order: pure functions of (seed, epoch, step) and of the cache's keys, never of the worker or of RNG state.

Which split a row is in (`split_of`), which cached view a training sample shows (`choose_view`), the order of a pass's
rows (`row_order`: a seeded unit permutation, then a seeded shuffle buffer) and which of its batches a worker makes
(`worker_batches`, which also gives each DDP rank its slice of every batch). Every DataLoader worker and every rank
computes the same order; hashes and seeds are independent of Python's hash randomisation and of the platform.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")
U = TypeVar("U")

SPLITS = ("train", "val")
# Stream ids that keep the generators of one (seed, epoch) independent of each other.
_UNIT_ORDER, _BUFFER = 1, 2
_PICKS = 4096  # shuffle-buffer indices drawn per RNG call (one call per row would dominate the order stream)


def _hash_unit(data: bytes, person: bytes) -> float:
    """blake2b of `data` as a float in [0, 1): independent of Python's hash randomisation, workers and platform."""
    digest = hashlib.blake2b(data, digest_size=8, person=person).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_of(key: str, val_fraction: float) -> str:
    """The fixed split of a row: "val" for a `val_fraction` share of keys chosen by hash, else "train". Image rows
    are keyed by `__key__` (their paired captions too, so a pair never straddles the split), corpus captions by
    `caption_key`."""
    return "val" if _hash_unit(key.encode("utf-8"), b"kdcache-split") < val_fraction else "train"


def caption_key(corpus: int, index: int) -> str:
    """The split key of a caption-corpus record: its address in the inputs, stable across rebuilds."""
    return f"cap:{corpus}:{index}"


def choose_view(*, seed: int, epoch: int, shard: int, position: int, views: int) -> int:
    """The cached view a training sample shows in this epoch: a hash of (seed, epoch, shard, position), so it depends
    on neither the worker nor any RNG state."""
    if views <= 1:
        return 0
    return int(_hash_unit(struct.pack("<4q", seed, epoch, shard, position), b"kdcache-view") * views)


def choose_views(*, seed: int, epoch: int, shard: int, position: int, views: int, m: int) -> list[int]:
    """`m` views of a sample for one training epoch (repeated augmentation): `choose_view`'s one when m == 1; else
    distinct views in an order drawn from (seed, epoch, shard, position), cycling when m exceeds the views cached."""
    if m == 1:
        return [choose_view(seed=seed, epoch=epoch, shard=shard, position=position, views=views)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, shard, position, 0x6B6476])))
    perm = rng.permutation(views)
    return [int(perm[i % views]) for i in range(m)]


def _shuffled(rows: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """A fixed-size shuffle buffer: once full, each incoming row replaces (and releases) a random resident one."""
    buf: list[T] = []
    picks: Iterator[int] = iter(())
    for row in rows:
        if len(buf) < size:
            buf.append(row)
            continue
        j = next(picks, None)
        if j is None:
            picks = iter(rng.integers(0, size, _PICKS).tolist())
            j = next(picks)
        out, buf[j] = buf[j], row
        yield out
    for j in rng.permutation(len(buf)).tolist():
        yield buf[j]


def row_order(units: Sequence[U], rows_of: Callable[[U], Iterable[T]], *, train: bool, seed: int, epoch: int,
              buffer: int) -> Iterator[T]:
    """The rows of one pass in batch order, each unit's rows (`rows_of`, read sequentially) one unit after another.
    Training: units in a permutation seeded by (seed, epoch), rows through a `buffer`-row shuffle buffer seeded by
    (seed, epoch). Validation: units in cache order, unshuffled, so it sees the same batches every epoch."""
    if train:
        rng = np.random.default_rng([seed, epoch, _UNIT_ORDER])
        units = [units[i] for i in rng.permutation(len(units)).tolist()]
    rows: Iterable[T] = (row for unit in units for row in rows_of(unit))
    if train and buffer > 1:
        rows = _shuffled(rows, buffer, np.random.default_rng([seed, epoch, _BUFFER]))
    yield from rows


def worker_batches(rows: Iterable[T], *, size: int, keep_last: bool, start: int, worker: int,
                   workers: int, rank: int = 0, ranks: int = 1) -> Iterator[list[T]]:
    """The batches of `size` rows that `worker` of `workers` materialises for `rank` of `ranks` (DDP processes).

    The whole order is cut into global batches of `ranks * size` rows; rank r's batch is rows [r*size, (r+1)*size)
    of each, so the ranks' batches are disjoint and, concatenated in rank order, are the one-process batch of
    `ranks * size` rows: the order stays a function of (seed, epoch, step) alone. Global batch b >= `start` goes to
    worker (b - start) % workers. DataLoader asks worker 0 first, then 1, ..., so the round-robin merge of the workers'
    batches is global batches start, start + 1, ... whatever the worker count. `keep_last`: also the final, short
    global batch, whose rows go to the first ranks (validation sees every row exactly once across ranks; a rank whose
    slice is empty gets no batch). Training steps see full batches only."""
    if not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} is not in [0, {ranks})")
    whole = size * ranks
    lo, hi = rank * size, (rank + 1) * size
    b, batch = 0, []
    for row in rows:
        batch.append(row)
        if len(batch) == whole:
            if b >= start and (b - start) % workers == worker:
                yield batch[lo:hi]
            b, batch = b + 1, []
    if batch[lo:hi] and keep_last and b >= start and (b - start) % workers == worker:
        yield batch[lo:hi]
