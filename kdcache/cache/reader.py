"""Open a kdcache cache for reading, checking that it is one this code understands and that it is complete.

    cache = open_cache("cache.zarr", need=["logits"])
    for unit in cache.units("images"):
        rows = cache.read(unit, ["emb", "valid"])   # embeddings as float (int8 caches are decoded)

Readers never import the teacher; everything they need (preprocessing, head, logit scale) is in the cache.

Readers fail closed: `Cache.read` requires the unit's status (a complete cache with a unit that has none is refused,
never trained on in part), its group, every array asked for with the schema's shape, every chunk of each (zarr would
read a missing one back as fill values), each chunk decodable (zstd checksums), and each array's content equal to the
digest its status records (schema 1.4; units built before have none and get the other checks). Any failure is a
one-line CacheError naming the unit, array and chunk and saying how to rebuild the unit.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import zarr
from zarr.core.sync import sync

from kdcache import location
from kdcache.augment import Policy, PolicyError
from kdcache.cache import schema
from kdcache.cache.plan import plan_units
from kdcache.cache.schema import Unit
from kdcache.shards import expand_urls


class CacheError(ValueError):
    """The cache cannot be used as asked; the message names the field or unit."""


def array_chunks(arr: zarr.Array, prefix: str) -> Iterator[tuple[str, tuple[slice, ...]]]:
    """(store key, selection) of every chunk of `arr`, whose store path is `prefix`."""
    grid = [math.ceil(s / c) for s, c in zip(arr.shape, arr.chunks, strict=True)]
    enc = arr.metadata.chunk_key_encoding
    for idx in itertools.product(*(range(g) for g in grid)):
        sel = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, arr.chunks, arr.shape, strict=True))
        yield f"{prefix}/{enc.encode_chunk_key(idx)}", sel


def expected_chunk_keys(arr: zarr.Array, prefix: str) -> list[str]:
    """Store keys of every chunk `arr` must have (the writer stores every chunk, fill-valued ones included)."""
    return [k for k, _ in array_chunks(arr, prefix)]


def prefix_keys(root: zarr.Group, prefix: str) -> set[str]:
    """Every store key under `prefix` (a group's path), with one listing."""
    async def collect():
        return {k async for k in root.store.list_prefix(prefix.rstrip("/") + "/")}
    return sync(collect())


def shape_problem(arr: zarr.Array, spec: schema.ArraySpec | None, rows: int | None) -> str | None:
    """Why an array's metadata does not fit the schema and its unit's row count (None if it does)."""
    if rows is not None and (not arr.shape or arr.shape[0] != rows):
        return f"has shape {arr.shape}, but the unit's status says {rows} rows"
    if spec is None:
        return None
    if tuple(arr.shape[1:]) != tuple(spec.inner):
        return f"has shape {arr.shape}, the schema wants (rows, {', '.join(map(str, spec.inner))})"
    if spec.dtype is str:
        if arr.dtype.kind not in "OTU":
            return f"has dtype {arr.dtype}, the schema wants strings"
    elif arr.dtype != np.dtype(spec.dtype):
        return f"has dtype {arr.dtype}, the schema wants {np.dtype(spec.dtype)}"
    return None


class ChunkError(Exception):
    """A chunk that cannot be decoded (`key` None when no single chunk could be blamed)."""

    def __init__(self, key: str | None, cause: Exception):
        self.key, self.cause = key, cause
        first = (str(cause).splitlines() or [""])[0]
        super().__init__(f"{'chunk ' + key if key else 'a chunk'} cannot be decoded ({type(cause).__name__}: {first})")


def decode_whole(arr: zarr.Array, prefix: str) -> np.ndarray:
    """The whole array; ChunkError naming the first chunk that does not decode (a checksum or codec failure)."""
    try:
        return arr[...]
    except Exception as e:  # zstd raises RuntimeError on a bad checksum; other codecs raise their own
        for key, sel in array_chunks(arr, prefix):
            try:
                arr[sel]
            except Exception as ce:
                raise ChunkError(key, ce) from None
        raise ChunkError(None, e) from None


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
    # Units whose small arrays (schema ArraySpec.small: one chunk per unit) were all checked by an earlier read.
    _opened: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

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
        """The unit's status object; None when it has none (not done), which only a cache that is not complete may
        have: in a complete cache a unit without one is refused (CacheError), never silently left out."""
        st = schema.read_status(self.root, unit)
        if st is None and self.complete:
            raise CacheError(f"{self.path}: unit {unit.name} ({unit.source}) has no status object (deleted or "
                             f"unreadable) although the cache says complete; {self.rebuild_hint(unit)}")
        return st

    def rebuild_hint(self, unit: Unit) -> str:
        """What to do about a damaged unit (the end of every error about one)."""
        return (f"run `kdcache verify {self.path}` to list every problem, then delete {unit.status_path} in the cache "
                "and rerun the same `kdcache build` with --resume to rebuild that unit")

    def unit_specs(self, unit: Unit) -> dict[str, schema.ArraySpec]:
        """The schema's arrays of a unit of this cache (its build's views, dim, top-k, dtype, tokens, policy, hints)."""
        b = self.attrs["build"]
        if unit.kind == schema.IMAGES:
            return schema.image_arrays(views=b["views"], dim=self.embed_dim, topk=b["topk"],
                                       embed_dtype=b["embed_dtype"], tokens=b.get("tokens"),
                                       policy=self.view_policy()[0], hints=b.get("hints"))
        return schema.caption_arrays(dim=self.embed_dim, embed_dtype=b["embed_dtype"], tokens=b.get("tokens"))

    def require(self, *capabilities: str, why: str = "") -> None:
        missing = [c for c in capabilities if c not in self.capabilities]
        if missing:
            raise CacheError(f"{self.path}: cache lacks capability {missing}{' needed for ' + why if why else ''} "
                             f"(it has {self.capabilities})")

    def vocab(self) -> tuple[list[str], list[str], np.ndarray]:
        """(classes, templates, head [C, D] float32)."""
        self.require(schema.CAP_LOGITS, why="the class vocabulary")
        where = f"{self.path}: the class vocabulary"
        fix = "rebuild the cache (`kdcache build ... --overwrite`)"
        try:
            g = self.root[schema.VOCAB]
        except Exception:
            raise CacheError(f"{where}: its group {schema.VOCAB} is missing or unreadable; {fix}") from None
        digests = dict(g.attrs).get(schema.DIGEST_KEY)
        present = prefix_keys(self.root, schema.VOCAB)
        out = {name: self._checked(g, schema.VOCAB, name, where=where, fix=fix, present=present, digests=digests)
               for name in ("classes", "templates", "head")}
        return out["classes"].tolist(), out["templates"].tolist(), out["head"]

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
        """Whole arrays of one unit (each read in whole chunks; all of the schema's when `names` is None), checked as
        the module docstring says (CacheError naming unit, array and chunk); a unit's first read checks its other
        small arrays too. Embeddings of an int8 cache come back
        decoded to float32 (unit-norm, NaN where unwritten), the same contract as fp16/fp32 caches; `raw=True` returns
        the stored values (int8 codes) for byte-level tools."""
        where = f"{self.path}: unit {unit.name} ({unit.source})"
        st = self.status(unit)
        if st is None:
            raise CacheError(f"{where} is not done (no status object), so it has no rows to read; finish the cache "
                             "with `kdcache build ... --resume`")
        fix = self.rebuild_hint(unit)
        try:
            g = self.root[unit.data_path]
        except Exception:
            raise CacheError(f"{where}: its group {unit.data_path} is missing or unreadable although its status says "
                             f"written; {fix}") from None
        specs = self.unit_specs(unit)
        digests = st.get(schema.DIGEST_KEY)
        names = list(names) if names is not None else list(specs)
        present = prefix_keys(self.root, unit.data_path)
        # The first read of a unit also checks its small arrays that were not asked for (top-k, source sizes, ...):
        # cheap, and a unit with any damaged array is refused rather than half used.
        extra = [] if unit.name in self._opened else [n for n, sp in specs.items() if sp.small and n not in names]
        out = {n: self._checked(g, unit.data_path, n, where=where, fix=fix, present=present, digests=digests,
                                spec=specs.get(n), rows=int(st["rows"])) for n in [*names, *extra]}
        self._opened.add(unit.name)
        for n in extra:
            del out[n]
        if self.int8_embeddings and not raw:
            for n in schema.EMBEDDING_ARRAYS:
                if n in out:
                    out[n] = schema.decode_embeddings(out[n])
        return out

    def _checked(self, group: zarr.Group, path: str, name: str, *, where: str, fix: str, present: set[str],
                 digests: dict | None, spec: schema.ArraySpec | None = None, rows: int | None = None) -> np.ndarray:
        """One array of `group` (at `path`) read whole and checked: present, shaped as `spec` and `rows` say, every
        chunk in `present` and decodable, equal to its digest (when `digests` is given)."""
        prefix = f"{path}/{name}"
        try:
            arr = group[name]
        except Exception:
            raise CacheError(f"{where}: array {prefix} is missing or its metadata is unreadable; {fix}") from None
        problem = shape_problem(arr, spec, rows)
        if problem:
            raise CacheError(f"{where}: array {prefix} {problem} (its zarr.json was edited?); {fix}")
        missing = [k for k in expected_chunk_keys(arr, prefix) if k not in present]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CacheError(f"{where}: array {prefix}: chunk {missing[0]} is missing from the store{more}; {fix}")
        try:
            values = decode_whole(arr, prefix)
        except ChunkError as e:
            raise CacheError(f"{where}: array {prefix}: {e}; {fix}") from None
        if digests is not None:
            want = digests.get(name)
            if want is None:
                raise CacheError(f"{where}: array {prefix} has no content digest in the status, which records "
                                 f"{sorted(digests)}; {fix}")
            if schema.array_digest(values) != want:
                raise CacheError(f"{where}: array {prefix} does not match the content digest its status records "
                                 f"(a chunk was replaced, e.g. copied from another unit, or edited); {fix}")
        return values

    def fingerprint(self) -> str:
        return fingerprint(self.attrs)


def open_cache(path: str, *, allow_incomplete: bool = False, need: Sequence[str] = ()) -> Cache:
    """Check it is a kdcache cache of our schema major version, complete (unless allowed), with `need` capabilities."""
    try:
        root = zarr.open_group(location.check_location(path, "the cache"), mode="r")
    except location.LocationError as e:  # the message must not repeat the URL: it holds a password
        raise CacheError(str(e)) from None
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise CacheError(f"{path}: no zarr cache there ({e})") from None
    except Exception as e:  # an object store that cannot be reached or read (endpoint, permissions)
        if not location.is_url(path):
            raise
        raise CacheError(f"{path}: cannot open the cache ({type(e).__name__}: {e})") from None
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
