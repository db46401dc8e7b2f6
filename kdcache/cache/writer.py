"""The build's last step, the writer: the store, finished units written (on a background thread beside a GPU
teacher), consolidation.

A finished unit's arrays are written whole, then its status (DESIGN: a unit's status is written after its data, so
"is this unit done?" has one answer). With the teacher on a GPU, writes run on one background thread so compression
overlaps the teacher's next batch; with it on the CPU they run between batches, on the build's own thread. After every
rank has finished, rank 0 consolidates: it reads each unit's status, lists duplicate keys and marks the cache complete
or incomplete.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import zarr

from kdcache import location
from kdcache.cache import schema
from kdcache.cache.config import BuildError, BuildResult
from kdcache.cache.schema import CAPTIONS, IMAGES, ArraySpec, Unit

if TYPE_CHECKING:
    import numpy as np

    from kdcache.cache.assemble import Vocab


# ------------------------------------------------------------------------------------------------------ unit writes

def write_unit(root: zarr.Group, unit: Unit, specs: dict[str, ArraySpec], data: dict[str, np.ndarray],
               status: dict) -> None:
    """A finished unit: its arrays first, then its status, so a status always describes data already written. The
    status records the digest of every array as written (schema.DIGEST_KEY), which `verify` and readers check."""
    digests = schema.write_unit(root, unit, specs, data)
    schema.write_status(root, unit, {**status, schema.DIGEST_KEY: digests})


class UnitWriter:
    """Writes finished units on one background thread, overlapped with the next batch; at most two finished units
    wait for their writes, which bounds memory.

    With background=False (a teacher on the CPU) each unit is written at once, on the calling thread, between two
    teacher batches: there the forward already has every core (torch's OpenMP threads), and a writer thread (and the
    zarr I/O and compression threads it wakes) running beside it would not overlap anything; it would take a core
    from one OpenMP thread and stall the others at the forward's next barrier."""

    def __init__(self, root: zarr.Group, *, background: bool = True):
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer") if background else None
        self._pending: list[Future] = []

    def submit(self, unit: Unit, specs: dict[str, ArraySpec], data: dict[str, np.ndarray], status: dict) -> None:
        """Queue a finished unit's write (data, then status); blocks while two writes are already waiting. Without a
        background thread, write it now."""
        if self._pool is None:
            write_unit(self.root, unit, specs, data, status)
            return
        while len(self._pending) >= 2:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(write_unit, self.root, unit, specs, data, status))

    def drain(self) -> None:
        """Wait for every submitted write (raising the first error)."""
        for f in self._pending:
            f.result()
        self._pending = []

    def close(self) -> None:
        """Stop the thread once the writes already started have finished."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------------------------- store

def check_out_path(path: str) -> None:
    """Refuse an --out that is an existing file (or lies below one), or a URL with credentials, before anything else
    happens (its lock goes next to it)."""
    if location.is_url(location.check_location(path, "--out")):
        return
    p = os.path.abspath(path)
    while not os.path.exists(p):
        if os.path.dirname(p) == p:
            return
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        where = path if p == os.path.abspath(path) else f"{path} (its parent {p})"
        raise BuildError(f"--out {where} is a file, not a folder: choose another --out for the cache")


def cache_exists(path: str) -> bool:
    """Whether --out already holds something (a file, a non-empty directory, or objects under a URL)."""
    return location.exists(path)


def _store_files(path: str) -> dict[str, str]:
    """Every file of the store at `path` (local or URL): relative name -> its full name for fsspec."""
    import fsspec

    fs, key = fsspec.core.url_to_fs(path)
    key = key.rstrip("/")
    return {f[len(key):].lstrip("/"): f for f in fs.find(key)}


def interrupted_start(path: str) -> bool:
    """Whether `path` holds only the first steps of a build killed before it recorded its root attributes: no
    readable kdcache attributes, and nothing but the root's zarr.json, the vocabulary and zarr's temporary files.
    (The build records its root attributes before it writes any unit, so such a store holds no cached data.)"""
    import fsspec

    files = _store_files(path)
    if not files:
        return False
    if "zarr.json" in files:
        fs, _ = fsspec.core.url_to_fs(path)
        try:
            if schema.ROOT_ATTR in (json.loads(fs.cat_file(files["zarr.json"])).get("attributes") or {}):
                return False
        except (ValueError, AttributeError):
            pass  # cut short while being written: no attributes were recorded
    return all(f == "zarr.json" or f.startswith(f"{schema.VOCAB}/") or f.endswith(".partial") for f in files)


def remove_cache(path: str) -> None:
    """--overwrite (and a --resume of an interrupted start): delete a cache, refusing a folder that is not one."""
    if not (location.holds_zarr_group(path) or interrupted_start(path)):
        raise BuildError(f"--overwrite refused: {path} does not look like a zarr cache; remove it yourself")
    location.remove(path)


def create_cache(path: str, *, vocab: Vocab | None) -> zarr.Group:
    """A new, empty cache at `path` (replacing whatever is there), with the class vocabulary if there is one."""
    root = zarr.open_group(path, mode="w")
    if vocab is not None:
        schema.write_vocab(root, classes=vocab.classes, templates=vocab.templates, head=vocab.head,
                           attributes={"classes_source": vocab.classes_source,
                                       "templates_source": vocab.templates_source})
    return root


def reopen_cache(path: str) -> tuple[zarr.Group, dict]:
    """An existing cache opened for writing, and its root attributes; refused unless it is a kdcache cache of the
    schema major version this kdcache writes."""
    root = zarr.open_group(path, mode="r+")
    old = dict(root.attrs).get(schema.ROOT_ATTR)
    if not old:
        raise BuildError(f"{path} is not a kdcache cache (no '{schema.ROOT_ATTR}' attributes); --overwrite replaces it")
    major = int(str(old.get("schema_version", "0")).split(".")[0])
    if major != schema.SCHEMA_MAJOR:
        raise BuildError(f"{path} has schema {old.get('schema_version')}; this kdcache writes "
                         f"{schema.SCHEMA_VERSION}")
    return root, old


def join_cache(path: str, *, rank: int) -> zarr.Group:
    """The cache rank 0 created or reopened, opened for writing by another rank (after the barrier)."""
    if not cache_exists(path):
        raise BuildError(f"rank {rank}: {path} was not created by rank 0")
    return zarr.open_group(path, mode="r+")


# --------------------------------------------------------------------------------------------------- consolidation

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
        totals["captions_truncated"] += st.get("captions_truncated", 0)
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
        "labelled_images": labels, "paired_captions": captions, "captions_truncated": totals["captions_truncated"],
        "rejected": dict(sorted(rejected.items())), "failed_units": failed, "missing_units": missing,
        "duplicate_keys": dups,
    }
    attrs.update(status=schema.CACHE_COMPLETE if complete else schema.CACHE_INCOMPLETE,
                 capabilities=[c for c in schema.KNOWN_CAPABILITIES if c in caps], summary=summary)
    attrs["run"] = {**attrs.get("run", {}), "finished": time.time(), "seconds": elapsed, "this_run": counts_here}
    root.attrs[schema.ROOT_ATTR] = attrs
    summary_run = {"seconds": round(elapsed, 2), **counts_here}
    return BuildResult(location.store_location(root.store), attrs["status"],
                       {**summary, "this_run": summary_run}, failed + missing)


def consolidated_result(path: str) -> BuildResult:
    """What rank 0 consolidated, read back by the other ranks."""
    attrs = dict(zarr.open_group(path, mode="r").attrs)[schema.ROOT_ATTR]
    s = attrs["summary"]
    return BuildResult(path, attrs["status"], s, s["failed_units"] + s["missing_units"])


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
