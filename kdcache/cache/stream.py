"""The build's second step, the stream: decode image shards and render each sample's views, possibly in DataLoader
workers.

For every shard the stream yields uint8 `Batch`es of views for the teacher, then one `ShardMeta` holding everything
else about the shard (keys, labels, captions, view records, rejects, the shard's read report). Nothing here depends
on the teacher, so it runs in worker processes and hands only uint8 pixels to the device. With `--decode gpu` the
workers only read bytes and headers: a JPEG the device decodes travels as `ViewJob`s (its bytes and the view's record)
and the main process renders it there (`kdcache.cache.gpuviews`); other members are decoded by PIL here, as usual.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kdcache.augment import (
    Policy,
    ViewRecord,
    erase_fill,
    eval_record,
    pack_records,
    record_arrays,
    render,
    sample_view,
)
from kdcache.cache.config import BuildConfig, BuildError, view_policy
from kdcache.cache.schema import Unit
from kdcache.shards import Reject, RejectError, ShardReport, decode_image, iter_shard, parse_sample
from kdcache.shards.gpudecode import probe_image
from kdcache.views import eval_box, eval_transform_uint8, eval_view_problem


@dataclass
class ShardMeta:
    """Everything about a shard except teacher outputs, produced next to decoding (maybe in a worker)."""

    unit: Unit
    rows: int
    keys: list[str]
    valid: np.ndarray
    labels: np.ndarray
    captions: list[str]
    src_size: np.ndarray
    records: dict[str, np.ndarray]  # view-record arrays [rows, views, ...] (view_box, view_flip, and the policy's)
    rejects: list[Reject]
    report: ShardReport
    limited: bool
    caption_truncated: np.ndarray | None = None  # bool [rows]: the row's caption was cut to MAX_CAPTION_CHARS
    decode: dict | None = None  # --decode gpu: {"device": samples, "pil": {fallback reason: samples}} (its status)


@dataclass
class ViewJob:
    """--decode gpu: one view of a JPEG left encoded for the device; `rec` None is view 0 (the eval transform)."""

    data: bytes
    rec: ViewRecord | None


@dataclass
class Batch:
    """Views of one shard for the teacher; row i is view `views[i]` of the sample at `positions[i]`."""

    unit: Unit
    positions: np.ndarray  # [B]
    views: np.ndarray      # [B]
    pixels: torch.Tensor | None  # uint8 [B, 3, H, W]; None when `jobs` holds views still to decode on the device
    jobs: list[torch.Tensor | ViewJob] | None = None  # --decode gpu: row i rendered (uint8 [3, H, W]) or to render


class ShardStream(torch.utils.data.IterableDataset):
    """Decode shards and render views into uint8 batches; batches never cross a shard, so their composition is a
    function of the shard alone (CPU results depend on it). With DataLoader workers, worker k takes shards k, k+W, …"""

    def __init__(self, units: list[Unit], *, preprocess: dict, cfg: BuildConfig, limit: int | None = None):
        super().__init__()
        self.units, self.preprocess, self.cfg, self.limit = units, preprocess, cfg, limit
        self.policy = view_policy(cfg) or Policy()  # the default Policy() draws exactly today's crop + flip
        self.fill = erase_fill(preprocess)

    def __iter__(self) -> Iterator[Batch | ShardMeta]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if self.limit is not None and nw > 1:
            raise BuildError("--limit reads shards in order in one process; it cannot use DataLoader workers")
        remaining = self.limit
        for i in range(wid, len(self.units), nw):
            for item in self.shard(self.units[i], remaining):
                if remaining is not None and isinstance(item, ShardMeta):
                    remaining -= item.rows
                yield item

    def shard(self, unit: Unit, quota: int | None) -> Iterator[Batch | ShardMeta]:
        """One shard's batches then its ShardMeta; with a quota, only its first `quota` samples."""
        cfg, V, policy = self.cfg, self.cfg.views, self.policy
        eval_tf = eval_transform_uint8(self.preprocess)
        out_size = tuple(self.preprocess["size"])
        interp = self.preprocess["interpolation"]
        report = ShardReport(url=unit.source)
        keys, valid, labels, captions, sizes, records, rejects = [], [], [], [], [], [], []
        recent: dict[int, tuple] = {}  # position -> (image, records) of the last mix_window valid samples (partners)
        pending_pos, pending_view, pending_px = [], [], []
        limited = quota == 0  # --limit already reached: the shard is recorded as done with no rows
        truncated = []

        gpu = cfg.decode == "gpu"
        decoded = Counter()  # --decode gpu: "device", or the fallback reason, per valid sample

        def flush():
            rendered = all(isinstance(x, torch.Tensor) for x in pending_px)
            b = Batch(unit, np.asarray(pending_pos, np.int64), np.asarray(pending_view, np.int64),
                      torch.stack(pending_px) if rendered else None, None if rendered else list(pending_px))
            pending_pos.clear(), pending_view.clear(), pending_px.clear()
            return b

        for raw in iter_shard(unit.source, report) if quota != 0 else ():
            if quota is not None and raw.position >= quota:
                limited = True
                break
            keys.append(raw.key)
            try:
                sample = parse_sample(raw, max_pixels=cfg.max_pixels, background=cfg.background, decode=not gpu)
                via = "pil"
                if gpu:  # the header decides: the device decodes the JPEG later, or PIL decodes it now
                    probe = probe_image(sample.image_bytes, max_pixels=cfg.max_pixels)
                    via = probe.fallback or "device"
                    if probe.fallback is not None:
                        sample.image = decode_image(sample.image_bytes, max_pixels=cfg.max_pixels,
                                                    background=cfg.background)
                size = sample.image.size if sample.image is not None else (probe.width, probe.height)
                why = eval_view_problem(*size, self.preprocess, max_pixels=cfg.max_pixels)
                if why is not None:
                    raise RejectError("extreme_aspect", why)
            except RejectError as e:
                rejects.append(Reject(raw.position, raw.key, e.reason, e.detail))
                valid.append(False), labels.append(-1), captions.append(""), sizes.append((0, 0)), records.append(None)
                truncated.append(False)
                continue
            img, p = sample.image, raw.position
            w, h = size
            decoded[via] += gpu
            valid.append(True)
            labels.append(-1 if sample.label is None else int(sample.label))
            captions.append(sample.caption or "")
            truncated.append(sample.caption_truncated)
            sizes.append((w, h))
            recs = [eval_record(eval_box(w, h, self.preprocess), policy)]
            pending_pos.append(p), pending_view.append(0)
            pending_px.append(eval_tf(img) if img is not None else ViewJob(sample.image_bytes, None))
            if len(pending_px) == cfg.batch_size:
                yield flush()
            for v in range(1, V):
                rec = sample_view(policy, width=w, height=h, seed=cfg.seed, shard=unit.index, position=p, view=v,
                                  partner_ok=recent.__contains__)
                partner, partner_recs = recent.get(p + rec.mix_offset, (None, None)) if rec.mix_kind else (None, None)
                recs.append(rec)
                pending_pos.append(p), pending_view.append(v)
                if img is None:
                    pending_px.append(ViewJob(sample.image_bytes, rec))
                else:
                    pending_px.append(render(img, rec, size=out_size, interpolation=interp, fill=self.fill,
                                             partner=partner,
                                             partner_rec=None if partner_recs is None else partner_recs[v]))
                if len(pending_px) == cfg.batch_size:
                    yield flush()
            records.append(recs)
            if policy.mixes:  # later samples take partners at most mix_window positions back
                recent[p] = (img, recs)
                for q in [q for q in recent if q <= p - policy.mix_window]:
                    del recent[q]
        if pending_px:
            yield flush()
        n = len(keys)
        yield ShardMeta(
            unit=unit, rows=n, keys=keys, valid=np.asarray(valid, bool).reshape(n),
            labels=np.asarray(labels, np.int32).reshape(n), captions=captions,
            src_size=np.asarray(sizes, np.int32).reshape(n, 2), records=_record_arrays(records, policy, V),
            rejects=rejects, report=report, limited=limited, caption_truncated=np.asarray(truncated, bool).reshape(n),
            decode={"device": decoded.pop("device", 0), "pil": dict(sorted(decoded.items()))} if gpu else None,
        )


def _record_arrays(records: list[list[ViewRecord] | None], policy: Policy, views: int) -> dict[str, np.ndarray]:
    """The shard's view records as the cache's fixed-width arrays [rows, views, ...]; rejected rows stay zero."""
    out = {k: np.zeros((len(records), views, *shape), dtype) for k, (dtype, shape) in record_arrays(policy).items()}
    rows = [i for i, r in enumerate(records) if r is not None]
    if rows:
        packed = pack_records([rec for i in rows for rec in records[i]], policy)
        for k, a in packed.items():
            out[k][rows] = a.reshape(len(rows), views, *a.shape[1:])
    return out


def one_thread(items: Iterable) -> Iterator:
    """`items`, each one produced with torch on one thread (the caller's thread count restored before it gets it):
    the stream in the main process (no DataLoader worker) decodes and renders as a worker would, on one thread,
    instead of waking the teacher's OpenMP threads for every small tensor copy between two forwards."""
    it = iter(items)
    while True:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            torch.set_num_threads(threads)
        yield item


def shard_loader(units: list[Unit], *, preprocess: dict, cfg: BuildConfig, limit: int | None,
                 pin_memory: bool) -> torch.utils.data.DataLoader:
    """The stream behind a DataLoader: `cfg.workers` decode processes (one per shard at most), or the main process
    under --limit, which must read shards in order."""
    stream = ShardStream(units, preprocess=preprocess, cfg=cfg, limit=limit)
    workers = cfg.workers if limit is None else 0
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=min(workers, len(units)),
                                       pin_memory=pin_memory, persistent_workers=False)
