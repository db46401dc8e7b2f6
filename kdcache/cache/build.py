"""`kdcache build`: run a frozen teacher once over image shards and caption corpora and write one zarr cache.

    kdcache build --images 'shards/{00000..00009}.tar' --captions coco:captions_val2017.json \
        --teacher local-dir:teachers/kdc-cifar10-rn18 --classes cifar10 --views 2 --out cache.zarr

Work is split into units (an image shard, or a block of caption records). Each unit owns its zarr arrays, is
written whole, then gets a status object; `--resume` skips units whose status says done. Under torchrun, ranks take
disjoint units and rank 0 consolidates after a barrier.

This module is the orchestration; the stages live next to it:
plan (`plan.py`) -> stream (`stream.py`) -> teacher pass (`assemble.py`) -> writer and consolidation (`writer.py`).
It also decides what a run may do with an existing --out: create it, overwrite it, or resume it if it is the same build
(a root left by a kill before its attributes were recorded is recognised and started again). The whole build holds the
cache's writer lock (`kdcache.locks`, OUT.lock): a second writer is refused before anything is deleted or written.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import sys
import time
from collections import Counter
from typing import TextIO

import numpy as np
import torch
import zarr
from tqdm import tqdm

from kdcache import __version__, location
from kdcache.augment import Policy, erase_fill, strong
from kdcache.cache import schema
from kdcache.cache.assemble import HostOutputs, TeacherPass, load_teacher_pass
from kdcache.cache.captions import count_caption_records, parse_caption_spec
from kdcache.cache.config import BuildConfig, BuildError, BuildResult, view_policy
from kdcache.cache.dist import Dist, init_distributed
from kdcache.cache.plan import RankPlan, plan_rank, plan_units
from kdcache.cache.schema import Unit
from kdcache.cache.stream import Batch, one_thread, shard_loader
from kdcache.cache.writer import (
    UnitWriter,
    cache_exists,
    check_out_path,
    consolidate,
    consolidated_result,
    create_cache,
    interrupted_start,
    join_cache,
    remove_cache,
    reopen_cache,
)
from kdcache.locks import LockError, WriterLock
from kdcache.shards import expand_urls
from kdcache.shards.decode import MAX_CAPTION_CHARS
from kdcache.shards.gpudecode import DECODERS, ahead, device_decode_problem
from kdcache.teacher import teacher_mismatch

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ what the cache records

def library_versions() -> dict:
    """The versions of everything that shapes the cache's bytes, recorded in it."""
    import numcodecs
    import open_clip
    import torchvision
    import webdataset

    return {"kdcache": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "zarr": zarr.__version__, "numcodecs": numcodecs.__version__, "webdataset": webdataset.__version__,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def resolved_build(cfg: BuildConfig, threads: int, precision: str, topk: int, preprocess: dict) -> dict:
    """The part of the config that determines the cache's bytes (the --resume identity, minus inputs). A non-default
    --augment policy is recorded under "augment" with its erase fill; default-policy caches are as before."""
    policy = view_policy(cfg)
    views = policy or Policy()
    out = {
        "views": cfg.views, "classes": cfg.classes, "templates": cfg.templates, "topk": topk,
        "batch_size": cfg.batch_size, "threads": threads, "device_type": torch.device(cfg.device).type,
        "precision": precision, "embed_dtype": cfg.embed_dtype, "seed": cfg.seed, "limit": cfg.limit,
        "max_pixels": cfg.max_pixels, "background": list(cfg.background), "view_scale": list(views.rrc_scale),
        "view_ratio": list(views.rrc_ratio), "block_records": schema.BLOCK_RECORDS, "decode": cfg.decode,
    }
    if policy is not None:
        out["augment"] = {"policy": policy.to_json(), "fill": list(erase_fill(preprocess))}
    return out


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
        if section == "build":  # caches from before --decode existed were all decoded by PIL
            a, b = ({"decode": "cpu", **(d or {})} for d in (a, b))
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


def _check_config(cfg: BuildConfig, dist: Dist) -> None:
    """Refuse option values no build can honour, before the teacher is loaded."""
    if cfg.views < 1:
        raise BuildError("--views must be at least 1 (view 0 is the teacher's eval transform)")
    if cfg.batch_size < 1:
        raise BuildError("--batch-size must be at least 1")
    if not cfg.images and not cfg.captions:
        raise BuildError("nothing to build: give --images and/or --captions")
    location.check_location(cfg.out, "--out")  # the cache records its inputs: no credentials in any of them
    for pattern in cfg.images:
        location.check_location(pattern, "--images")
    if cfg.embed_dtype not in schema.EMBED_DTYPES:
        raise BuildError(f"--embed-dtype must be one of {sorted(schema.EMBED_DTYPES)}")
    policy = view_policy(cfg)  # a bad --augment fails here, before the teacher is loaded
    if policy is not None and cfg.views < 2:
        log.warning("--augment applies to views 1..K-1, but --views is %d: only view 0 (the eval transform) is cached",
                    cfg.views)
    if cfg.limit is not None and dist.world > 1:
        raise BuildError("--limit is for single-process dry runs; it cannot be combined with torchrun")
    _check_decode(cfg, policy)


def _check_decode(cfg: BuildConfig, policy: Policy | None) -> None:
    if cfg.decode not in DECODERS:
        raise BuildError(f"--decode must be one of {', '.join(DECODERS)}, got {cfg.decode!r}")
    if cfg.decode != "gpu":
        return
    why = device_decode_problem(cfg.device) if cfg.decode_device is None else None
    if why:
        raise BuildError(why)
    if policy is not None and policy.mixes:
        raise BuildError("--decode gpu does not render mixed views (--augment mix=...): use --decode cpu")


def _inputs(cfg: BuildConfig) -> tuple[list[str], list[dict]]:
    """The shard URLs (brace patterns expanded) and the caption corpora with their record counts, in input order."""
    urls = expand_urls(list(cfg.images)) if cfg.images else []
    corpora = []
    for spec in cfg.captions:
        kind, path = parse_caption_spec(spec)
        corpora.append({"spec": f"{kind}:{path}", "kind": kind, "path": path,
                        "records": count_caption_records(kind, path)})
    return urls, corpora


def _capabilities(images: bool, captions: bool, logits: bool) -> list[str]:
    caps = []
    if images:
        caps.append(schema.CAP_IMAGES)
    if captions:
        caps.append(schema.CAP_CAPTIONS)
    if logits:
        caps.append(schema.CAP_LOGITS)
    return caps


# ------------------------------------------------------------------------------------------------------- the build

class _Builder:
    """One rank's build: load the teacher, open the store, plan, then stream -> teacher -> writer over this rank's
    units still to do; rank 0 consolidates once every rank is done."""

    def __init__(self, cfg: BuildConfig, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.counts = Counter()  # what this run did (the cache's run attributes record it)

    def run(self) -> BuildResult:
        cfg, dist = self.cfg, self.dist
        t0 = time.time()
        _check_config(cfg, dist)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        threads = torch.get_num_threads()
        urls, corpora = _inputs(cfg)
        self.teach: TeacherPass = load_teacher_pass(cfg)
        attrs = self._root_attrs(urls, corpora, threads=threads, started=t0)
        self.root = self._open_store(attrs)
        units = plan_units(attrs)
        plan = plan_rank(self.root, units, rank=dist.rank, world=dist.world, limit=cfg.limit)
        if plan.skipped:
            log.info("resume: %d of %d units already done, skipping them", plan.skipped, len(plan.mine))
        self.write_units(plan, corpora)
        dist.barrier()
        result = None
        if dist.rank == 0:
            result = consolidate(self.root, units, started=t0, counts_here=dict(self.counts))
        dist.barrier()
        if result is None:  # other ranks report what rank 0 consolidated
            result = consolidated_result(cfg.out)
        return result

    def _root_attrs(self, urls: list[str], corpora: list[dict], *, threads: int, started: float) -> dict:
        """The cache's root attributes while it is being built (consolidation adds the summary and final status)."""
        cfg, teacher = self.cfg, self.teach.teacher
        return {
            "schema_version": schema.SCHEMA_VERSION,
            "capabilities": [],
            "status": schema.CACHE_BUILDING,
            "teacher": teacher.identity,
            "preprocess": teacher.preprocess,
            "embed_dim": teacher.embed_dim,
            "logit_scale": float(teacher.logit_scale),
            "build": {**resolved_build(cfg, threads, teacher.precision, self.teach.topk, teacher.preprocess),
                      "tokens": self.teach.tokens, **({"hints": self.teach.hints} if self.teach.hints else {})},
            "inputs": {"images": urls, "captions": [c["spec"] for c in corpora],
                       "caption_records": [c["records"] for c in corpora]},
            "versions": library_versions(),
            "summary": {},
            "run": {"host": platform.node(), "started": started, "world_size": self.dist.world,
                    "workers": cfg.workers},
        }

    def _open_store(self, attrs: dict) -> zarr.Group:
        """Rank 0 creates --out (or overwrites it, or reopens it for --resume once it is shown to be the same build)
        and records the root attributes; the other ranks open it after the barrier."""
        cfg, dist, path = self.cfg, self.dist, self.cfg.out
        if dist.rank == 0:
            exists = cache_exists(path)
            if exists and not (cfg.resume or cfg.overwrite):
                raise BuildError(f"{path} already exists: pass --resume to continue or extend it, or --overwrite "
                                 "to start again")
            if exists and cfg.resume and interrupted_start(path):
                log.warning("resume: %s holds only the start of a build killed before it recorded anything (no "
                            "kdcache attributes, no unit data): starting it again", path)
                remove_cache(path)
                exists = False
            if exists and cfg.overwrite:
                remove_cache(path)
                exists = False
            if exists:
                root, old = reopen_cache(path)
                check_resume_identity(old, attrs)
                for k in schema.remove_interrupted_writes(root):
                    log.info("resume: removed %s, left by an interrupted write", k)
                attrs["run"]["resumed_from"] = old.get("run", {}).get("started")
            else:
                root = create_cache(path, vocab=self.teach.vocab)
            attrs["capabilities"] = (_capabilities(bool(attrs["inputs"]["images"]), bool(attrs["inputs"]["captions"]),
                                                   self.teach.head is not None)
                                     + schema.embed_capabilities(cfg.embed_dtype))
            if self.teach.tokens is not None:
                attrs["capabilities"].append(schema.CAP_TOKENS)
            if strong(self.teach.policy) and attrs["inputs"]["images"]:
                attrs["capabilities"].append(schema.CAP_STRONG_VIEWS)
            if self.teach.hints and attrs["inputs"]["images"]:
                attrs["capabilities"].append(schema.CAP_HINTS)
            attrs["required_capabilities"] = [c for c in attrs["capabilities"] if c in schema.MUST_UNDERSTAND]
            root.attrs[schema.ROOT_ATTR] = attrs
        dist.barrier()
        if dist.rank != 0:
            root = join_cache(path, rank=dist.rank)
        return root

    def write_units(self, plan: RankPlan, corpora: list[dict]) -> None:
        """Image shards, then caption blocks, each unit handed to the background writer once finished. On Ctrl-C the
        writes already started are finished (each unit whole, its status last) before the interrupt goes on."""
        cfg, dist = self.cfg, self.dist
        self.writer = UnitWriter(self.root, background=self.teach.teacher.device.type != "cpu")
        interrupted = False
        try:
            with tqdm(desc=f"images (rank {dist.rank})" if dist.world > 1 else "images", unit="img",
                      disable=not cfg.progress or not plan.images, dynamic_ncols=True) as bar:
                if plan.images:
                    self.run_images(plan.images, plan.image_limit, bar)
            total_caps = sum(u.stop - u.start for u in plan.captions)
            with tqdm(total=total_caps, desc="captions", unit="cap", disable=not cfg.progress or not plan.captions,
                      dynamic_ncols=True) as bar:
                for u, q in zip(plan.captions, plan.caption_quota, strict=True):
                    self.run_caption_block(u, corpora[u.index], q, bar)
            self.writer.drain()
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: finishing the writes already started; rerun with --resume to continue")
            self.writer.drain()
        finally:
            self.writer.close()
        if interrupted:
            raise KeyboardInterrupt

    def run_images(self, units: list[Unit], limit: int | None, bar: tqdm) -> None:
        """Stream the shards, run the teacher on each batch, and assemble and submit each shard when its ShardMeta
        (which follows its last batch) arrives."""
        teach = self.teach
        if limit is not None and self.cfg.workers:
            log.info("--limit: reading shards in order in the main process (--workers ignored)")
        loader = shard_loader(units, preprocess=teach.teacher.preprocess, cfg=self.cfg, limit=limit,
                              pin_memory=torch.cuda.is_available() and teach.teacher.device.type == "cuda")
        on_device = None  # --decode gpu: JPEGs decoded and rendered on the device (kdcache.cache.gpuviews)
        if self.cfg.decode == "gpu":
            from kdcache.cache.gpuviews import DeviceViews

            on_device = DeviceViews(teach.teacher.preprocess, cfg=self.cfg,
                                    device=self.cfg.decode_device or teach.teacher.device)
        parts: dict[str, list] = {}  # unit name -> teacher outputs of its batches so far
        rows_seen, shards_seen = 0, 0
        # The last batch's outputs, still on their way to the host: read after the next batch is launched, so that on
        # a GPU its decode and launches overlap this one's forward (a ShardMeta follows every shard's last batch).
        pending: tuple[Batch, HostOutputs] | None = None

        def land() -> None:
            nonlocal pending
            if pending is not None:
                done, out = pending
                pending = None
                parts.setdefault(done.unit.name, []).append((done.positions, done.views, *out.get()))
        items = one_thread(loader) if loader.num_workers == 0 else loader
        # --decode gpu: each batch decoded and rendered on a background thread while the previous one's forward runs
        prepared = ((item, None) for item in items) if on_device is None else ahead(items, on_device.prepare)
        for item, pixels in prepared:
            if isinstance(item, Batch):
                out = teach.image_outputs(item.pixels if pixels is None else pixels)
                land()
                pending = (item, out)
                bar.update(int((item.views == 0).sum()))
                continue
            land()
            if on_device is not None:
                on_device.finish(item)
                self.counts.update(decoded_on_device=item.decode["device"],
                                   decoded_by_pil=sum(item.decode["pil"].values()))
            data, status = teach.shard_unit(item, parts.pop(item.unit.name, []))
            self.counts.update(images=status["valid"], image_rejected=sum(status["rejected"].values()))
            if status["state"] == schema.STATUS_FAILED:
                log.error("shard %s failed: %s (kept %d complete samples)", item.unit.source, status["error"],
                          status["valid"])
            self.writer.submit(item.unit, teach.image_specs, data, status)
            # Shard sizes are unknown until read: estimate the total from the shards seen so far, for the ETA.
            rows_seen, shards_seen = rows_seen + item.rows, shards_seen + 1
            bar.total = max(bar.n, round(rows_seen / shards_seen * len(units)))
            bar.refresh()

    def run_caption_block(self, unit: Unit, corpus: dict, quota: int | None, bar: tqdm) -> None:
        """One caption block: read and encode its records, then submit it."""
        data, status = self.teach.caption_unit(unit, corpus, quota)
        self.counts.update(captions=status["valid"], caption_rejected=sum(status["rejected"].values()))
        bar.update(unit.stop - unit.start)
        self.writer.submit(unit, self.teach.caption_specs, data, status)


def run(cfg: BuildConfig) -> BuildResult:
    """Build (or resume, or extend) the cache described by cfg, holding its writer lock (`kdcache.locks`; under
    torchrun rank 0 takes it) from before anything is deleted or written until the end, errors and Ctrl-C included.
    An OSError while writing (disk full, ...) becomes a BuildError naming the path: what was written is kept and the
    build is resumable."""
    dist = init_distributed()
    try:
        check_out_path(cfg.out)
        lock = WriterLock(cfg.out, what="cache") if dist.rank == 0 else contextlib.nullcontext()
        with lock:
            return _Builder(cfg, dist).run()
    except LockError as e:
        raise BuildError(str(e)) from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):  # a missing input: its own message names it
            raise
        raise BuildError(f"{os_error_text(e, cfg.out)}: the build stopped; the units already written are kept: fix "
                         "this, then rerun with --resume") from None
    finally:
        if dist.initialised_here:
            torch.distributed.destroy_process_group()


def os_error_text(e: OSError, path: str) -> str:
    """An OSError in one line: what failed and on which path."""
    return f"{e.filename or path}: {e.strerror or e}"


def print_summary(result: BuildResult, file: TextIO | None = None) -> None:
    """What the build did, for a person: counts, rejects by reason, duplicate keys, this run's speed, failed units."""
    file = file or sys.stderr  # looked up at call time, so redirection (and click's test runner) sees it
    s = result.summary
    print(f"cache: {result.out}  status: {result.status}", file=file)
    if s:
        print(f"  images: {s['images']} cached ({s['image_rows']} rows), captions: {s['captions']} cached "
              f"({s['caption_rows']} rows)", file=file)
        if s["rejected"]:
            print("  rejected: " + ", ".join(f"{k}={v}" for k, v in s["rejected"].items()), file=file)
        if s.get("captions_truncated"):
            print(f"  captions truncated: {s['captions_truncated']} (cut to {MAX_CAPTION_CHARS} characters)", file=file)
        if s["duplicate_keys"]["count"]:
            print(f"  duplicate keys: {s['duplicate_keys']['count']} (all rows kept; see `kdcache info`)", file=file)
        r = s.get("this_run")
        if r:
            n = r.get("images", 0) + r.get("captions", 0)
            print(f"  this run: {r.get('images', 0)} images, {r.get('captions', 0)} captions "
                  f"({r.get('image_rejected', 0) + r.get('caption_rejected', 0)} rejected) in {r['seconds']:.1f} s"
                  + (f" = {n / r['seconds']:.1f} samples/s" if r["seconds"] > 0 else ""), file=file)
        if r and "decoded_on_device" in r:
            print(f"  --decode gpu: {r['decoded_on_device']} images decoded on the device, {r['decoded_by_pil']} by "
                  "PIL (not JPEG, or refused; per shard in its status, 'decode')", file=file)
        for u in s["failed_units"]:
            print(f"  FAILED: {u}", file=file)
        for u in s["missing_units"]:
            print(f"  not done: {u}", file=file)
