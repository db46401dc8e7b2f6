"""Student training data from a teacher cache: batches whose order is a pure function of (seed, epoch, step).

    spec = DataSpec(cache="cache.zarr", tower="image", batch_size=64, seed=0)
    loader = make_loader(spec, split="train", epoch=0, workers=4, student_preprocess=model.visual.preprocess_cfg)
    for batch in loader:          # {"pixels": uint8 [B,3,H,W], "teacher": float32 [B,D], "labels": ..., ...}
        ...

How the order stays the same whatever `workers` is, while every read stays sequential:

1. An *order stream* that every worker regenerates identically and cheaply: the tower's units (image shards, caption
   blocks) in a permutation seeded by (seed, epoch); each unit read sequentially (its cache arrays whole, i.e. whole
   chunks; for image pixels its tar with `sources.iter_shard`, members kept as undecoded bytes); rows passed through
   a fixed-size shuffle buffer seeded by (seed, epoch); then cut into batches.
2. Batch b is *materialised* (decode, crop replay, resize, tokenise: the expensive part) only by worker b % W. A
   DataLoader with batch_size=None round-robins over its workers, so it returns batches 0, 1, 2, ... in order.
3. Resuming at step k skips the first k batches without materialising them.

A worker sends each batch's small tensors packed into one (`PackedBatch`; one shared-memory segment instead of eight)
and the loader unpacks them. Training uses `EpochLoader`: one pool of workers, forked before the optimizer state
exists, serves every epoch and validation pass.

Memory is bounded by the shuffle buffer and a few units' cache arrays (the text tower's rows refer to their unit's
arrays until they leave the buffer), never by the dataset. Validation reads units in cache order without shuffling
and uses view 0, so it sees the same batches every epoch.

This module never imports the teacher (nor the build, which does): everything it needs is in the cache.
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from open_clip.transform import PreprocessCfg

from kdcache import tokens as cache_tokens
from kdcache.cache import schema
from kdcache.cache.reader import Cache, CacheError, open_cache
from kdcache.cache.schema import CAPTIONS, IMAGES, Unit
from kdcache.constants import TOWERS
from kdcache.shards import RawSample, RejectError, ShardReport, expand_urls, iter_shard, parse_sample
from kdcache.views import eval_transform_uint8, render_view, size_hw

log = logging.getLogger(__name__)
T = TypeVar("T")

SPLITS = ("train", "val")
# Stream ids that keep the generators of one (seed, epoch) independent of each other.
_UNIT_ORDER, _BUFFER = 1, 2
_PICKS = 4096  # shuffle-buffer indices drawn per RNG call (one call per row would dominate the order stream)


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
    val_fraction: float = 0.05     # fixed validation split by key hash (`split_of`)
    images: tuple[str, ...] = ()   # override of the shard locations: same count and order as the cache's inputs
    allow_incomplete: bool = False

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise DataError(f"tower must be one of {TOWERS}, got {self.tower!r}")
        if self.batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.seed < 0:  # numpy's SeedSequence takes non-negative integers only
            raise DataError(f"seed must be non-negative, got {self.seed}")
        if self.buffer < 0:
            raise DataError(f"buffer must be non-negative, got {self.buffer}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


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


@dataclass(slots=True)
class RawRow:
    """One row of the image tower's order stream: everything from the cache, plus the sample's undecoded tar members.
    Nothing expensive has happened to it yet."""

    shard: int                     # image shard index
    position: int                  # row in the shard
    key: str                       # __key__, also the split key
    teacher: np.ndarray            # float32 [D] teacher embedding of the chosen view
    other: np.ndarray              # float32 [D] teacher embedding of the paired caption, NaN when none
    has_other: bool
    label: int                     # -1 when none
    view: int = 0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    flip: bool = False
    members: dict[str, bytes] = field(default_factory=dict)  # the sample's tar members
    text: str = ""                                             # the paired caption (with return_texts)


@dataclass(slots=True, eq=False)
class CaptionBlock:
    """The text tower's rows of one unit (a caption block, or an image shard's paired captions) for one split, as
    arrays in their stored dtype. The text tower's order stream passes rows as (block, j) pairs: per row it makes a
    tuple, not a RawRow with copied arrays (that per-row work was most of the text loader's time); a block is freed
    once no pair in the shuffle buffer or a pending batch refers to it, so a pass holds a few units at a time."""

    shard: int                     # image shard index, -1 for a caption block
    corpus: int                    # caption corpus index, -1 for an image shard
    position: np.ndarray           # int64 [n] position in the shard, or record index in the corpus
    label: np.ndarray              # int64 [n], -1 when none
    texts: list[str] | None        # None when nothing needs them (tokens reused and no return_texts)
    teacher: np.ndarray            # [n, D] the caption's teacher embedding
    other: np.ndarray | None       # [n, D] the paired image's view-0 embedding; None for corpus rows
    tokens: np.ndarray | None      # [n, C] the stored tokens, when the student's tokenizer reuses them


def _usable_units(cache: Cache, kind: str, *, captioned: bool = False) -> list[Unit]:
    """Units whose data was written (a status exists, done or failed). Only an incomplete cache opened with
    allow_incomplete has units without one; their arrays may be missing or half written, so they are left out.
    `captioned`: only image units with at least one paired caption (their status counts them), so that the text
    tower skips the others without reading their arrays."""
    units = []
    for u in cache.units(kind):
        st = cache.status(u)
        if st is None:
            log.warning("%s: unit %s was never finished; its rows are left out", cache.path, u.name)
            continue
        if captioned and not st.get("captions", 1):
            continue
        units.append(u)
    return units


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


def _f32(a: np.ndarray) -> np.ndarray:
    # A copy, so that rows waiting in the shuffle buffer do not keep their whole unit's arrays alive.
    return np.array(a, dtype=np.float32, copy=True)


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
    """

    def __init__(self, spec: DataSpec, *, split: str, epoch: int, start_step: int = 0,
                 student_preprocess: dict | None = None, tokenizer: Callable | None = None,
                 teacher_preprocess: dict | None = None, return_texts: bool = False):
        super().__init__()
        self.spec = spec
        # Which pass the stream serves: (split, epoch, start_step) in shared memory, so that `set_position` in the main
        # process reaches persistent DataLoader workers (forked once, see `EpochLoader`) before their next pass.
        self._position = torch.zeros(3, dtype=torch.int64).share_memory_()
        self.set_position(split, epoch, start_step)
        self.tokenizer = tokenizer
        self.return_texts = return_texts
        self._len: dict[str, int] = {}
        self._eval_tf: dict[str, Callable] = {}  # built on first use, in the process that uses it
        # Checked here, in the main process, so a bad spec fails before any worker starts. The zarr group itself is
        # not kept: each worker opens its own in __iter__ (open zarr handles are not meant to be pickled).
        cache = _open(spec)
        self.views = cache.views
        self.build = {"max_pixels": int(cache.attrs["build"]["max_pixels"]),
                      "background": tuple(int(c) for c in cache.attrs["build"]["background"])}
        self.urls: list[str] = []
        self.student_preprocess: dict | None = None
        self.teacher_preprocess = None if teacher_preprocess is None else dict(teacher_preprocess)
        if self.teacher_preprocess is not None and "size" not in self.teacher_preprocess:
            raise DataError(f"teacher_preprocess needs a 'size', got {self.teacher_preprocess}")
        if spec.tower == "image":
            self.urls = _shard_urls(cache, spec.images)
            if student_preprocess is None:
                log.warning("no student preprocessing given: using the teacher's from the cache (%s)",
                            cache.attrs["preprocess"])
                student_preprocess = cache.attrs["preprocess"]
            self.student_preprocess = dict(student_preprocess)
            if "size" not in self.student_preprocess:
                raise DataError(f"student_preprocess needs a 'size', got {self.student_preprocess}")
        elif teacher_preprocess is not None:
            raise DataError("teacher_preprocess renders teacher views of images; the text tower has none")
        elif tokenizer is None:
            raise DataError("the text tower needs the student's tokenizer (tokenizer=open_clip.get_tokenizer(...))")
        # Text tower: the build's stored tokens replace the tokenizer when they are provably what it would give.
        recorded = cache.attrs["build"].get("tokens") if spec.tower == "text" else None
        self.token_context = cache_tokens.reusable_context(recorded, tokenizer)
        self.eot = recorded["eot"] if self.token_context else None
        if recorded and self.token_context is None:
            log.info("the student's tokenizer differs from the teacher's: captions are tokenised while loading")

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
            rows = count_rows(self.spec, split)
            b = self.spec.batch_size
            # training steps see full batches; validation sees every row
            self._len[split] = rows // b if split == "train" else -(-rows // b)
        return max(0, self._len[split] - self.start_step)

    # ------------------------------------------------------------------------------------------ the order stream

    def order(self, split: str | None = None, epoch: int | None = None) -> Iterator[RawRow | tuple[CaptionBlock, int]]:
        """The rows of `split` and `epoch` (default: the stream's position) in batch order, unmaterialised: identical in
        every process that computes it. Image tower: RawRow; text tower: (CaptionBlock, row) pairs."""
        split = self.split if split is None else split
        epoch = self.epoch if epoch is None else epoch
        cache = _open(self.spec)
        train = split == "train"
        if self.spec.tower == "image":
            units = _usable_units(cache, IMAGES)
        else:
            units = _usable_units(cache, IMAGES, captioned=True) + _usable_units(cache, CAPTIONS)
        if train:
            rng = np.random.default_rng([self.spec.seed, epoch, _UNIT_ORDER])
            units = [units[i] for i in rng.permutation(len(units)).tolist()]
        rows = (row for unit in units for row in self._unit_rows(cache, unit, split, epoch))
        if train and self.spec.buffer > 1:
            rows = _shuffled(rows, self.spec.buffer, np.random.default_rng([self.spec.seed, epoch, _BUFFER]))
        yield from rows

    def _unit_rows(self, cache: Cache, unit: Unit, split: str, epoch: int) -> Iterator:
        if self.spec.tower == "image":
            yield from self._image_rows(cache, unit, split, epoch)
            return
        block = self._corpus_block(cache, unit, split) if unit.kind == CAPTIONS else self._paired_block(cache, unit,
                                                                                                          split)
        for j in range(len(block.position)):
            yield block, j

    def _corpus_block(self, cache: Cache, unit: Unit, split: str) -> CaptionBlock:
        reuse, texts = self.token_context is not None, self._need_texts
        a = cache.read(unit, ["index", "valid", "emb"] + (["tokens"] if reuse else []) + (["text"] if texts else []))
        rows = np.flatnonzero(a["valid"])
        rows = rows[[split_of(caption_key(unit.index, i), self.spec.val_fraction) == split
                     for i in a["index"][rows].tolist()]]
        return CaptionBlock(shard=-1, corpus=unit.index, position=a["index"][rows].astype(np.int64),
                            label=np.full(len(rows), -1, np.int64), texts=a["text"][rows].tolist() if texts else None,
                            teacher=a["emb"][rows], other=None, tokens=a["tokens"][rows] if reuse else None)

    def _paired_block(self, cache: Cache, unit: Unit, split: str) -> CaptionBlock:
        reuse, texts = self.token_context is not None, self._need_texts
        a = cache.read(unit, ["key", "valid", "label", "caption", "caption_emb", "emb"]
                       + (["caption_tokens"] if reuse else []))
        rows = np.flatnonzero(a["valid"] & (a["caption"] != ""))
        rows = rows[[split_of(k, self.spec.val_fraction) == split for k in a["key"][rows].tolist()]]
        return CaptionBlock(shard=unit.index, corpus=-1, position=rows.astype(np.int64),
                            label=a["label"][rows].astype(np.int64),
                            texts=a["caption"][rows].tolist() if texts else None, teacher=a["caption_emb"][rows],
                            other=a["emb"][rows, 0], tokens=a["caption_tokens"][rows] if reuse else None)

    @property
    def _need_texts(self) -> bool:
        return self.return_texts or self.token_context is None

    def _image_rows(self, cache: Cache, unit: Unit, split: str, epoch: int) -> Iterator[RawRow]:
        """The shard's tar streamed in order and joined to the cache rows by position, checking every key."""
        a = cache.read(unit, ["key", "valid", "label", "caption", "caption_emb", "view_box", "view_flip", "emb"])
        rows = len(a["key"])
        limited = bool((cache.status(unit) or {}).get("limited"))
        url = self.urls[unit.index]
        report = ShardReport(url=url)
        seen = 0
        train = split == "train"
        for raw in iter_shard(url, report):
            p = raw.position
            if p >= rows:
                if limited:  # a `--limit` build cached only the first rows of this shard
                    break
                raise DataError(f"shard {unit.index} ({url}) has more samples than the {rows} rows the cache holds "
                                f"for it (position {p}, key {raw.key!r}): it was rewritten after the build")
            seen = p + 1
            cached = str(a["key"][p])
            if raw.key != cached:
                raise DataError(f"shard {unit.index} ({url}) position {p}: the tar has key {raw.key!r} where the "
                                f"cache has {cached!r}; the shards were moved or rewritten (check --images)")
            if not a["valid"][p] or split_of(cached, self.spec.val_fraction) != split:
                continue
            v = choose_view(seed=self.spec.seed, epoch=epoch, shard=unit.index, position=p,
                            views=self.views) if train else 0
            has_other = bool(a["caption"][p] != "")
            yield RawRow(shard=unit.index, position=p, key=cached, teacher=_f32(a["emb"][p, v]),
                         other=_f32(a["caption_emb"][p]), has_other=has_other, label=int(a["label"][p]), view=v,
                         box=tuple(int(x) for x in a["view_box"][p, v]), flip=bool(a["view_flip"][p, v]),
                         members=raw.members, text=str(a["caption"][p]) if self.return_texts else "")
        if seen < rows:
            detail = f" ({report.error})" if report.error else ""
            hint = "; if the shards moved, give their new locations (--images)" if seen == 0 else ""
            raise DataError(f"shard {unit.index} ({url}) yielded {seen} samples but the cache has {rows} rows for "
                            f"it{detail}: the shard was truncated or rewritten after the build{hint}")

    # ----------------------------------------------------------------------------------------- materialising

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        split, epoch, start = self.split, self.epoch, self.start_step  # one snapshot for the whole pass
        size = self.spec.batch_size
        make = self._image_batch if self.spec.tower == "image" else self._text_batch
        # In a worker, a batch crosses to the main process as one tensor (see pack_batch).
        materialise = make if info is None else (lambda rows: pack_batch(make(rows)))
        b, batch = 0, []
        for row in self.order(split, epoch):
            batch.append(row)
            if len(batch) == size:
                # DataLoader asks worker 0 first, then 1, ...: the first batch after the resume point is worker 0's.
                if b >= start and (b - start) % nw == wid:
                    yield materialise(batch)
                b, batch = b + 1, []
        if batch and split != "train" and b >= start and (b - start) % nw == wid:
            yield materialise(batch)

    def decode_image(self, row: RawRow):
        """The row's picture decoded exactly as the build decoded it (same max_pixels and background)."""
        raw = RawSample(key=row.key, position=row.position, members=row.members)
        try:
            return parse_sample(raw, max_pixels=self.build["max_pixels"], background=self.build["background"]).image
        except RejectError as e:
            raise DataError(f"shard {row.shard} position {row.position} (key {row.key!r}) was valid at build time but "
                            f"now fails to decode ({e}): the shard was rewritten after the build") from None

    def replay(self, row: RawRow) -> torch.Tensor:
        """The cached view of the row at the student's size: view 0 is the student's own eval transform (as view 0
        is the teacher's), view v >= 1 the recorded crop box and flip resized with the student's interpolation."""
        return self._render(self.decode_image(row), row, "student")

    def _render(self, img, row: RawRow, who: str) -> torch.Tensor:
        """The row's view of a decoded picture at `who`'s ("student" | "teacher") size and interpolation."""
        preprocess = self.student_preprocess if who == "student" else self.teacher_preprocess
        if row.view == 0:
            if who not in self._eval_tf:
                self._eval_tf[who] = eval_transform_uint8(preprocess)
            return self._eval_tf[who](img)
        interp = preprocess.get("interpolation") or PreprocessCfg.interpolation
        return render_view(img, row.box, row.flip, size=size_hw(preprocess), interpolation=interp)

    def _common(self, rows: list[RawRow]) -> dict[str, torch.Tensor]:
        return {
            "teacher": torch.from_numpy(np.stack([r.teacher for r in rows])),
            "other": torch.from_numpy(np.stack([r.other for r in rows])),
            "has_other": torch.tensor([r.has_other for r in rows], dtype=torch.bool),
            "labels": torch.tensor([r.label for r in rows], dtype=torch.int64),
            "shard": torch.tensor([r.shard for r in rows], dtype=torch.int64),
            "position": torch.tensor([r.position for r in rows], dtype=torch.int64),
        }

    def _image_batch(self, rows: list[RawRow]) -> dict:
        if self.teacher_preprocess is None:
            pixels = torch.stack([self.replay(r) for r in rows])
            extra = {}
        else:  # decode once, render the same view for both models
            views = []
            for r in rows:
                img = self.decode_image(r)
                views.append((self._render(img, r, "student"), self._render(img, r, "teacher")))
            pixels = torch.stack([s for s, _ in views])
            extra = {"teacher_pixels": torch.stack([t for _, t in views])}
        if self.return_texts:
            extra["texts"] = [r.text for r in rows]
        return {"pixels": pixels, **self._common(rows), "view": torch.tensor([r.view for r in rows], dtype=torch.int64),
                **extra}

    def _text_batch(self, rows: list[tuple[CaptionBlock, int]]) -> dict:
        # Rows grouped by block, so each array is gathered with one fancy index per block rather than row by row.
        groups: dict[int, tuple[CaptionBlock, list[int], list[int]]] = {}
        for i, (blk, j) in enumerate(rows):
            g = groups.get(id(blk))
            if g is None:
                g = groups[id(blk)] = (blk, [], [])
            g[1].append(i)
            g[2].append(j)

        def gather(get: Callable[[CaptionBlock], np.ndarray | int | None], tail: tuple[int, ...], fill,
                   dtype) -> torch.Tensor:
            out = np.full((len(rows), *tail), fill, dtype)
            for blk, ii, jj in groups.values():
                v = get(blk)
                if v is not None:
                    out[ii] = v[jj] if isinstance(v, np.ndarray) else v
            return torch.from_numpy(out)

        dim = rows[0][0].teacher.shape[1]
        texts = [blk.texts[j] for blk, j in rows] if self._need_texts else None
        if self.token_context is not None:
            stored = gather(lambda b: b.tokens, rows[0][0].tokens.shape[1:], 0, np.int64).numpy()
            tokens = torch.from_numpy(cache_tokens.fit(stored, self.token_context, eot=self.eot))
        else:
            tokens = torch.as_tensor(self.tokenizer(texts), dtype=torch.int64)
        return {
            "tokens": tokens,
            "teacher": gather(lambda b: b.teacher, (dim,), np.nan, np.float32),
            "other": gather(lambda b: b.other, (dim,), np.nan, np.float32),
            "has_other": gather(lambda b: b.other is not None, (), False, bool),
            "labels": gather(lambda b: b.label, (), -1, np.int64),
            "shard": gather(lambda b: b.shard, (), -1, np.int64),
            "position": gather(lambda b: b.position, (), -1, np.int64),
            "corpus": gather(lambda b: b.corpus, (), -1, np.int64),
            **({"texts": texts} if self.return_texts else {}),
        }


def _open(spec: DataSpec) -> Cache:
    need = [schema.CAP_IMAGES] if spec.tower == "image" else []
    cache = open_cache(spec.cache, allow_incomplete=spec.allow_incomplete, need=need)
    if spec.tower == "text" and not {schema.CAP_CAPTIONS, schema.CAP_PAIRED} & set(cache.capabilities):
        raise CacheError(f"{spec.cache}: the text tower needs caption corpora or paired captions; the cache has "
                         f"neither (capabilities {cache.capabilities})")
    return cache


def _shard_urls(cache: Cache, images: tuple[str, ...]) -> list[str]:
    """Where the image shards are now: the cache's recorded inputs, or the override (same count, same order)."""
    recorded = list(cache.attrs["inputs"]["images"])
    if not images:
        return recorded
    urls = expand_urls(list(images))
    if len(urls) != len(recorded):
        raise DataError(f"--images names {len(urls)} shard(s) but the cache was built from {len(recorded)}; give "
                        f"them all, in the build's order (first recorded: {recorded[:1]})")
    return urls


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


def unpack_batch(batch) -> dict:
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
        return map(unpack_batch, iter(self.loader))

    def __len__(self) -> int:
        return len(self.dataset)


def make_loader(spec: DataSpec, *, split: str, epoch: int, start_step: int = 0, workers: int = 0,
                student_preprocess: dict | None = None, tokenizer: Callable | None = None,
                teacher_preprocess: dict | None = None, return_texts: bool = False,
                pin_memory: bool | None = None, persistent: bool = False) -> Batches:
    """The batches of a `TrainStream` through a DataLoader: the same batches in the same order for any `workers` (0 =
    in-process). `teacher_preprocess` and `return_texts` add the online-distillation outputs described in
    `TrainStream`. `persistent` keeps the workers between passes (move the stream with `.dataset.set_position`); see
    `EpochLoader`, which is how training uses it."""
    stream = TrainStream(spec, split=split, epoch=epoch, start_step=start_step,
                         student_preprocess=student_preprocess, tokenizer=tokenizer,
                         teacher_preprocess=teacher_preprocess, return_texts=return_texts)
    return Batches(torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers,
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


def count_rows(spec: DataSpec, split: str) -> int:
    """Rows of a split, from the cache's small arrays alone (no tar is read): for steps per epoch."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    cache = _open(spec)
    n = 0
    for unit in _usable_units(cache, IMAGES, captioned=spec.tower == "text"):
        names = ["key", "valid"] + (["caption"] if spec.tower == "text" else [])
        a = cache.read(unit, names)
        keep = a["valid"] & (a["caption"] != "") if spec.tower == "text" else a["valid"]
        n += sum(split_of(str(k), spec.val_fraction) == split for k in a["key"][keep].tolist())
    if spec.tower == "text":
        for unit in _usable_units(cache, CAPTIONS):
            a = cache.read(unit, ["index", "valid"])
            n += sum(split_of(caption_key(unit.index, int(i)), spec.val_fraction) == split
                     for i in a["index"][a["valid"]].tolist())
    return n
