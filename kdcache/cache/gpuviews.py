"""The `--decode gpu` build's main-process step between the stream and the teacher: decode a batch's JPEGs on the
device in one call and render their views there (`kdcache.tensorviews`), so that DataLoader workers only read bytes.

A JPEG the device decoder refuses is decoded by PIL here and its views rendered as `--decode cpu` would (counted as
"nvjpeg_error" in the shard's status); one PIL refuses too becomes a reject with PIL's reason, recorded in the shard's
`ShardMeta` before it is assembled (`finish`), exactly as if the worker had rejected it.
"""

from __future__ import annotations

import torch

from kdcache.augment import erase_fill
from kdcache.cache.config import BuildConfig
from kdcache.cache.stream import Batch, ShardMeta, ViewJob
from kdcache.shards import Reject, RejectError
from kdcache.shards.gpudecode import decode_pictures
from kdcache.tensorviews import TensorViews
from kdcache.views import size_hw


class DeviceViews:
    """Turn `Batch.jobs` into uint8 [B, 3, H, W] pixels on `device`, keeping per shard what fell back or failed."""

    def __init__(self, preprocess: dict, *, cfg: BuildConfig, device: str | torch.device):
        self.device = torch.device(device)
        self.preprocess, self.cfg = preprocess, cfg
        self.fill = erase_fill(preprocess)
        self.views = TensorViews(preprocess, fill=self.fill)
        self.size = size_hw(preprocess)
        self.refused: dict[str, dict[int, RejectError | None]] = {}  # unit -> position -> PIL's reject (None: ok)

    def prepare(self, item: Batch | ShardMeta) -> torch.Tensor | None:
        """`pixels` of a batch (None for a ShardMeta): the build runs this on its decode thread, one item ahead
        (`kdcache.shards.gpudecode.ahead`), so a shard's batches are all prepared before its ShardMeta reaches
        `finish` on the main thread."""
        return self.pixels(item) if isinstance(item, Batch) else None

    def pixels(self, batch: Batch) -> torch.Tensor:
        """The batch's views on the device: rows the stream rendered are moved there, the others decoded and
        rendered there (each JPEG once per batch)."""
        if batch.jobs is None:
            return batch.pixels.to(self.device)
        positions = [int(p) for p in batch.positions]
        todo = {p: j.data for p, j in zip(positions, batch.jobs, strict=True) if isinstance(j, ViewJob)}
        pics = dict(zip(todo, decode_pictures(list(todo.values()), device=self.device, max_pixels=self.cfg.max_pixels,
                                              background=self.cfg.background), strict=True))
        refused = self.refused.setdefault(batch.unit.name, {})
        for p, pic in pics.items():
            if not isinstance(pic, torch.Tensor):  # the device refused it: PIL decided, as --decode cpu would
                refused.setdefault(p, pic if isinstance(pic, RejectError) else None)
                if isinstance(pic, RejectError):
                    pics[p] = None
        rendered = iter(self.views.render_all([(pics[p], j.rec) for p, j in zip(positions, batch.jobs, strict=True)
                                               if isinstance(j, ViewJob) and pics[p] is not None]))
        out = []
        for p, job in zip(positions, batch.jobs, strict=True):
            if isinstance(job, torch.Tensor):  # rendered by PIL in the worker
                out.append(job.to(self.device))
            elif pics[p] is None:  # rejected: its rows are dropped when the shard is assembled
                out.append(torch.zeros(3, *self.size, dtype=torch.uint8, device=self.device))
            else:
                out.append(next(rendered).to(self.device))
        return torch.stack(out)

    def finish(self, meta: ShardMeta) -> None:
        """Record in the shard's meta (in place) what the device refused: PIL fallbacks counted, PIL rejects made
        rejects of their rows (valid False, records cleared), as the stream records its own."""
        refused = self.refused.pop(meta.unit.name, {})
        if not refused or meta.decode is None:
            return
        pil = meta.decode["pil"]
        for p, err in sorted(refused.items()):
            meta.decode["device"] -= 1
            if err is None:
                pil["nvjpeg_error"] = pil.get("nvjpeg_error", 0) + 1
                continue
            meta.rejects.append(Reject(p, meta.keys[p], err.reason, err.detail))
            meta.valid[p], meta.labels[p], meta.src_size[p], meta.captions[p] = False, -1, 0, ""
            if meta.caption_truncated is not None:
                meta.caption_truncated[p] = False
            for a in meta.records.values():
                a[p] = 0
        meta.rejects.sort(key=lambda r: r.position)
        meta.decode["pil"] = dict(sorted(pil.items()))
