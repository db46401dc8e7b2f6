"""`kdcache build`: run a frozen teacher once over image shards and caption corpora and write one zarr cache.

    kdcache build --images 'shards/{00000..00009}.tar' --captions coco:captions_val2017.json \
        --teacher local-dir:teachers/kdc-cifar10-rn18 --classes cifar10 --views 2 --out cache.zarr

Work is split into units (an image shard, or a block of caption records). Each unit owns its zarr arrays, is
written whole, then gets a status object; `--resume` skips units whose status says done. Under torchrun, ranks take
disjoint units and rank 0 consolidates after a barrier.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from kdcache import __version__
from kdcache import tokens as cache_tokens
from kdcache.cache import schema
from kdcache.cache.captions import CaptionRow, count_caption_records, iter_caption_records, parse_caption_spec
from kdcache.cache.reader import plan_units
from kdcache.cache.schema import CAPTIONS, IMAGES, Unit
from kdcache.shards import DEFAULT_MAX_PIXELS, Reject, RejectError, ShardReport, expand_urls, iter_shard, parse_sample
from kdcache.teacher import teacher_mismatch
from kdcache.views import VIEW_RATIO, VIEW_SCALE, eval_box, eval_transform_uint8, random_view, render_view

log = logging.getLogger(__name__)



class BuildError(RuntimeError):
    """A build that cannot start or continue; the message says what to change."""


@dataclass(frozen=True)
class BuildConfig:
    out: str
    teacher: str
    images: tuple[str, ...] = ()
    captions: tuple[str, ...] = ()
    pretrained: str | None = None
    allow_random_init: bool = False
    views: int = 1
    classes: str | None = None
    templates: str | None = None
    topk: int = 10
    batch_size: int = 64
    workers: int = 0
    threads: int | None = None        # None: torch's default for this machine, recorded as resolved
    device: str = "cpu"
    precision: str = "fp32"
    embed_dtype: str = "fp16"
    seed: int = 0
    limit: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    background: tuple[int, int, int] = (255, 255, 255)
    resume: bool = False
    overwrite: bool = False
    allow_incomplete: bool = False    # exit 0 even if some shards failed (they stay marked failed in the cache)
    progress: bool = True


@dataclass
class BuildResult:
    out: str
    status: str
    summary: dict
    failed_units: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == schema.CACHE_COMPLETE


# ---------------------------------------------------------------------------------------------------------- helpers

def library_versions() -> dict:
    import numcodecs
    import open_clip
    import webdataset

    return {"kdcache": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "zarr": zarr.__version__, "numcodecs": numcodecs.__version__, "webdataset": webdataset.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    initialised_here: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _init_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("gloo")
        return _Dist(tdist.get_rank(), tdist.get_world_size(), True)
    return _Dist(tdist.get_rank(), tdist.get_world_size(), False)


def resolved_build(cfg: BuildConfig, threads: int, precision: str, topk: int) -> dict:
    """The part of the config that determines the cache's bytes (the --resume identity, minus inputs)."""
    return {
        "views": cfg.views, "classes": cfg.classes, "templates": cfg.templates, "topk": topk,
        "batch_size": cfg.batch_size, "threads": threads, "device_type": torch.device(cfg.device).type,
        "precision": precision, "embed_dtype": cfg.embed_dtype, "seed": cfg.seed, "limit": cfg.limit,
        "max_pixels": cfg.max_pixels, "background": list(cfg.background), "view_scale": list(VIEW_SCALE),
        "view_ratio": list(VIEW_RATIO), "block_records": schema.BLOCK_RECORDS,
    }


def check_resume_identity(old: dict, new: dict) -> None:
    """Refuse a --resume whose teacher, build settings or earlier inputs differ, naming the field (and the schema
    versions, when another kdcache wrote the cache)."""
    hint = ""
    if str(old.get("schema_version")) != str(new.get("schema_version")):
        hint = (f" (the cache was written by another kdcache, schema {old.get('schema_version')}; this one writes "
                f"{new.get('schema_version')})")
    why = teacher_mismatch(old.get("teacher"), new.get("teacher"))
    if why:
        was, now = (old.get("teacher") or {}).get("spec"), (new.get("teacher") or {}).get("spec")
        raise BuildError(f"--resume refused: teacher changed ({why}; the cache has {was!r}, now {now!r}). "
                         f"Use --overwrite or a new --out.{hint}")
    for section in ("preprocess", "build"):
        a, b = old.get(section), new.get(section)
        if section == "preprocess":  # where the settings were read from is provenance, not identity
            a, b = ({k: v for k, v in (d or {}).items() if k != "source"} for d in (a, b))
        if a != b:
            keys = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
            detail = ", ".join(f"{k}: cache has {(a or {}).get(k)!r}, now {(b or {}).get(k)!r}" for k in keys)
            raise BuildError(f"--resume refused: {section} changed ({detail}). Use --overwrite or a new --out.{hint}")
    for kind in ("images", "captions"):
        a, b = old["inputs"][kind], new["inputs"][kind]
        if b[: len(a)] != a:
            raise BuildError(
                f"--resume refused: --{kind} changed. The cache was built from {len(a)} {kind} input(s); new inputs "
                "may only be appended at the end of the list (first difference at position "
                f"{next(i for i in range(len(a)) if i >= len(b) or a[i] != b[i])}).{hint}")


# ----------------------------------------------------------------------------------------------- image production

@dataclass
class _ShardMeta:
    """Everything about a shard except teacher outputs, produced next to decoding (maybe in a worker)."""

    unit: Unit
    rows: int
    keys: list[str]
    valid: np.ndarray
    labels: np.ndarray
    captions: list[str]
    src_size: np.ndarray
    view_box: np.ndarray
    view_flip: np.ndarray
    rejects: list[Reject]
    report: ShardReport
    limited: bool


@dataclass
class _Batch:
    unit: Unit
    positions: np.ndarray  # [B]
    views: np.ndarray      # [B]
    pixels: torch.Tensor   # uint8 [B, 3, H, W]


class ShardStream(torch.utils.data.IterableDataset):
    """Decode shards and render views into uint8 batches; batches never cross a shard, so their composition is a
    function of the shard alone (CPU results depend on it). With DataLoader workers, worker k takes shards k, k+W, …"""

    def __init__(self, units: list[Unit], *, preprocess: dict, cfg: BuildConfig, limit: int | None = None):
        super().__init__()
        self.units, self.preprocess, self.cfg, self.limit = units, preprocess, cfg, limit

    def __iter__(self) -> Iterator[_Batch | _ShardMeta]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if self.limit is not None and nw > 1:
            raise BuildError("--limit reads shards in order in one process; it cannot use DataLoader workers")
        remaining = self.limit
        for i in range(wid, len(self.units), nw):
            for item in self.shard(self.units[i], remaining):
                if remaining is not None and isinstance(item, _ShardMeta):
                    remaining -= item.rows
                yield item

    def shard(self, unit: Unit, quota: int | None) -> Iterator[_Batch | _ShardMeta]:
        cfg, V = self.cfg, self.cfg.views
        eval_tf = eval_transform_uint8(self.preprocess)
        size = tuple(self.preprocess["size"])
        interp = self.preprocess["interpolation"]
        report = ShardReport(url=unit.source)
        keys, valid, labels, captions, sizes, boxes, flips, rejects = [], [], [], [], [], [], [], []
        pending_pos, pending_view, pending_px = [], [], []
        limited = quota == 0  # --limit already reached: the shard is recorded as done with no rows

        def flush():
            b = _Batch(unit, np.asarray(pending_pos, np.int64), np.asarray(pending_view, np.int64),
                       torch.stack(pending_px))
            pending_pos.clear(), pending_view.clear(), pending_px.clear()
            return b

        for raw in iter_shard(unit.source, report) if quota != 0 else ():
            if quota is not None and raw.position >= quota:
                limited = True
                break
            keys.append(raw.key)
            try:
                sample = parse_sample(raw, max_pixels=cfg.max_pixels, background=cfg.background)
            except RejectError as e:
                rejects.append(Reject(raw.position, raw.key, e.reason, e.detail))
                valid.append(False), labels.append(-1), captions.append("")
                sizes.append((0, 0)), boxes.append([(0, 0, 0, 0)] * V), flips.append([False] * V)
                continue
            img = sample.image
            w, h = img.size
            valid.append(True)
            labels.append(-1 if sample.label is None else int(sample.label))
            captions.append(sample.caption or "")
            sizes.append((w, h))
            vb, vf = [eval_box(w, h, self.preprocess)], [False]
            pending_pos.append(raw.position), pending_view.append(0), pending_px.append(eval_tf(img))
            if len(pending_px) == cfg.batch_size:
                yield flush()
            for v in range(1, V):
                box, flip = random_view(width=w, height=h, seed=cfg.seed, shard=unit.index, position=raw.position,
                                        view=v)
                vb.append(box), vf.append(flip)
                pending_pos.append(raw.position), pending_view.append(v)
                pending_px.append(render_view(img, box, flip, size=size, interpolation=interp))
                if len(pending_px) == cfg.batch_size:
                    yield flush()
            boxes.append(vb), flips.append(vf)
        if pending_px:
            yield flush()
        n = len(keys)
        yield _ShardMeta(
            unit=unit, rows=n, keys=keys, valid=np.asarray(valid, bool).reshape(n),
            labels=np.asarray(labels, np.int32).reshape(n), captions=captions,
            src_size=np.asarray(sizes, np.int32).reshape(n, 2), view_box=np.asarray(boxes, np.int32).reshape(n, V, 4),
            view_flip=np.asarray(flips, bool).reshape(n, V), rejects=rejects, report=report, limited=limited,
        )


# ------------------------------------------------------------------------------------------------------- the build

class _Builder:
    def __init__(self, cfg: BuildConfig, dist: _Dist):
        self.cfg, self.dist = cfg, dist
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer")
        self.pending: list[Future] = []
        self.counts = Counter()

    # -- teacher outputs
    def teacher_outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embeddings and, with a vocabulary, top-k logits and log-sum-exp: all computed on the teacher's device (a
        [B, C] logits matrix never crosses to the host), then copied back once."""
        emb = self.teacher.encode_images(pixels, on_device=True)
        if self.head is None:
            return emb.cpu(), None, None, None
        with torch.inference_mode():
            logits = self.teacher.logit_scale * emb @ self.head.T
            val, idx = logits.topk(self.topk, dim=1)
            lse = torch.logsumexp(logits, dim=1)
        return emb.cpu(), idx.to(torch.int32).cpu(), val.cpu(), lse.cpu()

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Teacher text embeddings (float32 [N, D]) and, when the cache stores them, the tokens they came from."""
        bs = self.cfg.batch_size
        tokens = [self.teacher.tokenizer(texts[i:i + bs]) for i in range(0, len(texts), bs)]
        emb = [self.teacher.encode_tokens(t) for t in tokens]
        emb = torch.cat(emb).numpy() if emb else np.empty((0, self.teacher.embed_dim), np.float32)
        if self.tokens is None:
            return emb, None
        return emb, cache_tokens.store(torch.cat(tokens), self.tokens) if tokens else None

    # -- writing, overlapped with the next batch on one background thread
    def submit(self, fn, *args) -> None:
        while len(self.pending) >= 2:  # bound memory: at most two finished units waiting for their writes
            self.pending.pop(0).result()
        self.pending.append(self.writer.submit(fn, *args))

    def drain(self) -> None:
        for f in self.pending:
            f.result()
        self.pending = []

    def write_done_unit(self, unit: Unit, specs: dict, data: dict, status: dict) -> None:
        schema.write_unit(self.root, unit, specs, data)
        schema.write_status(self.root, unit, status)

    # -- image shards
    def finish_shard(self, meta: _ShardMeta, outputs: dict) -> None:
        unit = meta.unit
        data = schema.empty_unit_data(self.image_specs, meta.rows)
        data["key"][:] = meta.keys
        data["valid"][:] = meta.valid
        data["label"][:] = meta.labels
        data["caption"][:] = meta.captions
        data["src_size"][:] = meta.src_size
        data["view_box"][:] = meta.view_box
        data["view_flip"][:] = meta.view_flip
        for pos, view, emb, idx, val, lse in outputs.get("parts", []):
            data["emb"][pos, view] = schema.encode_embeddings(emb.numpy(), self.cfg.embed_dtype)
            if idx is not None:
                data["topk_idx"][pos, view] = idx.numpy()
                data["topk_val"][pos, view] = val.numpy()
                data["lse"][pos, view] = lse.numpy()
        cap_rows = [i for i, c in enumerate(meta.captions) if c and meta.valid[i]]
        if cap_rows:
            cap_emb, cap_tokens = self.encode_texts([meta.captions[i] for i in cap_rows])
            data["caption_emb"][cap_rows] = schema.encode_embeddings(cap_emb, self.cfg.embed_dtype)
            if cap_tokens is not None:
                data["caption_tokens"][cap_rows] = cap_tokens
        rejected = Counter(r.reason for r in meta.rejects)
        failed = meta.report.truncated or meta.report.error is not None
        status = {
            "unit": unit.name, "kind": IMAGES, "source": unit.source, "state": schema.STATUS_FAILED if failed
            else schema.STATUS_DONE, "rows": meta.rows, "valid": int(meta.valid.sum()), "rejected": dict(rejected),
            "rejects": [asdict(r) for r in meta.rejects], "digest": meta.report.digest,
            "truncated": meta.report.truncated, "error": meta.report.error, "labels": int((meta.labels >= 0).sum()),
            "captions": len(cap_rows), "limited": meta.limited,
            "timing": {"finished": time.time()},
        }
        self.counts.update(images=int(meta.valid.sum()), image_rejected=sum(rejected.values()))
        if failed:
            log.error("shard %s failed: %s (kept %d complete samples)", unit.source, meta.report.error,
                      int(meta.valid.sum()))
        self.submit(self.write_done_unit, unit, self.image_specs, data, status)

    def run_images(self, units: list[Unit], limit: int | None, bar: tqdm) -> None:
        cfg = self.cfg
        stream = ShardStream(units, preprocess=self.teacher.preprocess, cfg=cfg, limit=limit)
        workers = cfg.workers if limit is None else 0
        if limit is not None and cfg.workers:
            log.info("--limit: reading shards in order in the main process (--workers ignored)")
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=min(workers, len(units)),
            pin_memory=torch.cuda.is_available() and self.teacher.device.type == "cuda",
            persistent_workers=False,
        )
        outputs: dict[str, dict] = {}
        rows_seen, shards_seen = 0, 0
        for item in loader:
            if isinstance(item, _Batch):
                emb, idx, val, lse = self.teacher_outputs(item.pixels)
                outputs.setdefault(item.unit.name, {"parts": []})["parts"].append(
                    (item.positions, item.views, emb, idx, val, lse))
                bar.update(int((item.views == 0).sum()))
            else:
                self.finish_shard(item, outputs.pop(item.unit.name, {}))
                # Shard sizes are unknown until read: estimate the total from the shards seen so far, for the ETA.
                rows_seen, shards_seen = rows_seen + item.rows, shards_seen + 1
                bar.total = max(bar.n, round(rows_seen / shards_seen * len(units)))
                bar.refresh()

    # -- caption blocks
    def run_caption_block(self, unit: Unit, corpus: dict, quota: int | None, bar: tqdm) -> None:
        n = unit.stop - unit.start
        stop = unit.stop if quota is None else unit.start + max(0, min(n, quota))
        data = schema.empty_unit_data(self.caption_specs, n)
        data["index"][:] = np.arange(unit.start, unit.stop)
        rejects: list[Reject] = []
        rows, texts = [], []
        for item in iter_caption_records(corpus["kind"], corpus["path"], start=unit.start, stop=stop):
            if isinstance(item, CaptionRow):
                r = item.index - unit.start
                data["text"][r], data["ref"][r], data["valid"][r] = item.text, item.ref, True
                rows.append(r), texts.append(item.text)
            else:
                rejects.append(item)
        if texts:
            emb, tokens = self.encode_texts(texts)
            data["emb"][rows] = schema.encode_embeddings(emb, self.cfg.embed_dtype)
            if tokens is not None:
                data["tokens"][rows] = tokens
        rejected = Counter(r.reason for r in rejects)
        status = {"unit": unit.name, "kind": CAPTIONS, "source": unit.source, "state": schema.STATUS_DONE,
                  "rows": n, "valid": len(rows), "rejected": dict(rejected), "rejects": [asdict(r) for r in rejects],
                  "start": unit.start, "stop": unit.stop, "limited": stop < unit.stop,
                  "timing": {"finished": time.time()}}
        self.counts.update(captions=len(rows), caption_rejected=sum(rejected.values()))
        bar.update(n)
        self.submit(self.write_done_unit, unit, self.caption_specs, data, status)

    # -- the whole run
    def run(self) -> BuildResult:
        cfg, dist = self.cfg, self.dist
        t0 = time.time()
        if cfg.views < 1:
            raise BuildError("--views must be at least 1 (view 0 is the teacher's eval transform)")
        if cfg.batch_size < 1:
            raise BuildError("--batch-size must be at least 1")
        if not cfg.images and not cfg.captions:
            raise BuildError("nothing to build: give --images and/or --captions")
        if cfg.embed_dtype not in schema.EMBED_DTYPES:
            raise BuildError(f"--embed-dtype must be one of {sorted(schema.EMBED_DTYPES)}")
        if cfg.limit is not None and dist.world > 1:
            raise BuildError("--limit is for single-process dry runs; it cannot be combined with torchrun")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        threads = torch.get_num_threads()

        from kdcache.teacher import load_teacher  # the teacher is only ever imported by the build
        from kdcache.vocab import load_classes, load_templates

        urls = expand_urls(list(cfg.images)) if cfg.images else []
        corpora = []
        for spec in cfg.captions:
            kind, path = parse_caption_spec(spec)
            corpora.append({"spec": f"{kind}:{path}", "kind": kind, "path": path,
                            "records": count_caption_records(kind, path)})
        self.teacher = load_teacher(cfg.teacher, pretrained=cfg.pretrained, allow_random_init=cfg.allow_random_init,
                                    device=cfg.device, precision=cfg.precision)
        self.head, self.topk = None, 0
        vocab = None
        if cfg.classes:
            classes, classes_src = load_classes(cfg.classes)
            templates, templates_src = load_templates(cfg.templates, classes_spec=cfg.classes)
            self.head = self.teacher.zero_shot_head(classes, templates)
            self.topk = min(cfg.topk, len(classes))
            vocab = (classes, templates, classes_src, templates_src)
        elif cfg.templates:
            raise BuildError("--templates needs --classes")
        if self.head is not None:  # float32 [C, D], kept on the teacher's device where the logits are computed
            self.head = self.head.to(self.teacher.device, torch.float32)
        dim = self.teacher.embed_dim
        self.tokens = cache_tokens.describe(self.teacher.tokenizer)  # None: this tokenizer's tokens are not stored
        self.image_specs = schema.image_arrays(views=cfg.views, dim=dim, topk=self.topk, embed_dtype=cfg.embed_dtype,
                                               tokens=self.tokens)
        self.caption_specs = schema.caption_arrays(dim=dim, embed_dtype=cfg.embed_dtype, tokens=self.tokens)

        attrs = {
            "schema_version": schema.SCHEMA_VERSION,
            "capabilities": [],
            "status": schema.CACHE_BUILDING,
            "teacher": self.teacher.identity,
            "preprocess": self.teacher.preprocess,
            "embed_dim": dim,
            "logit_scale": float(self.teacher.logit_scale),
            "build": {**resolved_build(cfg, threads, self.teacher.precision, self.topk), "tokens": self.tokens},
            "inputs": {"images": urls, "captions": [c["spec"] for c in corpora],
                       "caption_records": [c["records"] for c in corpora]},
            "versions": library_versions(),
            "summary": {},
            "run": {"host": platform.node(), "started": t0, "world_size": dist.world, "workers": cfg.workers},
        }
        self.root = self._open_store(attrs, vocab)
        units = plan_units(attrs)
        mine = units[dist.rank::dist.world]
        todo = []
        for u in mine:
            st = schema.read_status(self.root, u)
            if st is None or st.get("state") != schema.STATUS_DONE:
                todo.append(u)
        skipped = len(mine) - len(todo)
        if skipped:
            log.info("resume: %d of %d units already done, skipping them", skipped, len(mine))

        img_units = [u for u in todo if u.kind == IMAGES]
        cap_units = [u for u in todo if u.kind == CAPTIONS]
        img_limit, cap_quota = self._limits(mine, img_units, cap_units)
        interrupted = False
        try:
            with tqdm(desc=f"images (rank {dist.rank})" if dist.world > 1 else "images", unit="img",
                      disable=not cfg.progress or not img_units, dynamic_ncols=True) as bar:
                if img_units:
                    self.run_images(img_units, img_limit, bar)
            total_caps = sum(u.stop - u.start for u in cap_units)
            with tqdm(total=total_caps, desc="captions", unit="cap", disable=not cfg.progress or not cap_units,
                      dynamic_ncols=True) as bar:
                for u, q in zip(cap_units, cap_quota, strict=True):
                    self.run_caption_block(u, corpora[u.index], q, bar)
            self.drain()
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: finishing the writes already started; rerun with --resume to continue")
            self.drain()
        finally:
            self.writer.shutdown(wait=True)
        if interrupted:
            raise KeyboardInterrupt
        dist.barrier()
        result = None
        if dist.rank == 0:
            result = consolidate(self.root, units, started=t0, counts_here=dict(self.counts))
        dist.barrier()
        if result is None:  # other ranks report what rank 0 consolidated
            attrs = dict(zarr.open_group(cfg.out, mode="r").attrs)[schema.ROOT_ATTR]
            s = attrs["summary"]
            result = BuildResult(cfg.out, attrs["status"], s, s["failed_units"] + s["missing_units"])
        return result

    def _limits(self, mine: list[Unit], img_units: list[Unit], cap_units: list[Unit]):
        """--limit N: the first N image samples and the first N caption records, in input order. Units already done
        (on --resume) count against N."""
        if self.cfg.limit is None:
            return None, [None] * len(cap_units)
        done_img = sum(st["rows"] for u in mine if u.kind == IMAGES and u not in img_units
                       for st in [schema.read_status(self.root, u)] if st)
        left, cap_quota = self.cfg.limit - sum(u.stop - u.start for u in mine if u.kind == CAPTIONS
                                               and u not in cap_units), []
        for u in cap_units:
            cap_quota.append(max(0, left))
            left -= u.stop - u.start
        return max(0, self.cfg.limit - done_img), cap_quota

    def _open_store(self, attrs: dict, vocab) -> zarr.Group:
        cfg, dist = self.cfg, self.dist
        path = cfg.out
        exists = _cache_exists(path)
        if dist.rank == 0:
            if exists and not (cfg.resume or cfg.overwrite):
                raise BuildError(f"{path} already exists: pass --resume to continue or extend it, or --overwrite "
                                 "to start again")
            if exists and cfg.overwrite:
                _remove_cache(path)
                exists = False
            if exists:
                root = zarr.open_group(path, mode="r+")
                old = dict(root.attrs).get(schema.ROOT_ATTR)
                if not old:
                    raise BuildError(f"{path} is not a kdcache cache (no '{schema.ROOT_ATTR}' attributes)")
                major = int(str(old.get("schema_version", "0")).split(".")[0])
                if major != schema.SCHEMA_MAJOR:
                    raise BuildError(f"{path} has schema {old.get('schema_version')}; this kdcache writes "
                                     f"{schema.SCHEMA_VERSION}")
                check_resume_identity(old, attrs)
                for k in schema.remove_interrupted_writes(root):
                    log.info("resume: removed %s, left by an interrupted write", k)
                attrs["run"]["resumed_from"] = old.get("run", {}).get("started")
            else:
                root = zarr.open_group(path, mode="w")
                if vocab is not None:
                    classes, templates, classes_src, templates_src = vocab
                    schema.write_vocab(root, classes=classes, templates=templates, head=self.head.cpu().numpy(),
                                       attributes={"classes_source": classes_src, "templates_source": templates_src})
            attrs["capabilities"] = _capabilities(bool(attrs["inputs"]["images"]), bool(attrs["inputs"]["captions"]),
                                                  self.head is not None) + schema.embed_capabilities(cfg.embed_dtype)
            if self.tokens is not None:
                attrs["capabilities"].append(schema.CAP_TOKENS)
            attrs["required_capabilities"] = [c for c in attrs["capabilities"] if c in schema.MUST_UNDERSTAND]
            root.attrs[schema.ROOT_ATTR] = attrs
        dist.barrier()
        if dist.rank != 0:
            if not _cache_exists(path):
                raise BuildError(f"rank {dist.rank}: {path} was not created by rank 0")
            root = zarr.open_group(path, mode="r+")
        return root


def _capabilities(images: bool, captions: bool, logits: bool) -> list[str]:
    caps = []
    if images:
        caps.append(schema.CAP_IMAGES)
    if captions:
        caps.append(schema.CAP_CAPTIONS)
    if logits:
        caps.append(schema.CAP_LOGITS)
    return caps


def _cache_exists(path: str) -> bool:
    """Whether --out already holds something (a local non-empty directory, or a zarr group at a URL)."""
    if "://" not in path:
        return Path(path).exists() and any(Path(path).iterdir())
    try:
        zarr.open_group(path, mode="r")
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False


def _remove_cache(path: str) -> None:
    p = Path(path)
    if not (p / "zarr.json").exists():
        raise BuildError(f"--overwrite refused: {path} does not look like a zarr cache; remove it yourself")
    shutil.rmtree(p)


def consolidate(root: zarr.Group, units: list[Unit], *, started: float, counts_here: dict) -> BuildResult:
    """Rank 0, after every rank finished: read each unit's status, find duplicate keys, mark the cache complete."""
    attrs = dict(root.attrs[schema.ROOT_ATTR])
    rejected = Counter()
    totals = Counter()
    failed, missing = [], []
    labels = captions = 0
    for u in units:
        st = schema.read_status(root, u)
        if st is None:
            missing.append(u.name)
            continue
        if st["state"] != schema.STATUS_DONE:
            failed.append(u.name)
        rejected.update(st.get("rejected", {}))
        totals[f"{u.kind}_rows"] += st["rows"]
        totals[f"{u.kind}_valid"] += st["valid"]
        labels += st.get("labels", 0)
        captions += st.get("captions", 0)
    dups = find_duplicate_keys(root, [u for u in units if u.kind == IMAGES])
    complete = not failed and not missing
    caps = set(attrs.get("capabilities", []))
    if labels:
        caps.add(schema.CAP_LABELS)
    if captions:
        caps.add(schema.CAP_PAIRED)
    elapsed = time.time() - started
    summary = {
        "images": totals[f"{IMAGES}_valid"], "image_rows": totals[f"{IMAGES}_rows"],
        "captions": totals[f"{CAPTIONS}_valid"], "caption_rows": totals[f"{CAPTIONS}_rows"],
        "labelled_images": labels, "paired_captions": captions,
        "rejected": dict(sorted(rejected.items())), "failed_units": failed, "missing_units": missing,
        "duplicate_keys": dups,
    }
    attrs.update(status=schema.CACHE_COMPLETE if complete else schema.CACHE_INCOMPLETE,
                 capabilities=[c for c in schema.KNOWN_CAPABILITIES if c in caps], summary=summary)
    attrs["run"] = {**attrs.get("run", {}), "finished": time.time(), "seconds": elapsed, "this_run": counts_here}
    root.attrs[schema.ROOT_ATTR] = attrs
    summary_run = {"seconds": round(elapsed, 2), **counts_here}
    return BuildResult(str(root.store.root) if hasattr(root.store, "root") else str(root.store), attrs["status"],
                       {**summary, "this_run": summary_run}, failed + missing)


def find_duplicate_keys(root: zarr.Group, units: list[Unit]) -> dict:
    """Keys that occur in more than one row across shards. Policy: both rows are kept; they are listed here."""
    seen: dict[str, list[str]] = {}
    for u in units:
        try:
            keys = root[f"{u.data_path}/key"][...]
            valid = root[f"{u.data_path}/valid"][...]
        except KeyError:
            continue
        for pos, (k, ok) in enumerate(zip(keys.tolist(), valid.tolist(), strict=True)):
            if ok:
                seen.setdefault(k, []).append(f"{u.name}:{pos}")
    dups = {k: v for k, v in seen.items() if len(v) > 1}
    return {"count": len(dups), "examples": dict(list(sorted(dups.items()))[:20])}


def run(cfg: BuildConfig) -> BuildResult:
    """Build (or resume, or extend) the cache described by cfg."""
    dist = _init_distributed()
    try:
        return _Builder(cfg, dist).run()
    finally:
        if dist.initialised_here:
            torch.distributed.destroy_process_group()


def print_summary(result: BuildResult, file=None) -> None:
    file = file or sys.stderr  # looked up at call time, so redirection (and click's test runner) sees it
    s = result.summary
    print(f"cache: {result.out}  status: {result.status}", file=file)
    if s:
        print(f"  images: {s['images']} cached ({s['image_rows']} rows), captions: {s['captions']} cached "
              f"({s['caption_rows']} rows)", file=file)
        if s["rejected"]:
            print("  rejected: " + ", ".join(f"{k}={v}" for k, v in s["rejected"].items()), file=file)
        if s["duplicate_keys"]["count"]:
            print(f"  duplicate keys: {s['duplicate_keys']['count']} (all rows kept; see `kdcache info`)", file=file)
        r = s.get("this_run")
        if r:
            n = r.get("images", 0) + r.get("captions", 0)
            print(f"  this run: {r.get('images', 0)} images, {r.get('captions', 0)} captions "
                  f"({r.get('image_rejected', 0) + r.get('caption_rejected', 0)} rejected) in {r['seconds']:.1f} s"
                  + (f" = {n / r['seconds']:.1f} samples/s" if r["seconds"] > 0 else ""), file=file)
        for u in s["failed_units"]:
            print(f"  FAILED: {u}", file=file)
        for u in s["missing_units"]:
            print(f"  not done: {u}", file=file)
