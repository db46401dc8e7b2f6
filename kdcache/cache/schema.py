"""The cache layout: every zarr path, array, dtype, chunking rule and codec lives here and nowhere else.

A cache is one zarr v3 group::

    CACHE/
      zarr.json                          root attributes under "kdcache" (see ROOT_KEYS)
      vocab/{classes,templates,head}     class vocabulary and the teacher's zero-shot head [C, D] (when --classes)
      images/{shard:05d}/...             one group per image tar shard; row r = sample at position r of that shard
      captions/{corpus:03d}/{block:06d}/ one group per block of BLOCK_RECORDS records of a corpus
      status/{unit}                      one empty group per unit; its attributes say done; written after its data

Each unit (image shard or caption block) owns its own arrays, so two writers never touch the same chunk, and a row's
address is (unit, position) — a function of the input alone, never of arrival order or worker count.

Versioning: readers must match SCHEMA_MAJOR. Optional arrays are announced in the root's "capabilities" list and
bump SCHEMA_MINOR when new ones are added; readers check capabilities, not the minor version.
1.0: the first layout. 1.1: `int8_embeddings` (embeddings stored as int8; see encode_embeddings). 1.2: `tokens`.
1.3: `strong_views` (view records beyond crop box and flip: RandAugment ops, erasing, mixing; see kdcache.augment;
the policy is build["augment"]); `hints` (pooled teacher features of chosen modules per view, build["hints"]).
1.4: each unit's status (and the vocab group's attributes) records DIGEST_KEY, a sha256 of every array as written
(array_digest), so a chunk copied from another unit or edited in place is caught by `verify` and by every read. Not a
capability: it is per unit (a 1.3 cache resumed by this kdcache has units with and without), and readers check the
units that have one; `info` and `verify` say when units have none.

Embeddings (EMBEDDING_ARRAYS) are stored as fp16 (default), fp32, or int8. int8 is quantised per vector:
q = round(x / max|x| * 127), so each vector's largest component is exactly ±127. No scale is stored: every stored
embedding is L2-normalised, so the scale is implied by the vector itself and decoding is q / ||q|| (the direction
is that of x·127/max|x|, the norm exactly 1). An unwritten row holds INT8_UNWRITTEN (-128, outside the quantiser's
range) and decodes to NaN, so "NaN means unwritten" holds after decoding. Read embeddings through
decode_embeddings (the reader does so unless asked for raw values).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 4
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"

ROOT_ATTR = "kdcache"
# Keys of the root attribute dict. "run" (host, timings) is the only one that may differ between identical caches.
ROOT_KEYS = ("schema_version", "capabilities", "required_capabilities", "status", "teacher", "preprocess", "embed_dim",
             "logit_scale", "build", "inputs", "versions", "summary", "run")
NONDETERMINISTIC_KEYS = ("run",)
STATUS_NONDETERMINISTIC_KEYS = ("timing",)

# Capabilities: what optional content a cache has. Readers check these before use.
CAP_IMAGES = "images"            # images/ units with per-view embeddings and view records
CAP_CAPTIONS = "captions"        # captions/ units (caption corpora)
CAP_LOGITS = "logits"            # vocab/ head + per-view topk/lse
CAP_LABELS = "labels"            # at least one image row has a label
CAP_PAIRED = "paired_captions"   # at least one image row has a caption and its teacher text embedding
CAP_INT8 = "int8_embeddings"     # 1.1: EMBEDDING_ARRAYS hold int8 codes; read them through decode_embeddings
CAP_TOKENS = "tokens"            # 1.2: the teacher tokenizer's caption tokens (kdcache.tokens; build["tokens"])
CAP_STRONG_VIEWS = "strong_views"  # 1.3: per-view op/erase/mix records (kdcache.augment; build["augment"])
CAP_HINTS = "hints"              # 1.3: per-view pooled teacher features (kdcache.hints; build["hints"])
KNOWN_CAPABILITIES = (CAP_IMAGES, CAP_CAPTIONS, CAP_LOGITS, CAP_LABELS, CAP_PAIRED, CAP_INT8, CAP_TOKENS,
                      CAP_STRONG_VIEWS, CAP_HINTS)
# Capabilities that change how existing arrays must be read: a cache lists the ones it uses in the root's
# "required_capabilities", and a reader refuses a cache that requires one it does not know (instead of, say, reading
# int8 codes as numbers). Purely additive capabilities (new optional arrays) are never required.
# A reader that ignored strong-view records would replay views without their ops or mixing: wrong pixels, silently.
MUST_UNDERSTAND = (CAP_INT8, CAP_STRONG_VIEWS)

# A unit status's (and the vocab group's) {array name: array_digest of what was written} (schema 1.4).
DIGEST_KEY = "content_digests"

STATUS_DONE = "done"
STATUS_FAILED = "failed"
CACHE_BUILDING = "building"
CACHE_COMPLETE = "complete"
CACHE_INCOMPLETE = "incomplete"

# Caption corpora are processed in fixed blocks of records: the unit of status and resume.
BLOCK_RECORDS = 8192
# Target compressed-chunk size for the big arrays; small per-row arrays get one chunk per unit.
CHUNK_BYTES = 1 << 20
EMBED_DTYPES = {"fp16": "float16", "fp32": "float32", "int8": "int8"}
NAN = float("nan")
INT8_MAX = 127          # int8 codes are in [-127, 127], symmetric, so -x is representable whenever x is
INT8_UNWRITTEN = -128   # the one code the quantiser never writes: the row is unwritten (decodes to NaN)

VOCAB = "vocab"
IMAGES = "images"
CAPTIONS = "captions"
STATUS = "status"


def compressors() -> tuple[ZstdCodec, ...]:
    """Lossless and checksummed, so a flipped byte on disk fails loudly when read."""
    return (ZstdCodec(level=3, checksum=True),)


@dataclass(frozen=True)
class Unit:
    """An image shard or a block of a caption corpus: the unit of work, of status and of resume."""

    kind: str                # IMAGES or CAPTIONS
    index: int               # shard index, or corpus index
    source: str              # shard URL or "kind:path" of the corpus
    block: int = 0           # caption block number
    start: int = 0           # first record (captions)
    stop: int = 0            # one past the last record (captions)

    @property
    def name(self) -> str:
        if self.kind == IMAGES:
            return f"images-{self.index:05d}"
        return f"captions-{self.index:03d}-{self.block:06d}"

    @property
    def data_path(self) -> str:
        if self.kind == IMAGES:
            return f"{IMAGES}/{self.index:05d}"
        return f"{CAPTIONS}/{self.index:03d}/{self.block:06d}"

    @property
    def status_path(self) -> str:
        return f"{STATUS}/{self.name}"


def caption_units(corpus: int, source: str, records: int) -> list[Unit]:
    """Blocks of BLOCK_RECORDS records; a corpus with no records still has one (empty) block so it is accounted for."""
    starts = range(0, max(records, 1), BLOCK_RECORDS)
    return [Unit(CAPTIONS, corpus, source, block=b, start=s, stop=min(s + BLOCK_RECORDS, records))
            for b, s in enumerate(starts)]


@dataclass(frozen=True)
class ArraySpec:
    """One array of a unit: per-row shape after the row axis, dtype, fill value, and whether it is small."""

    name: str
    dtype: Any
    inner: tuple[int, ...]
    fill: Any
    small: bool  # small per-row arrays get one chunk for the whole unit


def _embedding_spec(name: str, inner: tuple[int, ...], embed_dtype: str) -> ArraySpec:
    """An embedding array in the storage dtype; the fill value marks unwritten rows (NaN, or INT8_UNWRITTEN)."""
    if embed_dtype not in EMBED_DTYPES:
        raise ValueError(f"unknown embed dtype {embed_dtype!r}; valid: {', '.join(EMBED_DTYPES)}")
    dtype = EMBED_DTYPES[embed_dtype]
    return ArraySpec(name, dtype, inner, INT8_UNWRITTEN if dtype == "int8" else NAN, False)


def _token_specs(name: str, tokens: dict | None) -> list[ArraySpec]:
    """The caption-token array when the build stores tokens (`tokens` is build["tokens"]); 0 = padding/none."""
    return [] if not tokens else [ArraySpec(name, tokens["dtype"], (tokens["context_length"],), 0, False)]


def _record_specs(views: int, policy) -> list[ArraySpec]:
    """The view-record arrays a strong-view policy needs beyond view_box and view_flip (kdcache.augment owns their
    names, dtypes and per-view shapes); none for the default policy."""
    if policy is None:
        return []
    from kdcache.augment import record_arrays

    return [ArraySpec(name, np.dtype(dt).name, (views, *shape), 0, True)
            for name, (dt, shape) in record_arrays(policy).items() if name not in ("view_box", "view_flip")]


def hint_array(i: int) -> str:
    """The array of the i-th cached hint (build["hints"]["layers"][i])."""
    return f"hint{i:02d}"


def image_arrays(*, views: int, dim: int, topk: int, embed_dtype: str, tokens: dict | None = None,
                 policy=None, hints: dict | None = None) -> dict[str, ArraySpec]:
    """Arrays of an image shard unit. Rows are sample positions in the shard; rejected rows have valid=False.
    `policy` is a non-default kdcache.augment.Policy (its record arrays follow view_flip); `hints` is build["hints"]
    (one float16 array of pooled features per hinted module and view, NaN where unwritten)."""
    specs = _token_specs("caption_tokens", tokens) + [
        ArraySpec("key", str, (), "", True),
        ArraySpec("valid", "bool", (), False, True),
        ArraySpec("label", "int32", (), -1, True),
        ArraySpec("caption", str, (), "", True),
        _embedding_spec("caption_emb", (dim,), embed_dtype),
        ArraySpec("src_size", "int32", (2,), 0, True),            # (width, height) of the decoded source image
        ArraySpec("view_box", "int32", (views, 4), 0, True),      # (left, top, width, height) in source pixels
        ArraySpec("view_flip", "bool", (views,), False, True),
        *_record_specs(views, policy),
        _embedding_spec("emb", (views, dim), embed_dtype),         # L2-normalised teacher image embedding per view
    ]
    if topk:
        specs += [
            ArraySpec("topk_idx", "int32", (views, topk), -1, True),
            ArraySpec("topk_val", "float32", (views, topk), NAN, True),  # logits at T=1 (logit scale applied)
            ArraySpec("lse", "float32", (views,), NAN, True),            # log-sum-exp of the full logits at T=1
        ]
    for i, layer in enumerate((hints or {}).get("layers", [])):
        specs.append(ArraySpec(hint_array(i), "float16", (views, int(layer["dim"])), NAN, False))
    return {s.name: s for s in specs}


def caption_arrays(*, dim: int, embed_dtype: str, tokens: dict | None = None) -> dict[str, ArraySpec]:
    """Arrays of a caption block unit. Row r = record start + r; rejected rows have valid=False."""
    specs = _token_specs("tokens", tokens) + [
        ArraySpec("index", "int64", (), -1, True),   # record index in the corpus (line index or annotation index)
        ArraySpec("valid", "bool", (), False, True),
        ArraySpec("text", str, (), "", True),
        ArraySpec("ref", str, (), "", True),         # COCO image_id, CC url, or ""
        _embedding_spec("emb", (dim,), embed_dtype),
    ]
    return {s.name: s for s in specs}


# Arrays whose rows, as decode_embeddings returns them, must be finite and unit-norm where valid (NaN where not
# written). Their stored dtype is the build's --embed-dtype.
EMBEDDING_ARRAYS = ("emb", "caption_emb")


def embed_capabilities(embed_dtype: str) -> list[str]:
    """Capabilities a cache has because of how its embeddings are stored."""
    return [CAP_INT8] if EMBED_DTYPES[embed_dtype] == "int8" else []


def encode_embeddings(x: np.ndarray, embed_dtype: str) -> np.ndarray:
    """L2-normalised float embeddings [..., D] -> their stored form: a cast for fp16/fp32; for int8 the per-vector
    quantisation q = round(x / max|x| * 127). A vector that is not finite (or is zero) is stored as unwritten, so it
    reads back as NaN and `verify` reports it rather than it passing as a plausible vector."""
    dtype = EMBED_DTYPES[embed_dtype]
    x = np.asarray(x, dtype=np.float32)
    if dtype != "int8":
        return x.astype(dtype)
    scale = np.abs(x).max(axis=-1, keepdims=True)
    ok = np.isfinite(x).all(axis=-1, keepdims=True) & (scale > 0)
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(x / np.where(ok, scale, 1) * INT8_MAX), -INT8_MAX, INT8_MAX)
    return np.where(ok, q, INT8_UNWRITTEN).astype(np.int8)


def decode_embeddings(values: np.ndarray) -> np.ndarray:
    """Stored embeddings [..., D] -> float32. int8 codes are renormalised to unit length (the per-vector scale is
    implied by the unit norm); a row holding INT8_UNWRITTEN anywhere (unwritten, or corrupt) decodes to NaN."""
    if values.dtype != np.int8:
        return values.astype(np.float32)
    q = values.astype(np.float32)
    norm = np.sqrt(np.square(q).sum(axis=-1, keepdims=True))
    unwritten = (values == INT8_UNWRITTEN).any(axis=-1, keepdims=True) | (norm == 0)
    return np.where(unwritten, np.float32(NAN), q / np.where(unwritten, 1, norm)).astype(np.float32)


def chunk_rows(spec: ArraySpec, rows: int) -> int:
    """Rows per chunk: the whole unit for small arrays, ~CHUNK_BYTES of raw data for big ones."""
    if spec.small or rows == 0:
        return max(rows, 1)
    row_bytes = int(np.prod(spec.inner, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
    return int(max(1, min(rows, CHUNK_BYTES // max(row_bytes, 1))))


def empty_unit_data(specs: dict[str, ArraySpec], rows: int) -> dict[str, np.ndarray]:
    """Host buffers for one unit, filled with each array's fill value."""
    out = {}
    for s in specs.values():
        if s.dtype is str:
            out[s.name] = np.full((rows, *s.inner), s.fill, dtype=object)
        else:
            out[s.name] = np.full((rows, *s.inner), s.fill, dtype=s.dtype)
    return out


def write_unit(root: zarr.Group, unit: Unit, specs: dict[str, ArraySpec],
               data: dict[str, np.ndarray]) -> dict[str, str]:
    """Create a unit's arrays and write each whole (so only whole chunks are written), replacing any earlier attempt.
    Returns {array: array_digest} of exactly what was written, for the unit's status."""
    if set(data) != set(specs):
        raise ValueError(f"unit {unit.name}: arrays {sorted(data)} do not match the schema {sorted(specs)}")
    rows = {len(v) for v in data.values()}
    if len(rows) != 1:
        raise ValueError(f"unit {unit.name}: arrays have different row counts {rows}")
    (n,) = rows
    group = root.create_group(unit.data_path, overwrite=True)
    digests = {}
    for name, spec in specs.items():
        values = data[name]
        shape = (n, *spec.inner)
        if values.shape != shape:
            raise ValueError(f"unit {unit.name}: array {name} has shape {values.shape}, schema wants {shape}")
        digests[name] = _write_whole(group, name, values, dtype=spec.dtype, chunks=(chunk_rows(spec, n), *spec.inner),
                                     fill=spec.fill)
    return digests


def stored_values(values: np.ndarray, dtype) -> np.ndarray:
    """`values` as the array will hold them: cast to its dtype (numbers), or to numpy's variable-length strings
    (`str` arrays; unlike a fixed-width `astype(str)`, which drops trailing NUL characters, they keep every one)."""
    if dtype is str:
        return np.asarray(values, dtype=np.dtypes.StringDType())
    return np.asarray(values, dtype=dtype)


def array_digest(values: np.ndarray) -> str:
    """A sha256 of an array's content as a reader gets it back: its dtype and shape, then its elements in C order
    (little-endian); strings (any numpy string dtype) as their UTF-8 lengths, then their UTF-8 bytes."""
    h = hashlib.sha256()
    if values.dtype.kind in "OTU":
        texts = [t.encode("utf-8", "surrogatepass") for t in values.ravel().tolist()]
        h.update(f"str{values.shape}".encode())
        h.update(np.array([len(t) for t in texts], dtype="<i8").tobytes())
        h.update(b"".join(texts))
    else:
        v = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
        h.update(f"{v.dtype.str}{v.shape}".encode())
        h.update(v.reshape(-1).view(np.uint8))
    return "sha256:" + h.hexdigest()


def _write_whole(group: zarr.Group, name: str, values: np.ndarray, *, dtype, chunks, fill) -> str:
    """Write one array whole; returns the array_digest of what was written."""
    # write_empty_chunks: every chunk exists on disk even when it equals the fill value, so a missing chunk is always
    # an error (`verify` and the reader require every expected chunk; zarr would read it back as fill values).
    stored = stored_values(values, dtype)
    arr = group.create_array(name, shape=values.shape, dtype=dtype, chunks=chunks, fill_value=fill,
                             compressors=compressors(), overwrite=True, config={"write_empty_chunks": True})
    if values.size:
        arr[...] = stored
    return array_digest(stored)


def write_vocab(root: zarr.Group, *, classes: list[str], templates: list[str], head: np.ndarray,
                attributes: dict) -> None:
    """The class vocabulary, templates and the teacher's zero-shot head [C, D] (template-averaged, normalised); the
    group's attributes record the arrays' digests once they are written."""
    g = root.create_group(VOCAB, overwrite=True, attributes=attributes)
    digests = {}
    for name, values in (("classes", classes), ("templates", templates)):
        digests[name] = _write_whole(g, name, np.asarray(values, dtype=object), dtype=str,
                                     chunks=(max(1, len(values)),), fill="")
    digests["head"] = _write_whole(g, "head", np.asarray(head, np.float32), dtype="float32", chunks=head.shape,
                                   fill=NAN)
    g.update_attributes({DIGEST_KEY: digests})


def list_keys(root: zarr.Group) -> list[str]:
    """Every key in the store (zarr's own listing, so it works for any store)."""
    async def collect():
        return [k async for k in root.store.list()]
    return sync(collect())


# zarr's LocalStore writes each file as `<name>.<32 hex>.partial` and renames it into place; a process killed in between
# leaves the temporary behind, and zarr's listing of the group's members then fails on it.
_INTERRUPTED_WRITE = re.compile(r"(^|/)[^/]*\.[0-9a-f]{32}\.partial$")


def interrupted_writes(root: zarr.Group) -> list[str]:
    """Temporary files a killed writer left in the store."""
    return [k for k in list_keys(root) if _INTERRUPTED_WRITE.search(k)]


def remove_interrupted_writes(root: zarr.Group) -> list[str]:
    """Delete them; only while no writer runs (the build does it when it resumes, before any unit is written)."""
    keys = interrupted_writes(root)
    for k in keys:
        sync(root.store.delete(k))
    return keys


def write_status(root: zarr.Group, unit: Unit, status: dict) -> None:
    """The single answer to 'is this unit done?': written last, after the unit's data."""
    root.create_group(unit.status_path, overwrite=True, attributes=status)


def read_status(root: zarr.Group, unit: Unit) -> dict | None:
    """The unit's status, or None if absent or unreadable (a status cut by a kill counts as not written)."""
    try:
        node = root[unit.status_path]
    except (KeyError, FileNotFoundError, ValueError):
        return None
    except Exception:  # a half-written zarr.json from a killed process: treat as not done
        return None
    attrs = dict(node.attrs)
    return attrs if attrs.get("unit") == unit.name else None
