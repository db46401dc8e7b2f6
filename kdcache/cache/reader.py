"""Open a kdcache cache for reading, checking that it is one this code understands and that it is complete.

    cache = open_cache("cache.zarr", need=["logits"])
    for unit in cache.units("images"):
        rows = cache.read(unit, ["emb", "valid"])   # embeddings as float (int8 caches are decoded)

Readers never import the teacher; everything they need (preprocessing, head, logit scale) is in the cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import zarr

from kdcache.augment import Policy, PolicyError
from kdcache.cache import schema
from kdcache.cache.plan import plan_units
from kdcache.cache.schema import Unit
from kdcache.shards import expand_urls


class CacheError(ValueError):
    """The cache cannot be used as asked; the message names the field or unit."""


def deterministic_attrs(attrs: dict) -> dict:
    """Root attributes without host and timing fields: equal for identical caches."""
    return {k: v for k, v in attrs.items() if k not in schema.NONDETERMINISTIC_KEYS}


def fingerprint(attrs: dict) -> str:
    """A short digest of what the cache holds (teacher, build config, inputs, summary), for run directories."""
    keep = {k: attrs.get(k) for k in ("schema_version", "teacher", "preprocess", "build", "inputs", "summary")}
    blob = json.dumps(keep, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:32]


@dataclass
class Cache:
    path: str
    root: zarr.Group
    attrs: dict

    @property
    def complete(self) -> bool:
        return self.attrs.get("status") == schema.CACHE_COMPLETE

    @property
    def capabilities(self) -> list[str]:
        return list(self.attrs.get("capabilities", []))

    @property
    def embed_dim(self) -> int:
        return int(self.attrs["embed_dim"])

    @property
    def views(self) -> int:
        return int(self.attrs["build"]["views"])

    @property
    def logit_scale(self) -> float:
        return float(self.attrs["logit_scale"])

    @cached_property
    def all_units(self) -> list[Unit]:
        return plan_units(self.attrs)

    def units(self, kind: str | None = None) -> list[Unit]:
        return [u for u in self.all_units if kind is None or u.kind == kind]

    def status(self, unit: Unit) -> dict | None:
        return schema.read_status(self.root, unit)

    def require(self, *capabilities: str, why: str = "") -> None:
        missing = [c for c in capabilities if c not in self.capabilities]
        if missing:
            raise CacheError(f"{self.path}: cache lacks capability {missing}{' needed for ' + why if why else ''} "
                             f"(it has {self.capabilities})")

    def vocab(self) -> tuple[list[str], list[str], np.ndarray]:
        """(classes, templates, head [C, D] float32)."""
        self.require(schema.CAP_LOGITS, why="the class vocabulary")
        g = self.root[schema.VOCAB]
        return g["classes"][...].tolist(), g["templates"][...].tolist(), g["head"][...]

    def shard_urls(self, images: Sequence[str] = ()) -> list[str]:
        """Where the image shards are now: the recorded inputs, or `images` (patterns) if they moved (the same shards,
        all of them, in the build's order)."""
        recorded = list(self.attrs["inputs"]["images"])
        if not images:
            return recorded
        urls = expand_urls(list(images))
        if len(urls) != len(recorded):
            raise CacheError(f"--images names {len(urls)} shard(s) but the cache was built from {len(recorded)}; give "
                             f"them all, in the build's order (first recorded: {recorded[:1]})")
        return urls

    def view_policy(self) -> tuple[Policy | None, tuple[int, int, int] | None]:
        """(policy, erase fill RGB) of the cache's random views; (None, None) for the default crop + flip views (every
        cache before schema 1.3). A policy recorded with another policy version is refused, never replayed with this
        code's ops."""
        rec = self.attrs["build"].get("augment")
        if rec is None:
            return None, None
        self.require(schema.CAP_STRONG_VIEWS, why="its view records")
        try:
            policy = Policy.from_json(rec["policy"])
        except PolicyError as e:
            raise CacheError(f"{self.path}: {e}") from None
        return policy, tuple(int(c) for c in rec["fill"])

    @property
    def int8_embeddings(self) -> bool:
        return schema.CAP_INT8 in self.capabilities

    def read(self, unit: Unit, names: Sequence[str] | None = None, *, raw: bool = False) -> dict[str, np.ndarray]:
        """Whole arrays of one unit (each read in whole chunks). Embeddings of an int8 cache come back decoded to
        float32 (unit-norm, NaN where unwritten), the same contract as fp16/fp32 caches; `raw=True` returns the
        stored values (int8 codes) for byte-level tools."""
        g = self.root[unit.data_path]
        names = list(names) if names is not None else [n for n, _ in g.arrays()]
        out = {n: g[n][...] for n in names}
        if self.int8_embeddings and not raw:
            for n in schema.EMBEDDING_ARRAYS:
                if n in out:
                    out[n] = schema.decode_embeddings(out[n])
        return out

    def fingerprint(self) -> str:
        return fingerprint(self.attrs)


def open_cache(path: str, *, allow_incomplete: bool = False, need: Sequence[str] = ()) -> Cache:
    """Check it is a kdcache cache of our schema major version, complete (unless allowed), with `need` capabilities."""
    try:
        root = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise CacheError(f"{path}: no zarr cache there ({e})") from None
    attrs = dict(root.attrs).get(schema.ROOT_ATTR)
    if not attrs:
        raise CacheError(f"{path}: not a kdcache cache (no '{schema.ROOT_ATTR}' attributes)")
    version = str(attrs.get("schema_version", "?"))
    if version.split(".")[0] != str(schema.SCHEMA_MAJOR):
        raise CacheError(f"{path}: schema_version {version} is not readable by this kdcache "
                         f"(reads major version {schema.SCHEMA_MAJOR})")
    unknown = [c for c in attrs.get("required_capabilities", []) if c not in schema.KNOWN_CAPABILITIES]
    if unknown:
        raise CacheError(f"{path}: the cache requires capabilities {unknown} that this kdcache does not understand "
                         "(it was written by a newer kdcache); upgrade kdcache to read it")
    cache = Cache(path, root, attrs)
    if not cache.complete and not allow_incomplete:
        s = attrs.get("summary", {})
        detail = ""
        if s.get("failed_units") or s.get("missing_units"):
            detail = f" (failed: {s.get('failed_units', [])[:5]}, not done: {s.get('missing_units', [])[:5]})"
        raise CacheError(f"{path}: cache status is '{attrs.get('status')}'{detail}; finish it with "

                         "`kdcache build ... --resume`, or allow an incomplete cache explicitly")
    cache.require(*need)
    return cache
