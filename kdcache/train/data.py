"""Student training data from a teacher cache: batches whose order is a pure function of (seed, epoch, step).

    spec = DataSpec(cache="cache.zarr", tower="image", batch_size=64, seed=0)
    loader = make_loader(spec, split="train", epoch=0, workers=4, student_preprocess=model.visual.preprocess_cfg)
    for batch in loader:          # {"pixels": uint8 [B,3,H,W], "teacher": float32 [B,D], "labels": ..., ...}
        ...

How the order stays the same whatever `workers` is, while every read stays sequential:

1. An *order stream* that every worker regenerates identically and cheaply (`TrainStream.order`): the tower's units
   (image shards, caption blocks) in a permutation seeded by (seed, epoch); each unit read sequentially (its cache
   arrays whole, i.e. whole chunks; for image pixels its tar with `shards.iter_shard`, members kept as undecoded
   bytes); rows passed through a fixed-size shuffle buffer seeded by (seed, epoch); then cut into batches.
2. Batch b is *materialised* (decode, crop replay, resize, tokenise: the expensive part) only by worker b % W. A
   DataLoader with batch_size=None round-robins over its workers, so it returns batches 0, 1, 2, ... in order.
3. Resuming at step k skips the first k batches without materialising them.

The pieces: `dataspec` (DataSpec, DataError), `order` (the pure order functions), `rows` (`Rows`, `ImageRows`) and
`textrows` (`TextRows`): a tower's units, split filter, unit rows and batch materialisation; this module
(`TrainStream`, `count_rows`) and `loader` (`make_loader`, `EpochLoader`: the DataLoader around a stream, and the
packing of worker batches).

Memory is bounded by the shuffle buffer and a few units' cache arrays (the text tower's rows refer to their unit's
arrays until they leave the buffer), never by the dataset. Validation reads units in cache order without shuffling
and uses view 0, so it sees the same batches every epoch.

Like all of kdcache/train it never imports the teacher nor the build: everything it needs is in the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from kdcache.train.dataspec import DataError, DataSpec
from kdcache.train.order import SPLITS, row_order, worker_batches
from kdcache.train.rows import ImageRows, RawRow, Rows
from kdcache.train.textrows import CaptionBlock, TextRows

# The rows class of each tower (kdcache.constants.TOWERS): the one place a tower name picks behaviour.
ROWS: dict[str, type[Rows]] = {"image": ImageRows, "text": TextRows}


class TrainStream(torch.utils.data.IterableDataset):
    """The batches of one split and epoch of a cache, starting at `start_step`. Use it through `make_loader` (a
    DataLoader with batch_size=None), or iterate it directly (one process).

    Image tower batches: pixels uint8 [B,3,H,W] at the student's size, teacher float32 [B,D] (the cached embedding of
    the replayed view), labels int64 [B] (-1 none), other float32 [B,D] (paired caption embedding, NaN none),
    has_other bool [B], view/shard/position int64 [B].
    Text tower batches: tokens int64 [B,ctx], teacher float32 [B,D] (caption embedding), other float32 [B,D] (the
    paired image's view-0 embedding, NaN for corpus rows), has_other, labels, and shard/corpus/position int64 [B]
    (shard -1 for corpus rows, corpus -1 for paired captions).

    Extra outputs for online distillation (kdcache/online), off by default: with `teacher_preprocess`, image batches
    also carry teacher_pixels uint8 [B,3,Ht,Wt], the same view rendered at the teacher's size and interpolation (view
    0: the teacher's eval transform; the picture is decoded once for both); with `return_texts`, batches carry texts
    list[str] (image tower: the paired caption, "" when none; text tower: the caption).

    With `device_decode` (image tower, a `--decode gpu` cache on a CUDA student), image batches carry "replay"
    (`kdcache.train.replay.ReplayJobs`: undecoded JPEGs and view records) instead of pixels, for the main process to
    decode and render on the device (`DeviceReplay`), as the build did.
    """

    def __init__(self, spec: DataSpec, *, split: str, epoch: int, start_step: int = 0,
                 student_preprocess: dict | None = None, tokenizer: Callable | None = None,
                 teacher_preprocess: dict | None = None, return_texts: bool = False, rank: int = 0, ranks: int = 1,
                 device_decode: bool = False):
        super().__init__()
        if not 0 <= rank < ranks:
            raise DataError(f"rank {rank} is not in [0, ranks={ranks})")
        self.spec = spec
        # DDP: this process's rank of `ranks`; it serves its slice of every global batch (`order.worker_batches`).
        self.rank, self.ranks = rank, ranks
        # Which pass the stream serves: (split, epoch, start_step) in shared memory, so that `set_position` in the main
        # process reaches persistent DataLoader workers (forked once, see `EpochLoader`) before their next pass.
        self._position = torch.zeros(3, dtype=torch.int64).share_memory_()
        self.set_position(split, epoch, start_step)
        self._len: dict[str, int] = {}
        # Checked here, in the main process, so a bad spec fails before any worker starts. The zarr group itself is
        # not kept: each worker opens its own in __iter__ (open zarr handles are not meant to be pickled).
        tower = ROWS[spec.tower]
        self.rows: Rows = tower(spec, tower.open(spec), student_preprocess=student_preprocess, tokenizer=tokenizer,
                                teacher_preprocess=teacher_preprocess, return_texts=return_texts,
                                device_decode=device_decode)

    def set_position(self, split: str, epoch: int, start_step: int = 0) -> None:
        """Serve `split` of `epoch` from batch `start_step` on, from the next `iter()` of the stream or its loader."""
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        if epoch < 0 or start_step < 0:
            raise DataError(f"epoch and start_step must be non-negative, got {epoch} and {start_step}")
        self._position.copy_(torch.tensor([SPLITS.index(split), epoch, start_step]))

    @property
    def split(self) -> str:
        return SPLITS[int(self._position[0])]

    @property
    def epoch(self) -> int:
        return int(self._position[1])

    @property
    def start_step(self) -> int:
        return int(self._position[2])

    def __len__(self) -> int:
        """Batches this stream yields (after `start_step`); counting reads the cache's small arrays once per split."""
        split = self.split
        if split not in self._len:
            self._len[split] = count_rows(self.spec, split)
        rows, b = self._len[split], self.spec.batch_size
        if split == "train":  # training steps see full global batches (ranks x batch_size rows)
            return max(0, rows // (b * self.ranks) - self.start_step)
        # validation sees every row: of its batch_size-row chunks, global batch g gives rank r chunk g * ranks + r
        return len(range(self.start_step * self.ranks + self.rank, -(-rows // b), self.ranks))

    def order(self, split: str | None = None, epoch: int | None = None) -> Iterator[RawRow | tuple[CaptionBlock, int]]:
        """The rows of `split` and `epoch` (default: the stream's position) in batch order, unmaterialised: identical in
        every process that computes it. Image tower: RawRow; text tower: (CaptionBlock, row) pairs."""
        split = self.split if split is None else split
        epoch = self.epoch if epoch is None else epoch
        rows, cache = self.rows, self.rows.open(self.spec)
        yield from row_order(rows.units(cache), lambda unit: rows.unit_rows(cache, unit, split=split, epoch=epoch),
                             train=split == "train", seed=self.spec.seed, epoch=epoch, buffer=self.spec.buffer)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        split, epoch, start = self.split, self.epoch, self.start_step  # one snapshot for the whole pass
        # A training item is a sample with views_per_sample views, so a batch of batch_size views holds fewer items.
        size = self.spec.batch_size // (self.spec.views_per_sample if split == "train" else 1)
        for rows in worker_batches(self.order(split, epoch), size=size, keep_last=split != "train",
                                   start=start, worker=worker, workers=workers, rank=self.rank, ranks=self.ranks):
            yield self.rows.batch(rows)

    # The tower's own surface, for callers holding a stream (tests, bench/bench_read.py): the image tower's decoding
    # and preprocessing, the text tower's token reuse (which a benchmark switches off to time the tokenizer).

    def decode_image(self, row: RawRow):
        """The row's picture decoded exactly as the build decoded it (image tower; `ImageRows.decode_image`)."""
        return self.rows.decode_image(row)

    @property
    def student_preprocess(self) -> dict:
        """The student's preprocessing the image tower renders views with."""
        return self.rows.student_preprocess

    @property
    def token_context(self) -> int | None:
        """The text tower's context of reused stored tokens; None when the tokenizer runs while loading."""
        return self.rows.token_context

    @token_context.setter
    def token_context(self, context: int | None) -> None:
        self.rows.token_context = context


def count_rows(spec: DataSpec, split: str) -> int:
    """Rows of a split, from the cache's small arrays alone (no tar is read): for steps per epoch. The split filter is
    the stream's own (`Rows.in_split`), so the count is the number of rows a pass yields (training: each sample's
    views_per_sample views)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    tower = ROWS[spec.tower]
    samples = tower.count(tower.open(spec), split, spec.val_fraction, subset=spec.subset)
    return samples * spec.views_per_sample if split == "train" else samples


def subset_rows(spec: DataSpec) -> dict[str, int]:
    """Rows of each split that the spec's subset keeps (as `count_rows` counts them); a subset that keeps no row at
    all is an error naming it."""
    kept = {split: count_rows(spec, split) for split in SPLITS}
    if not any(kept.values()):
        raise DataError(f"the filter {spec.subset.describe()} keeps no {spec.tower}-tower rows of {spec.cache}: "
                        "a pattern matches a whole __key__ or shard file name (glob), or anywhere in one (re:)")
    return kept
