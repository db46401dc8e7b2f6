"""What a student's training data is (`DataSpec`) and the error raised when a cache cannot serve it (`DataError`).

The bottom of the data modules (order, rows, data, loader): they all import it, it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdcache.constants import TOWERS
from kdcache.subset import Subset

if TYPE_CHECKING:
    from kdcache.train.cachepin import CachePin


class DataError(ValueError):
    """The data cannot be served as the cache describes it (shards moved or rewritten, a bad spec); the message names
    the shard, position and keys involved."""


@dataclass(frozen=True)
class DataSpec:
    """What to read and how to order it; the same spec and (split, epoch, step) always give the same batches."""

    cache: str                     # cache path
    tower: str                     # "image" | "text"
    batch_size: int
    seed: int = 0
    buffer: int = 2048             # shuffle buffer (rows); 0 turns shuffling within the unit order off
    val_fraction: float = 0.05     # fixed validation split by key hash (`order.split_of`)
    images: tuple[str, ...] = ()   # override of the shard locations: same count and order as the cache's inputs
    allow_incomplete: bool = False
    views_per_sample: int = 1      # image tower, training: M cached views of each decoded picture in the same batch
    hints: tuple[str, ...] = ()    # image tower: cached teacher hints (module paths) each batch carries as "hint:NAME"
    subset: Subset = Subset()      # rows kept (kdcache.subset: --include/--exclude/--labels), before the split
    pin: CachePin | None = None    # the units a run trains on (kdcache.train.cachepin); None: the cache as it is

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise DataError(f"tower must be one of {TOWERS}, got {self.tower!r}")
        if self.batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.seed < 0:  # numpy's SeedSequence takes non-negative integers only
            raise DataError(f"seed must be non-negative, got {self.seed}")
        if self.buffer < 0:
            raise DataError(f"buffer must be non-negative, got {self.buffer}")
        if self.views_per_sample < 1:
            raise DataError(f"views_per_sample must be at least 1, got {self.views_per_sample}")
        if self.views_per_sample > 1 and self.tower != "image":
            raise DataError("views_per_sample is for the image tower (a caption has one view)")
        if self.batch_size % self.views_per_sample:
            raise DataError(f"batch_size {self.batch_size} must be a multiple of views_per_sample "
                            f"{self.views_per_sample} (a batch holds whole samples)")
        if not isinstance(self.subset, Subset) or not self.subset.resolved:
            raise DataError(f"subset must be a Subset with class ids, got {self.subset!r} (Subset.resolve names them)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
