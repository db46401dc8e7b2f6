"""`kdcache verify` and `kdcache info`: trust a cache before training on it.

verify: every array has the schema's shape and dtype and its status's row count, every expected chunk is present (zarr
reads a deleted chunk back as fill values, silently), every chunk decodes (zstd checksums catch flipped bytes), every
array equals the content digest its unit's status records (schema 1.4: catches a chunk copied from another unit, which
checksums cannot; units built before have none, and a NOTE says how many), embeddings of valid rows are finite and
unit-norm, rows that are not valid are unwritten (NaN). int8 caches are checked after decoding, plus the codes
themselves: every valid vector has the quantiser's max |code| of 127, and unwritten rows are wholly INT8_UNWRITTEN.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import zarr
from tqdm import tqdm
from zarr.core.sync import sync

from kdcache.augment import Policy
from kdcache.cache import schema
from kdcache.cache.reader import (
    Cache,
    CacheError,
    ChunkError,
    decode_whole,
    expected_chunk_keys,
    open_cache,
    shape_problem,
)
from kdcache.cache.schema import CAPTIONS, IMAGES, Unit, list_keys

# Tolerated |norm - 1| of a valid embedding, by stored dtype. fp16: each component rounds with relative error
# <= 2^-11, so the norm is off by <= ~5e-4 (2e-3 leaves headroom); fp32: summation error only. int8: decoding
# renormalises (q / ||q||), so the decoded norm is 1 up to float32 rounding and gets fp32's tolerance. What int8 loses
# is direction, not length: with s = max|x|, each component's error before renormalisation is <= s/254 (half a step
# of s/127), so the error vector is <= sqrt(D)*s/254 and the cosine to the teacher's vector is
# >= sqrt(1 - D*s^2/254^2): >= 0.9999 for a typical s ~ 3.5/sqrt(D), >= 0.996 even for s = 1 at D = 512. (Had the
# scale been stored, the decoded norm would be off by up to that same sqrt(D)*s/254, ~0.014 for typical s, and would
# need that as its tolerance.) verify has no reference to measure direction against, so for int8 it checks the
# quantiser's invariant instead: the largest |code| of every valid vector is exactly 127.
NORM_TOL = {"float16": 2e-3, "float32": 1e-4, "int8": 1e-4}


@dataclass
class VerifyReport:
    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # facts a user should know that are not problems
    checked_units: int = 0
    checked_chunks: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def no_digests_note(without: int, units: int) -> str:
    """The line `verify` and `info` print for units whose status records no content digests."""
    return (f"{without} of {units} units have no content digests (built before schema 1.4): a chunk copied from "
            "another unit or rewritten in place cannot be detected there; rebuild with `kdcache build ... "
            "--overwrite` to record them")


def verify(path: str, *, progress: bool = True) -> VerifyReport:
    cache = open_cache(path, allow_incomplete=True)
    rep = VerifyReport(path)
    keys = set(list_keys(cache.root))
    for k in schema.interrupted_writes(cache.root):
        rep.problems.append(f"{k}: a temporary file left by an interrupted write (zarr cannot list its group's "
                            "members); `kdcache build ... --resume` removes it")
    if not cache.complete:
        s = cache.attrs.get("summary", {})
        rep.problems.append(f"cache status is '{cache.attrs.get('status')}' (failed units: "
                            f"{s.get('failed_units', [])}, not done: {s.get('missing_units', [])})")
    if schema.CAP_LOGITS in cache.capabilities:
        _check_vocab(cache, keys, rep)
    without = 0
    for unit in tqdm(cache.all_units, desc="verify", unit="unit", disable=not progress):
        st = schema.read_status(cache.root, unit)
        if st is None:
            rep.problems.append(f"{unit.name} ({unit.source}): no status object (unit not done, or its status was "
                                "deleted); rerun the same `kdcache build` with --resume to build it")
            continue
        rep.checked_units += 1
        without += schema.DIGEST_KEY not in st
        _check_unit(cache, unit, st, keys, rep)
    if without:
        rep.notes.append(no_digests_note(without, rep.checked_units))
    return rep


def _read_checked(group: zarr.Group, name: str, prefix: str, *, where: str, keys: set[str], rep: VerifyReport,
                  digests: dict | None, spec: schema.ArraySpec | None = None,
                  rows: int | None = None) -> np.ndarray | None:
    """One array read whole, with a problem for each check it fails: present, shaped as the schema and its status
    say, every chunk present and decodable, equal to its recorded digest. Its values when they can be checked
    further (right shape, all chunks decoded), else None."""
    try:
        arr = group[name]
    except Exception:  # absent, or a zarr.json that does not parse
        rep.problems.append(f"{where}: array {prefix} is missing or its metadata is unreadable")
        return None
    bad_shape = shape_problem(arr, spec, rows)
    if bad_shape:
        rep.problems.append(f"{where}: array {prefix} {bad_shape}")
    expected = expected_chunk_keys(arr, prefix)
    missing = [k for k in expected if k not in keys]
    for k in missing:
        rep.problems.append(f"{where}: array {prefix}: chunk {k} is missing from the store")
    rep.checked_chunks += len(expected)
    if missing or bad_shape:
        return None
    try:
        values = decode_whole(arr, prefix)
    except ChunkError as e:
        rep.problems.append(f"{where}: array {prefix}: {e}")
        return None
    if digests is not None:
        if name not in digests:
            rep.problems.append(f"{where}: array {prefix} has no content digest in the status")
        elif schema.array_digest(values) != digests[name]:
            rep.problems.append(f"{where}: array {prefix} does not match its content digest (a chunk was replaced, "
                                "e.g. copied from another unit, or edited)")
    return values


def _check_vocab(cache: Cache, keys: set[str], rep: VerifyReport) -> None:
    try:
        g = cache.root[schema.VOCAB]
    except Exception:
        rep.problems.append(f"group {schema.VOCAB}: missing or unreadable, though the cache has logits")
        return
    digests = dict(g.attrs).get(schema.DIGEST_KEY)
    data = {name: _read_checked(g, name, f"{schema.VOCAB}/{name}", where="vocab", keys=keys, rep=rep,
                                digests=digests) for name in ("classes", "templates", "head")}
    head = data["head"]
    if head is None:
        return
    norms = np.linalg.norm(head, axis=1) if head.ndim == 2 else np.zeros(0)
    if head.ndim != 2 or not np.all(np.isfinite(head)) or np.any(np.abs(norms - 1) > 1e-4):
        rep.problems.append(f"array {schema.VOCAB}/head: rows are not finite unit vectors")


def _check_unit(cache: Cache, unit: Unit, st: dict, keys: set[str], rep: VerifyReport) -> None:
    where = f"{unit.name} ({unit.source})"
    specs = cache.unit_specs(unit)
    try:
        group = cache.root[unit.data_path]
    except Exception:
        rep.problems.append(f"{where}: status says done but its group {unit.data_path} is missing or unreadable")
        return
    digests = st.get(schema.DIGEST_KEY)
    data = {}
    for name, spec in specs.items():
        values = _read_checked(group, name, f"{unit.data_path}/{name}", where=where, keys=keys, rep=rep,
                               digests=digests, spec=spec, rows=int(st["rows"]))
        if values is not None:
            data[name] = values
    if "valid" not in data:
        return
    valid = data["valid"].astype(bool)
    if int(valid.sum()) != st["valid"]:
        rep.problems.append(f"{where}: {int(valid.sum())} valid rows, status says {st['valid']}")
    if "emb" in data:
        _check_stored_embeddings(data["emb"], valid, f"{where}: array {unit.data_path}/emb", rep)
    for i, _ in enumerate((cache.attrs["build"].get("hints") or {}).get("layers", [])):
        name = schema.hint_array(i)
        if name in data:  # pooled features: finite where valid, unwritten (NaN) elsewhere; no norm to check
            _check_embeddings(data[name], valid, f"{where}: array {unit.data_path}/{name}", rep, tol=math.inf)
    # Rows that hold a caption: valid rows with a paired caption in a shard, every valid row of a caption block.
    if unit.kind == IMAGES and "caption" in data:
        has_cap, tokens_name = valid & (data["caption"] != ""), "caption_tokens"
        if "caption_emb" in data:
            _check_stored_embeddings(data["caption_emb"], has_cap, f"{where}: array {unit.data_path}/caption_emb", rep)
    else:
        has_cap, tokens_name = valid, "tokens"
    tokens = cache.attrs["build"].get("tokens")
    if tokens and tokens_name in data:
        _check_tokens(data[tokens_name], has_cap, tokens["eot"], f"{where}: array {unit.data_path}/{tokens_name}", rep)


def _check_tokens(rows: np.ndarray, expect: np.ndarray, eot: int, where: str, rep: VerifyReport) -> None:
    """Rows of captions must hold a token sequence (ending with the end token); other rows must be all padding."""
    has_eot = (rows == eot).any(axis=1)
    bad = np.flatnonzero(expect & ~has_eot)
    if bad.size:
        rep.problems.append(f"{where}: rows {bad[:10].tolist()} have a caption but no token sequence")
    stray = np.flatnonzero(~expect & (rows != 0).any(axis=1))
    if stray.size:
        rep.problems.append(f"{where}: rows {stray[:10].tolist()} have no caption but hold tokens")


def _check_stored_embeddings(stored: np.ndarray, expect: np.ndarray, where: str, rep: VerifyReport) -> None:
    """Check embeddings as readers see them (decoded), and int8 codes as stored."""
    if stored.dtype == np.int8:
        _check_int8_codes(stored, expect, where, rep)
    _check_embeddings(schema.decode_embeddings(stored), expect, where, rep, tol=NORM_TOL[str(stored.dtype)])


def _check_int8_codes(codes: np.ndarray, expect: np.ndarray, where: str, rep: VerifyReport) -> None:
    """What decoding hides: a rejected row partly overwritten (it decodes to NaN like an unwritten one), and a valid
    vector whose largest |code| is not 127 (the quantiser always maps max|x| to 127, so anything else is corrupt)."""
    if codes.size == 0:
        return
    flat = codes.reshape(codes.shape[0], -1, codes.shape[-1])
    sentinel = flat == schema.INT8_UNWRITTEN
    partly = np.flatnonzero(~expect & sentinel.any(axis=(1, 2)) & ~sentinel.all(axis=(1, 2)))
    if partly.size:
        rep.problems.append(f"{where}: rows {partly[:10].tolist()} are rejected/empty but partly hold values")
    amax = np.abs(flat.astype(np.int16)).max(axis=-1)
    off = np.flatnonzero(expect & ~sentinel.any(axis=(1, 2)) & (amax != schema.INT8_MAX).any(axis=1))
    if off.size:
        rep.problems.append(f"{where}: rows {off[:10].tolist()} are not int8-quantised vectors "
                            f"(largest |code| is not {schema.INT8_MAX}: corrupt)")


def _check_embeddings(emb: np.ndarray, expect: np.ndarray, where: str, rep: VerifyReport, *,
                      tol: float | None = None) -> None:
    """Rows in `expect` must be finite and unit-norm (within `tol`); others must be unwritten (NaN)."""
    if emb.size == 0:
        return
    flat = emb.reshape(emb.shape[0], -1, emb.shape[-1]).astype(np.float32)
    finite = np.isfinite(flat).all(axis=(1, 2))
    nan = np.isnan(flat).all(axis=(1, 2))
    bad_valid = np.flatnonzero(expect & ~finite)
    if bad_valid.size:
        rep.problems.append(f"{where}: rows {bad_valid[:10].tolist()} are valid but not finite (unwritten or corrupt)")
    bad_pad = np.flatnonzero(~expect & ~nan)
    if bad_pad.size:
        rep.problems.append(f"{where}: rows {bad_pad[:10].tolist()} are rejected/empty but hold values")
    tol = NORM_TOL.get(str(emb.dtype), 1e-4) if tol is None else tol
    ok = expect & finite
    if ok.any():
        norms = np.linalg.norm(flat[ok], axis=-1)
        off = np.abs(norms - 1) > tol
        if off.any():
            rows = np.flatnonzero(ok)[np.flatnonzero(off.any(axis=1))]
            rep.problems.append(f"{where}: rows {rows[:10].tolist()} are not unit-norm (|norm-1| > {tol})")


# ---------------------------------------------------------------------------------------------------------- info

def store_bytes(root: zarr.Group, keep=lambda key: True) -> int:
    """Bytes on disk of the store's objects (those whose key `keep` accepts)."""
    keys = [k for k in list_keys(root) if keep(k)]

    async def sizes():
        return [await root.store.getsize(k) for k in keys]
    return int(sum(sync(sizes())))


def raw_bytes(cache: Cache) -> int:
    """Bytes of everything the cache stores, uncompressed (strings as UTF-8), for the compression ratio."""
    total = 0
    for unit in cache.all_units:
        if schema.read_status(cache.root, unit) is None:
            continue
        try:
            g = cache.root[unit.data_path]
        except Exception:
            raise CacheError(f"{cache.path}: unit {unit.name}: its group {unit.data_path} is missing or unreadable; "
                             f"run `kdcache verify {cache.path}`") from None
        for name, arr in g.arrays():
            if arr.dtype.kind in "OTU" or str(arr.dtype).startswith("String") or arr.dtype == np.dtypes.StringDType():
                try:
                    texts = arr[...].tolist()
                except Exception as e:
                    raise CacheError(f"{cache.path}: unit {unit.name}: array {unit.data_path}/{name} cannot be read "
                                     f"({type(e).__name__}); run `kdcache verify {cache.path}`") from None
                total += sum(len(s.encode()) for s in texts)
            else:
                total += int(np.prod(arr.shape)) * arr.dtype.itemsize
    return total


def info(path: str) -> dict:
    cache = open_cache(path, allow_incomplete=True)
    a = cache.attrs
    s = a.get("summary", {})
    units = cache.all_units
    statuses = {u.name: schema.read_status(cache.root, u) for u in units}
    rejected = Counter()
    for st in statuses.values():
        if st:
            rejected.update(st.get("rejected", {}))
    on_disk = store_bytes(cache.root)
    hint_layers = (a.get("build", {}).get("hints") or {}).get("layers", [])
    hint_names = {schema.hint_array(i) for i in range(len(hint_layers))}
    # keys of a hint array's objects: images/{shard}/{hintNN}/...
    hint_bytes = store_bytes(cache.root, lambda k: k.split("/")[0] == IMAGES and
                             len(k.split("/")) > 2 and k.split("/")[2] in hint_names) if hint_layers else 0
    raw = raw_bytes(cache)
    n_img = sum(st["valid"] for u in units if u.kind == IMAGES for st in [statuses[u.name]] if st)
    n_cap = sum(st["valid"] for u in units if u.kind == CAPTIONS for st in [statuses[u.name]] if st)
    classes = None
    if schema.CAP_LOGITS in cache.capabilities:
        cls, tpl, _ = cache.vocab()
        classes = {"count": len(cls), "source": dict(cache.root[schema.VOCAB].attrs).get("classes_source"),
                   "templates": len(tpl), "first": cls[:10]}
    return {
        "path": path,
        "status": a.get("status"),
        "schema_version": a.get("schema_version"),
        "capabilities": cache.capabilities,
        "teacher": {k: a["teacher"].get(k) for k in ("spec", "pretrained", "checkpoint", "digest", "random_init")},
        "preprocess": a.get("preprocess"),
        "embed_dim": cache.embed_dim,
        "logit_scale": cache.logit_scale,
        "views": cache.views,
        "hints": {"layers": hint_layers, "pool": (a["build"].get("hints") or {}).get("pool"),
                  "bytes_on_disk": hint_bytes} if hint_layers else None,
        "view_policy": (cache.view_policy()[0] or Policy()).spec(),
        "classes": classes,
        "images": {"shards": len([u for u in units if u.kind == IMAGES]), "samples": n_img,
                   "labelled": s.get("labelled_images"), "with_caption": s.get("paired_captions")},
        "captions": {"corpora": len(a["inputs"]["captions"]), "blocks": len([u for u in units if u.kind == CAPTIONS]),
                     "rows": n_cap},
        "units": {"total": len(units), "done": sum(1 for st in statuses.values() if st and st["state"] == "done"),
                  "failed": [n for n, st in statuses.items() if st and st["state"] != "done"],
                  "missing": [n for n, st in statuses.items() if st is None]},
        "content_digests": {"units": sum(1 for st in statuses.values() if st),
                            "without": sum(1 for st in statuses.values() if st and schema.DIGEST_KEY not in st)},
        "rejected": dict(sorted(rejected.items())),
        "duplicate_keys": s.get("duplicate_keys", {"count": 0}),
        "bytes_on_disk": on_disk,
        "bytes_raw": raw,
        "compression_ratio": round(raw / on_disk, 3) if on_disk else None,
        "bytes_per_image_sample": round(on_disk / n_img, 1) if n_img else None,
        "build": a.get("build"),
        "versions": a.get("versions"),
    }


def format_info(d: dict) -> str:
    t = d["teacher"]
    lines = [
        f"cache       {d['path']}",
        f"status      {d['status']}  (schema {d['schema_version']}; capabilities: {', '.join(d['capabilities'])})",
        f"teacher     {t['spec']}" + (f" pretrained={t['pretrained']}" if t.get("pretrained") else "")
        + ("  [RANDOM INIT: outputs are meaningless]" if t.get("random_init") else ""),
        f"            digest {t['digest']}",
        f"preprocess  size={d['preprocess'].get('size')} mean={d['preprocess'].get('mean')} "
        f"std={d['preprocess'].get('std')} {d['preprocess'].get('interpolation')}/{d['preprocess'].get('resize_mode')}",
        f"embed dim   {d['embed_dim']} stored as {(d['build'] or {}).get('embed_dtype')}   logit scale "
        f"{d['logit_scale']:.3f}   views per image {d['views']}",
        f"views       0 = eval transform; 1..{d['views'] - 1} from --augment {d['view_policy']}",
    ]
    if d.get("hints"):
        h = d["hints"]
        layers = ", ".join(f"{x['name']} ({x['dim']})" for x in h["layers"])
        lines.append(f"hints       {layers}, pool {h['pool']}: {h['bytes_on_disk'] / 1e6:.2f} MB on disk")
    if d["classes"]:
        c = d["classes"]
        lines.append(f"classes     {c['count']} from {c['source']} ({c['templates']} templates): "
                     + ", ".join(c["first"]) + (", …" if c["count"] > 10 else ""))
    im, cp, u = d["images"], d["captions"], d["units"]
    dg = d.get("content_digests") or {"units": 0, "without": 0}
    lines += [
        f"images      {im['samples']} samples in {im['shards']} shards ({im['labelled']} labelled, "
        f"{im['with_caption']} with a caption)",
        f"captions    {cp['rows']} rows from {cp['corpora']} corpora ({cp['blocks']} blocks)",
        f"units       {u['done']}/{u['total']} done" + (f"; FAILED {u['failed']}" if u["failed"] else "")
        + (f"; not done {u['missing'][:5]}" if u["missing"] else ""),
        "digests     " + (no_digests_note(dg["without"], dg["units"]) if dg["without"] else
                             f"sha256 of every array of all {dg['units']} written units (checked by verify and reads)"),
        "rejected    " + (", ".join(f"{k}={v}" for k, v in d["rejected"].items()) or "none"),
        f"duplicates  {d['duplicate_keys'].get('count', 0)} keys occur in more than one row (all rows kept)",
        f"size        {d['bytes_on_disk'] / 1e6:.2f} MB on disk, {d['bytes_raw'] / 1e6:.2f} MB raw "
        f"(compression x{d['compression_ratio']}), {d['bytes_per_image_sample']} bytes per image sample",
    ]
    return "\n".join(lines)
