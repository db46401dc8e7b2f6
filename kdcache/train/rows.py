"""A tower's rows of a teacher cache: `ImageRows` here and `TextRows` (`kdcache.train.textrows`), behind one small
interface (`Rows`).

A rows class says which units its tower reads (`units`), which rows of a unit a split holds (`in_split`), what those
rows are, in unit order and unmaterialised (`unit_rows`: cheap, computed by every worker), and how a batch of them is
materialised (`batch`: the expensive part, done only by the batch's worker). `kdcache.train.data.TrainStream` puts the
rows of every unit in the data order and cuts them into batches; it picks the class by tower name, in one dict.

`in_split` is the one definition of a split: the stream filters each unit with it, and `count` (steps per epoch)
applies it to the same small arrays without reading any tar. It applies the spec's subset (`kdcache.subset`:
--include/--exclude on `__key__` or shard file name, --labels) first, then the split by key hash, so the subset's
rows are split as they would be in the whole cache. Image rows and paired captions match by their image's
`__key__`, shard file name and label; caption-corpus records by their split key `cap:CORPUS:INDEX` and the corpus file
name, and have no label (`check_subset` refuses --labels while corpus rows are read).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

import numpy as np
import torch
from open_clip.transform import PreprocessCfg

from kdcache.augment import Policy, ViewRecord, erase_fill, record_arrays, render, unpack_record
from kdcache.cache import schema
from kdcache.cache.reader import Cache, CacheError, open_cache
from kdcache.cache.schema import CAPTIONS, IMAGES, Unit
from kdcache.shards import RawSample, RejectError, ShardReport, iter_shard, parse_sample
from kdcache.shards.gpudecode import probe_image
from kdcache.subset import Subset, shard_name
from kdcache.train.cachepin import open_pinned
from kdcache.train.dataspec import DataError, DataSpec
from kdcache.train.order import choose_view, choose_views, split_of
from kdcache.train.replay import ReplayJobs, ReplayRow
from kdcache.views import eval_transform_uint8, size_hw

log = logging.getLogger(__name__)
R = TypeVar("R")
# Caches whose decoder note was logged in this process: one line per cache, not one per split or loader.
_DECODE_NOTED: set[str] = set()


def note_decoder(cache: Cache) -> None:
    """Log once per cache that a `--decode gpu` cache (its JPEGs decoded by nvjpeg) is replayed with PIL (libjpeg; no
    CUDA, or `--decode cpu`): what this student sees differs from what the teacher saw by the two decoders' rounding
    (README, "--decode")."""
    if cache.attrs["build"].get("decode", "cpu") != "gpu" or str(cache.path) in _DECODE_NOTED:
        return
    _DECODE_NOTED.add(str(cache.path))
    log.info("%s was built with --decode gpu (JPEGs decoded by nvjpeg, views resized on the GPU); this student replays "
             "its views with PIL, so its pixels differ slightly from the teacher's (README: --decode)", cache.path)


def usable_units(cache: Cache, kind: str, *, captioned: bool = False) -> list[Unit]:
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


def keyed_split(rows: np.ndarray, keys: np.ndarray, split: str, val_fraction: float) -> np.ndarray:
    """Those of `rows` whose key (`keys[row]`) falls in `split`."""
    return rows[[split_of(k, val_fraction) == split for k in keys[rows].tolist()]]


def unit_name(unit: Unit) -> str:
    """The file name a subset pattern matches for a unit's rows: the image shard's, or the caption corpus's (its
    recorded source is "KIND:PATH")."""
    return shard_name(unit.source.split(":", 1)[1] if unit.kind == CAPTIONS else unit.source)


def selected_rows(a: dict[str, np.ndarray], unit: Unit, subset: Subset, keys: list[str] | np.ndarray) -> np.ndarray:
    """The subset's mask over a unit's rows (all True without a filter)."""
    if not subset:
        return np.ones(len(keys), dtype=bool)
    return subset.mask(keys, shard=unit_name(unit), labels=a.get("label") if subset.labels else None)


class Rows(ABC, Generic[R]):
    """One tower's rows of a cache. Built by `TrainStream` with the cache it opened (via `open`) and its keyword
    options (student_preprocess, tokenizer, teacher_preprocess, return_texts; each class uses those it needs and
    refuses a spec it cannot serve); the class methods also serve `count_rows`, which has no stream."""

    # The arrays of a unit, by unit kind, that `in_split` reads: all that counting a split reads.
    split_arrays: ClassVar[dict[str, tuple[str, ...]]]

    @classmethod
    def open(cls, spec: DataSpec) -> Cache:
        """The spec's cache, checked to hold what this tower reads (a bad spec fails before any worker starts)."""
        if spec.pin is not None:  # a run's readers see the units it started with (kdcache.train.cachepin)
            cache = open_pinned(spec.cache, spec.pin, allow_incomplete=spec.allow_incomplete)
        else:
            cache = open_cache(spec.cache, allow_incomplete=spec.allow_incomplete)
        cls.check(cache)
        if spec.subset.labels:
            cls.check_labels(cache, spec.subset)
        return cache

    @classmethod
    def check_labels(cls, cache: Cache, subset: Subset) -> None:
        """Refuse (DataError) --labels where this tower's rows carry no labels."""
        if schema.CAP_LABELS not in cache.capabilities:
            raise DataError(f"--labels: {cache.path} has no labels (its shards had no .cls); filter with "
                            "--include/--exclude instead")

    @classmethod
    @abstractmethod
    def check(cls, cache: Cache) -> None:
        """Raise CacheError, naming the capabilities, when the cache lacks what this tower reads."""

    @classmethod
    @abstractmethod
    def units(cls, cache: Cache) -> list[Unit]:
        """The units this tower reads, in cache order."""

    @staticmethod
    @abstractmethod
    def in_split(a: dict[str, np.ndarray], unit: Unit, split: str, val_fraction: float, *,
                 subset: Subset) -> np.ndarray:
        """Indices (ascending) of the unit's rows that `split` holds among those `subset` keeps, from its
        `split_arrays` read whole (and "label", with --labels)."""

    @classmethod
    def count(cls, cache: Cache, split: str, val_fraction: float, *, subset: Subset) -> int:
        """Rows of `split` that `subset` keeps, from the cache's small arrays alone (no tar is read)."""
        def arrays(u: Unit) -> tuple[str, ...]:
            return cls.split_arrays[u.kind] + (("label",) if subset.labels and u.kind == IMAGES else ())
        return sum(len(cls.in_split(cache.read(u, arrays(u)), u, split, val_fraction, subset=subset))
                   for u in cls.units(cache))

    @abstractmethod
    def unit_rows(self, cache: Cache, unit: Unit, *, split: str, epoch: int) -> Iterator[R]:
        """The unit's rows in `split`, in unit order and unmaterialised: identical in every process."""

    @abstractmethod
    def batch(self, rows: list[R]) -> dict:
        """A batch of rows materialised: the tensors a training step takes (see `TrainStream`)."""


# --------------------------------------------------------------------------------------------------- image tower


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
    rec: ViewRecord | None = None                              # the view's full record (box and flip included)
    partner_members: dict[str, bytes] | None = None            # a mixed view's partner sample's tar members
    partner_position: int = -1
    partner_rec: ViewRecord | None = None                      # the partner's own record of the same view index
    hints: tuple[np.ndarray, ...] = ()                          # float32 teacher hints of the view (DataSpec.hints)


def _f32(a: np.ndarray) -> np.ndarray:
    # A copy, so that rows waiting in the shuffle buffer do not keep their whole unit's arrays alive.
    return np.array(a, dtype=np.float32, copy=True)


class ImageRows(Rows[RawRow | tuple[RawRow, ...]]):
    """The image tower: each image shard's tar streamed in order and joined to its cache rows by position (every key
    checked); a training row shows one cached view per epoch (`choose_view`), or with `views_per_sample` M > 1 a
    sample is one item of M rows, M of its views (`choose_views`), so its picture is decoded once for all of them;
    validation shows view 0. A batch decodes each picture as the build did and replays each view from its record
    (`kdcache.augment.render`: crop, flip, ops, erasing, and the mix with its partner, an earlier sample of the shard
    kept as tar members while the shard streams) at the student's size (and at the teacher's, with
    `teacher_preprocess`)."""

    split_arrays = {IMAGES: ("key", "valid")}

    def __init__(self, spec: DataSpec, cache: Cache, *, student_preprocess: dict | None = None,
                 teacher_preprocess: dict | None = None, return_texts: bool = False,
                 tokenizer: Callable | None = None, device_decode: bool = False):
        del tokenizer  # the image tower has no text to tokenise
        self.spec = spec
        self.device_decode = device_decode  # JPEGs travel undecoded for the main process (kdcache.train.replay)
        self.return_texts = return_texts
        self.views = cache.views
        policy, fill = cache.view_policy()
        self.policy = policy or Policy()  # the default records are today's crop box and flip
        self.fill = fill or erase_fill(cache.attrs["preprocess"])
        self.record_names = list(record_arrays(self.policy))
        if device_decode and self.policy.mixes:
            raise DataError("mixed views (mixup/cutmix) replay with PIL only: use --decode cpu")
        if not device_decode:
            note_decoder(cache)
        cached = [layer["name"] for layer in (cache.attrs["build"].get("hints") or {}).get("layers", [])]
        unknown = [h for h in spec.hints if h not in cached]
        if unknown:
            raise DataError(f"teacher hints {unknown} are not in the cache (it holds {cached or 'none'}; build with "
                            "--hints MODULE)")
        self.hint_arrays = [schema.hint_array(cached.index(h)) for h in spec.hints]
        self.build = {"max_pixels": int(cache.attrs["build"]["max_pixels"]),
                      "background": tuple(int(c) for c in cache.attrs["build"]["background"]),
                      "decode": cache.attrs["build"].get("decode", "cpu")}
        self._eval_tf: dict[str, Callable] = {}  # built on first use, in the process that uses it
        self.teacher_preprocess = None if teacher_preprocess is None else dict(teacher_preprocess)
        if self.teacher_preprocess is not None and "size" not in self.teacher_preprocess:
            raise DataError(f"teacher_preprocess needs a 'size', got {self.teacher_preprocess}")
        try:
            self.urls = cache.shard_urls(spec.images)
        except CacheError as e:  # a bad --images is a data error of the run, as the other shard problems are
            raise DataError(str(e)) from None
        if student_preprocess is None:
            log.warning("no student preprocessing given: using the teacher's from the cache (%s)",
                        cache.attrs["preprocess"])
            student_preprocess = cache.attrs["preprocess"]
        self.student_preprocess = dict(student_preprocess)
        if "size" not in self.student_preprocess:
            raise DataError(f"student_preprocess needs a 'size', got {self.student_preprocess}")

    @classmethod
    def check(cls, cache: Cache) -> None:
        cache.require(schema.CAP_IMAGES)

    @classmethod
    def units(cls, cache: Cache) -> list[Unit]:
        return usable_units(cache, IMAGES)

    @staticmethod
    def in_split(a: dict[str, np.ndarray], unit: Unit, split: str, val_fraction: float, *,
                 subset: Subset) -> np.ndarray:
        return keyed_split(np.flatnonzero(a["valid"] & selected_rows(a, unit, subset, a["key"])), a["key"], split,
                           val_fraction)

    def unit_rows(self, cache: Cache, unit: Unit, *, split: str, epoch: int) -> Iterator[RawRow | tuple[RawRow, ...]]:
        """The shard's tar streamed in order and joined to the cache rows by position, checking every key."""
        a = cache.read(unit, [*self.split_arrays[IMAGES], "label", "caption", "caption_emb", *self.record_names, "emb",
                              *self.hint_arrays])
        rows = len(a["key"])
        keep = np.zeros(rows, dtype=bool)
        keep[self.in_split(a, unit, split, self.spec.val_fraction, subset=self.spec.subset)] = True
        if self.spec.subset and not keep.any():  # a shard the subset leaves out is not read at all
            return
        limited = bool((cache.status(unit) or {}).get("limited"))
        url = self.urls[unit.index]
        report = ShardReport(url=url)
        seen = 0
        train = split == "train"
        m = self.spec.views_per_sample if train else 1
        window = self.policy.mix_window if self.policy.mixes else 0
        recent: dict[int, dict[str, bytes]] = {}  # position -> tar members of the last `window` samples (partners)
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
            if window:
                recent[p] = raw.members
                recent.pop(p - window - 1, None)
            if not keep[p]:
                continue
            if not train:
                views = [0]
            elif m == 1:
                views = [choose_view(seed=self.spec.seed, epoch=epoch, shard=unit.index, position=p, views=self.views)]
            else:
                views = choose_views(seed=self.spec.seed, epoch=epoch, shard=unit.index, position=p, views=self.views,
                                     m=m)
            group = tuple(self._row(a, unit, p, cached, v, raw.members, recent) for v in views)
            yield group[0] if m == 1 else group
        if seen < rows:
            detail = f" ({report.error})" if report.error else ""
            hint = "; if the shards moved, give their new locations (--images)" if seen == 0 else ""
            raise DataError(f"shard {unit.index} ({url}) yielded {seen} samples but the cache has {rows} rows for "
                            f"it{detail}: the shard was truncated or rewritten after the build{hint}")

    def _row(self, a: dict[str, np.ndarray], unit: Unit, p: int, key: str, v: int, members: dict[str, bytes],
             recent: dict[int, dict[str, bytes]]) -> RawRow:
        """Row `p`'s view `v`: cached targets, the view's record and, for a mixed view, its partner's members."""
        rec = unpack_record({k: a[k][p] for k in self.record_names}, v)
        partner = {}
        if rec.mix_kind:
            q = p + rec.mix_offset
            if q not in recent:
                raise DataError(f"shard {unit.index} position {p} (key {key!r}) view {v} is mixed with position {q}, "
                                f"which is not within the policy's window of {self.policy.mix_window}: the cache's "
                                "view records are damaged")
            partner = {"partner_members": recent[q], "partner_position": q,
                       "partner_rec": unpack_record({k: a[k][q] for k in self.record_names}, v)}
        return RawRow(shard=unit.index, position=p, key=key, teacher=_f32(a["emb"][p, v]),
                      other=_f32(a["caption_emb"][p]), has_other=bool(a["caption"][p] != ""),
                      label=int(a["label"][p]), view=v, box=rec.box, flip=rec.flip, members=members,
                      text=str(a["caption"][p]) if self.return_texts else "", rec=rec,
                      hints=tuple(_f32(a[h][p, v]) for h in self.hint_arrays), **partner)

    def decode_image(self, row: RawRow):
        """The row's picture decoded exactly as the build decoded it (same max_pixels and background)."""
        return self._decode(row.shard, row.position, row.key, row.members)

    def _decode(self, shard: int, position: int, key: str, members: dict[str, bytes]):
        raw = RawSample(key=key, position=position, members=members)
        try:
            return parse_sample(raw, max_pixels=self.build["max_pixels"], background=self.build["background"]).image
        except RejectError as e:
            why = ("the build decoded it with nvjpeg (--decode gpu), which takes some bytes PIL refuses, or the shard "
                   "was rewritten after it" if self.build["decode"] == "gpu" else "the shard was rewritten after it")
            raise DataError(f"shard {shard} position {position} (key {key!r}) was valid at build time but now fails "
                            f"to decode with PIL ({e}): {why}; --exclude '{key}' trains without it") from None

    def _partner(self, row: RawRow):
        """A mixed view's partner picture (None for an unmixed view)."""
        if row.partner_members is None:
            return None
        return self._decode(row.shard, row.partner_position, f"partner of {row.key}", row.partner_members)

    def replay(self, row: RawRow) -> torch.Tensor:
        """The cached view of the row at the student's size: view 0 is the student's own eval transform (as view 0
        is the teacher's), view v >= 1 its record replayed with the student's size and interpolation."""
        return self._render(self.decode_image(row), self._partner(row), row, "student")

    def _render(self, img, partner, row: RawRow, who: str) -> torch.Tensor:
        """The row's view of a decoded picture at `who`'s ("student" | "teacher") size and interpolation."""
        preprocess = self.student_preprocess if who == "student" else self.teacher_preprocess
        if row.view == 0:
            if who not in self._eval_tf:
                self._eval_tf[who] = eval_transform_uint8(preprocess)
            return self._eval_tf[who](img)
        interp = preprocess.get("interpolation") or PreprocessCfg.interpolation
        rec = row.rec if row.rec is not None else ViewRecord(box=row.box, flip=row.flip)
        return render(img, rec, size=size_hw(preprocess), interpolation=interp, fill=self.fill, partner=partner,
                      partner_rec=row.partner_rec)

    def _device_jpeg(self, row: RawRow) -> bytes | None:
        """The row's JPEG bytes if the build decoded them on its device (`--decode gpu`: the header probe said so),
        else None (PIL decoded the picture in the build's worker, and does here)."""
        raw = RawSample(key=row.key, position=row.position, members=row.members)
        try:
            data = parse_sample(raw, max_pixels=self.build["max_pixels"], decode=False).image_bytes
            return data if probe_image(data, max_pixels=self.build["max_pixels"]).fallback is None else None
        except RejectError:
            return None  # decode_image names the problem

    def batch(self, rows: list[RawRow | tuple[RawRow, ...]]) -> dict:
        # A views-per-sample group is decoded once for all its views (and, with teacher_preprocess, for both models).
        groups = [g if isinstance(g, tuple) else (g,) for g in rows]
        rows = [r for g in groups for r in g]
        students, teachers, jobs = [], [], ReplayJobs()
        for g in groups:
            jpeg = self._device_jpeg(g[0]) if self.device_decode else None
            if jpeg is not None:  # the main process decodes it on the device and renders its views there
                jobs.jpegs.append(jpeg), jobs.keys.append(g[0].key)
                for r in g:
                    rec = None if r.view == 0 else (r.rec if r.rec is not None else ViewRecord(box=r.box, flip=r.flip))
                    jobs.rows.append(ReplayRow(len(jobs.jpegs) - 1, rec))
                continue
            img = self.decode_image(g[0])
            for r in g:
                partner = self._partner(r)
                students.append(self._render(img, partner, r, "student"))
                if self.teacher_preprocess is not None:
                    teachers.append(self._render(img, partner, r, "teacher"))
                if self.device_decode:
                    jobs.rows.append(ReplayRow(student=students[-1], teacher=teachers[-1] if teachers else None))
        if self.device_decode:
            extra = {"replay": jobs}
        else:
            extra = {"pixels": torch.stack(students)}
            if self.teacher_preprocess is not None:
                extra["teacher_pixels"] = torch.stack(teachers)
        if self.return_texts:
            extra["texts"] = [r.text for r in rows]
        return {
            "teacher": torch.from_numpy(np.stack([r.teacher for r in rows])),
            "other": torch.from_numpy(np.stack([r.other for r in rows])),
            "has_other": torch.tensor([r.has_other for r in rows], dtype=torch.bool),
            "labels": torch.tensor([r.label for r in rows], dtype=torch.int64),
            "shard": torch.tensor([r.shard for r in rows], dtype=torch.int64),
            "position": torch.tensor([r.position for r in rows], dtype=torch.int64),
            "view": torch.tensor([r.view for r in rows], dtype=torch.int64),
            **{f"hint:{name}": torch.from_numpy(np.stack([r.hints[i] for r in rows]))
               for i, name in enumerate(self.spec.hints)},
            **extra,
        }
