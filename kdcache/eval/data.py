"""The data pass of `kdcache eval`: every model embeds every usable sample, in one read of the shards.

    col = collect(models, urls, task=task, batch_size=64, limit=None, progress=False)
    torch.cat(col.image_emb[label])   # [N, D] in the order of col.keys

Which samples are usable, and whether captions are embedded too, is the task's call (`kdcache.eval.tasks`). A
`kdcache.subset.Subset` (--include/--exclude/--labels, the rule `kdcache train` uses) drops samples first: by key and
shard file name before a picture is decoded, by label after; they are counted in `filtered`, not in `skipped`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from kdcache.eval.models import EvalModel
from kdcache.shards import DEFAULT_MAX_PIXELS, RejectError, Sample, ShardReport, iter_shard, parse_sample
from kdcache.subset import EVERYTHING, Subset, shard_name
from kdcache.views import eval_view_problem

if TYPE_CHECKING:
    from kdcache.eval.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Collected:
    """Everything gathered from one pass over the data; row i of every list and embedding is the same sample."""

    keys: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    image_emb: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    text_emb: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    rejected: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    shard_errors: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)   # sha256 of each shard read to its end
    filtered: int = 0                                        # samples the subset left out


def iter_samples(urls: Sequence[str], stats: Collected, subset: Subset = EVERYTHING) -> Iterator[tuple[str, Sample]]:
    """(url, decoded sample) over the shards in order; rejected samples and damaged shards are counted, not fatal.
    Samples `subset` leaves out by key or shard name are counted in `stats.filtered` and never decoded."""
    for url in urls:
        report = ShardReport(url)
        name = shard_name(url)
        for raw in iter_shard(url, report):
            if subset and not subset.keeps_name(key=raw.key, shard=name):
                stats.filtered += 1
                continue
            try:
                yield url, parse_sample(raw, max_pixels=DEFAULT_MAX_PIXELS)
            except RejectError as e:
                stats.rejected[e.reason] += 1
        if report.digest:  # the whole shard was read: its digest came for free
            stats.digests[url] = report.digest
        if report.truncated:
            stats.shard_errors.append(f"{url}: {report.error}")
            log.warning("shard %s: %s (samples before the damage were used)", url, report.error)


def _encode_batch(models: Sequence[EvalModel], batch: list[Sample], col: Collected, task: Task) -> None:
    # Models that share a preprocessing share the resized pixels: decode and resize once per distinct transform.
    pixels: dict[str, torch.Tensor] = {}
    for m in models:
        key = json.dumps(m.preprocess, sort_keys=True)
        if key not in pixels:
            pixels[key] = torch.stack([m.transform(s.image) for s in batch])
        col.image_emb[m.label].append(m.encode_images(pixels[key]))
        if task.embeds_text:
            col.text_emb[m.label].append(m.encode_texts([s.caption for s in batch]))


def _eval_view_problem(models: Sequence[EvalModel], s: Sample) -> str | None:
    """Why some model's eval transform cannot run on `s`'s image (as the build rejects it), or None."""
    for m in models:
        why = eval_view_problem(*s.image.size, m.preprocess, max_pixels=DEFAULT_MAX_PIXELS)
        if why is not None:
            return f"{why} ({m.label})"
    return None


def collect(models: Sequence[EvalModel], urls: Sequence[str], *, task: Task, batch_size: int, limit: int | None,
            progress: bool, subset: Subset = EVERYTHING) -> Collected:
    """One pass over the shards: every model embeds every sample `subset` keeps (with resolved class ids) that the
    task can use (and its caption, when the task embeds text). Unusable samples are counted in `skipped` under the
    task's reason, samples the subset leaves out in `filtered`."""
    col = Collected()
    for m in models:
        col.image_emb[m.label], col.text_emb[m.label] = [], []
    batch: list[Sample] = []
    bar = tqdm(total=limit, desc=f"eval {task.name}", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for url, s in iter_samples(urls, col, subset):
            if subset.labels and not subset.keeps(key=s.key, shard=shard_name(url), label=s.label):
                col.filtered += 1
                continue
            reason = task.skip_reason(s, url)
            if reason is not None:
                col.skipped[reason] += 1
                continue
            why = _eval_view_problem(models, s)
            if why is not None:  # a 3,000,000x1 PNG passes max_pixels, then asks a resize for billions of pixels
                col.rejected["extreme_aspect"] += 1
                log.warning("%s: sample %r rejected (extreme_aspect): %s", url, s.key, why)
                continue
            col.keys.append(s.key)
            col.urls.append(url)
            col.positions.append(s.position)
            col.labels.append(-1 if s.label is None else s.label)
            col.captions.append(s.caption or "")
            batch.append(s)
            if len(batch) == batch_size:
                _encode_batch(models, batch, col, task)
                bar.update(len(batch))
                batch = []
            if limit is not None and len(col.keys) >= limit:
                break
        if batch:
            _encode_batch(models, batch, col, task)
            bar.update(len(batch))
    finally:
        bar.close()
    return col


def data_fingerprint(col: Collected) -> str:
    """Which samples were evaluated (shard file name and key of each, in order), so `kdcache compare` can tell
    whether two reports saw the same data."""
    h = hashlib.sha256()
    for url, key in zip(col.urls, col.keys, strict=True):
        h.update(f"{os.path.basename(url)}\t{key}\n".encode())
    return "sha256:" + h.hexdigest()[:32]
