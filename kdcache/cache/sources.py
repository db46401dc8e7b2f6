"""Reading the inputs of `kdcache build`: WebDataset image shards and caption corpora.

Image shards are read as raw bytes (`iter_shard`) and turned into RGB images (`parse_sample`) in two steps, so a
bad sample becomes a `RejectError` with a reason code instead of an exception that kills the shard. Members are
never deserialized (no pickle, no torch.load, no webdataset decoders): a shard is untrusted data.

Truncated shards are the failure that silently loses data, so `iter_shard` checks both ways a tar can be cut:
inside a member (tarfile raises) and at a 512-byte boundary (tarfile ends quietly; we check the end-of-archive
zeros ourselves).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import lzma
import os
import re
import tarfile
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import base_plus_ext

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
CAPTION_KINDS = ("coco", "cc", "txt", "jsonl")
_CAPTION_SUFFIXES = {".json": "coco", ".tsv": "cc", ".txt": "txt", ".jsonl": "jsonl"}

# webdataset's default `skip_meta`: members like `__index__` or `__meta__/x` describe the tar, not a sample.
_META = re.compile(r"__[^/]*__($|/)")
_BLOCK = tarfile.BLOCKSIZE
_END_OF_ARCHIVE = 2 * _BLOCK  # a complete tar ends with at least two zero blocks
_CHUNK = 1 << 20
# What a damaged or unreadable shard can raise while we read it (gzip raises EOFError on a cut stream).
_DATA_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
# Only formats a shard plausibly holds. Others (EPS runs Ghostscript, exotic plugins) are refused as undecodable.
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG also opens MPO (camera) files
_PIL_LIMIT_LOCK = threading.Lock()


class RejectError(Exception):
    """A sample (or caption row) that cannot be used; `reason` is a short snake_case code, `detail` human text."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Reject:
    """One rejected sample or caption record, as recorded in the cache's rejection manifest."""

    position: int  # sample position in shard (images) or record index (captions)
    key: str  # __key__ (images) or "file:line" (captions)
    reason: str
    detail: str


def file_sha256(url: str) -> str:
    """"sha256:<hex>" of every byte of a file (local path or fsspec URL), streamed: the digest a cache records for
    teacher checkpoints and shards (iter_shard computes the same one while it reads a whole shard)."""
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def expand_urls(patterns: Sequence[str]) -> list[str]:
    """Brace-expand shard patterns in the order given. Local paths must exist; fsspec URLs are not checked here
    (that would cost a request per shard); a URL given twice would be cached twice, so it is an error."""
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if "://" not in url and not os.path.exists(url):
                raise FileNotFoundError(f"no such shard: {url}" + (f" (from {pattern})" if url != pattern else ""))
            urls.append(url)
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise ValueError(f"shard given more than once: {url}")
        seen.add(url)
    return urls


# ---------------------------------------------------------------------------------------------------------------
# Image shards: raw samples


@dataclass
class RawSample:
    """The members of one sample as bytes, keyed by lower-cased extension ("jpg", "cls", "seg.png")."""

    key: str
    position: int  # 0-based, order of first appearance of the key in the tar
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None  # None, "incomplete" (being read when the tar was cut) or "split_sample"


@dataclass
class ShardReport:
    """What reading one shard found; complete once `iter_shard` is exhausted."""

    url: str
    samples: int = 0  # RawSamples yielded
    digest: str = ""  # "sha256:<hex>" of every byte of the tar file as read
    truncated: bool = False
    error: str | None = None  # human message when truncated/unreadable


class _HashingReader:
    """The file as read: hashes every byte once, and lets us sniff the compression magic without seeking."""

    def __init__(self, f):
        self._f = f
        self._sha = hashlib.sha256()
        self._pending = b""
        self.nbytes = 0

    def _raw(self, n: int) -> bytes:
        b = self._f.read(n)
        self._sha.update(b)
        self.nbytes += len(b)
        return b

    def peek(self, n: int) -> bytes:
        while len(self._pending) < n:
            b = self._raw(n - len(self._pending))
            if not b:
                break
            self._pending += b
        return self._pending[:n]

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _CHUNK  # callers loop until b""; never slurp a remote file in one call
        if self._pending:
            b, self._pending = self._pending[:n], self._pending[n:]
            return b
        return self._raw(n)

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self._raw(_CHUNK):
            pass

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class _TailReader:
    """The uncompressed tar stream: counts bytes and remembers where the last non-zero byte ended, which is all we
    need to check that only end-of-archive zeros follow the last member.

    A read error (a cut gzip stream, a network failure) is recorded and turned into end-of-file: tarfile buffers
    10 KiB at a time and would drop what it had buffered if the error reached it, losing whole samples.
    """

    def __init__(self, f):
        # read1 on the decompressors: one decompression step per call, so an error cannot discard output that an
        # internal buffer (io.BufferedReader inside GzipFile) had already decompressed.
        self._read = getattr(f, "read1", f.read)
        self.nbytes = 0
        self.nonzero_end = 0
        self.error: str | None = None

    def read(self, n: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            b = self._read(n if n is not None and n >= 0 else _CHUNK)
        except _DATA_ERRORS as e:
            self.error = _describe(e)
            return b""
        if b:
            if b[-1]:
                self.nonzero_end = self.nbytes + len(b)
            else:
                stripped = len(b.rstrip(b"\0"))
                if stripped:
                    self.nonzero_end = self.nbytes + stripped
            self.nbytes += len(b)
        return b

    def readable(self) -> bool:
        return True


def _uncompressed(raw: _HashingReader):
    """tarfile's "r|*" would decompress too, but then the end-of-archive check could not see uncompressed bytes."""
    head = raw.peek(10)
    if head.startswith(b"\x1f\x8b\x08"):
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if re.match(rb"BZh[1-9]1AY&SY", head):
        import bz2

        return bz2.BZ2File(raw)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _describe(e: BaseException) -> str:
    """Exception text for reports. Object reprs ("<_io.BytesIO object at 0x7f...>", as in PIL's messages) are
    dropped: their addresses would make identical builds record different reject details."""
    msg = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e))
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


@dataclass
class _TarState:
    end: int = 0  # uncompressed offset just past the last member's (padded) data
    cut: str | None = None  # why reading stopped early
    cut_name: str | None = None  # the member whose data was being read at the cut, if the header was whole


def _tar_members(tar: tarfile.TarFile, state: _TarState) -> Iterator[tuple[str, bytes]]:
    """Regular, non-meta members as (name, bytes). Stops without raising at a cut and says why in `state`."""
    while True:
        info = None
        try:
            info = tar.next()
            if info is None:
                return
            state.end = info.offset_data + _padded(info.size)
            data = None
            if info.isreg() and not _META.match(info.name):
                data = tar.extractfile(info).read()
        except _DATA_ERRORS as e:
            state.cut = _describe(e)
            state.cut_name = info.name if info is not None and info.isreg() else None
            return
        # Stream mode keeps every TarInfo it has seen; drop them so memory does not grow with the shard.
        tar.members = []
        if data is not None:
            yield info.name, data


def iter_shard(url: str, report: ShardReport) -> Iterator[RawSample]:
    """Yield the samples of one tar shard as raw bytes, in tar order, filling `report` as it goes.

    Data problems never raise: an unreadable or cut shard sets `report.truncated` and `report.error`, and every
    complete sample before the damage is still yielded. The report is final once the iterator is exhausted.
    """
    try:
        f = fsspec.open(url, "rb").open()
    except OSError as e:
        report.truncated, report.error = True, f"cannot open {url}: {_describe(e)}"
        return
    with f:
        # A consumer that stops early leaves `report.digest` empty: the file was not read to the end.
        yield from _shard_samples(_HashingReader(f), report)


def _finish_digest(raw: _HashingReader, report: ShardReport) -> None:
    try:
        raw.drain()
        report.digest = f"sha256:{raw.hexdigest()}"
    except _DATA_ERRORS as e:
        report.truncated = True
        report.error = (report.error + "; " if report.error else "") + f"cannot read to the end: {_describe(e)}"


def _shard_samples(raw: _HashingReader, report: ShardReport) -> Iterator[RawSample]:
    tail = None
    try:
        tail = _TailReader(_uncompressed(raw))
        tar = tarfile.open(fileobj=tail, mode="r|*")
    except _DATA_ERRORS as e:
        why = tail.error if tail is not None and tail.error else _describe(e)
        report.truncated, report.error = True, f"not a readable tar file: {why}"
        _finish_digest(raw, report)
        return

    state = _TarState()
    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    problem: str | None = None
    position = 0

    def emit(p: str | None) -> RawSample:
        nonlocal position
        s = RawSample(key=key, position=position, members=members, problem=p)
        position += 1
        report.samples += 1
        return s

    for name, data in _tar_members(tar, state):
        k, ext = base_plus_ext(name)
        if k is None:
            continue  # no extension: webdataset's grouping skips these too
        ext = ext.lower()
        # A sample is a run of consecutive members with one key; a repeated extension also starts a new run.
        if k != key or ext in members:
            if key is not None:
                yield emit(problem)
            key, members = k, {}
            problem = "split_sample" if k in seen else None
            seen.add(k)
        members[ext] = data

    if state.cut is not None:
        report.truncated = True
        cut_key = base_plus_ext(state.cut_name)[0] if state.cut_name else None
        report.error = (f"truncated shard: {tail.error or state.cut}"
                        + (f" (while reading {state.cut_name})" if cut_key else ""))
        if cut_key is not None and cut_key != key:
            # The cut member starts a new sample, so the one before it is whole; record the cut one as incomplete.
            if key is not None:
                yield emit(problem)
            key, members = cut_key, {}
            problem = "split_sample" if cut_key in seen else None
        if key is not None:
            yield emit(problem or "incomplete")
        _finish_digest(raw, report)
        return

    if key is not None:
        yield emit(problem)
    while tail.read(_CHUNK):
        pass
    after = tail.nbytes - state.end
    if tail.error is not None:
        report.truncated, report.error = True, f"truncated shard: {tail.error} after the last member"
    elif tail.nonzero_end > state.end:
        report.truncated = True
        report.error = (f"corrupt shard: non-zero bytes after the last member (byte {state.end}); "
                        "a damaged header ends tarfile's iteration without an error")
    elif after < _END_OF_ARCHIVE:
        report.truncated = True
        report.error = (f"truncated shard: only {after} bytes after the last member's data where a complete tar "
                        f"has at least {_END_OF_ARCHIVE} zero bytes (file cut at a block boundary?)")
    _finish_digest(raw, report)


# ---------------------------------------------------------------------------------------------------------------
# Image shards: decoded samples


@dataclass
class Sample:
    """A usable image sample: the picture as fully loaded RGB plus its optional caption and label."""

    key: str
    position: int
    image: Image.Image  # mode "RGB", fully loaded
    caption: str | None
    label: int | None


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Min-max to 0..255; a constant image keeps its value (clipped), it has no range to stretch."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if hi == lo:
        return np.full(a.shape, min(max(round(lo), 0), 255), np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _grey_to_rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a, "L").convert("RGB")


def to_rgb(im: Image.Image, *, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode to 8-bit RGB without the saturation `convert("RGB")` gives high-bit-depth images, and with
    transparency composited onto `background` (PIL would otherwise expose whatever colour hides under alpha 0)."""
    mode = im.mode
    if mode.startswith("I;16"):
        a = np.asarray(im).astype(np.uint32)
        return _grey_to_rgb(((a + 128) // 257).astype(np.uint8))  # round(x / 257): 0..65535 onto 0..255
    if mode == "I":
        a = np.asarray(im)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 255:
            return _grey_to_rgb(a.astype(np.uint8))
        if lo >= 0 and hi <= 65535:
            return _grey_to_rgb(((a.astype(np.int64) + 128) // 257).astype(np.uint8))
        return _grey_to_rgb(_to_uint8(a))
    if mode == "F":
        a = np.asarray(im)
        if a.size and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1:
            return _grey_to_rgb(np.rint(a.astype(np.float64) * 255).astype(np.uint8))
        return _grey_to_rgb(_to_uint8(a))
    if mode in ("RGBa", "La"):
        # Premultiplied: colour already carries alpha, so "over" is colour + background * (1 - alpha).
        a = np.asarray(im).astype(np.float64)
        colour, alpha = a[..., :-1], a[..., -1:] / 255.0
        if colour.shape[-1] == 1:
            colour = np.repeat(colour, 3, axis=-1)
        out = colour + np.asarray(background, np.float64) * (1.0 - alpha)
        return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")
    if mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode image bytes to a fully loaded RGB image. Raises RejectError: too_large (checked from the header,
    before any pixel is decoded) or undecodable (PIL's message as detail)."""
    if not data:
        raise RejectError("empty_image", "0 bytes")
    # PIL's own bomb check uses the global MAX_IMAGE_PIXELS; raise it when our limit is higher so ours applies.
    # The global is shared, hence the lock, taken only on that rare path. (catch_warnings is process-global too
    # before Python 3.14; decoding is meant for DataLoader worker processes, not threads.)
    bump = Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS
    lock = _PIL_LIMIT_LOCK if bump else contextlib.nullcontext()
    with lock, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        if bump:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            im = Image.open(io.BytesIO(data), formats=_FORMATS)
            w, h = im.size
            if w * h > max_pixels:
                raise RejectError("too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
            im.load()
        except RejectError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise RejectError("too_large", str(e)) from None
        # Untrusted bytes reach many PIL plugins, each with its own exception types; all mean "cannot decode".
        except Exception as e:
            raise RejectError("undecodable", _describe(e)) from None
        finally:
            if bump:
                Image.MAX_IMAGE_PIXELS = old
    try:
        return to_rgb(im, background=background)
    except (ValueError, OSError) as e:  # a mode PIL cannot convert
        raise RejectError("undecodable", f"cannot convert mode {im.mode} to RGB: {_describe(e)}") from None


def _text(data: bytes, ext: str) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise RejectError("bad_text" if ext == "txt" else "bad_json", f".{ext} is not UTF-8: {e}") from None


def parse_sample(raw: RawSample, *, max_pixels: int, background: tuple[int, int, int] = (255, 255, 255)) -> Sample:
    """Turn a raw sample into an RGB image, caption and label, or raise RejectError with the reason.

    Metadata is checked before the image is decoded: it is cheaper, and a sample is rejected either way.
    """
    m = raw.members
    if raw.problem == "split_sample":
        raise RejectError("split_sample", f"key {raw.key!r} reappears after other keys; its members are not adjacent")
    ext = next((e for e in IMAGE_EXTS if e in m), None)
    if ext is None:
        if raw.problem == "incomplete":
            raise RejectError("incomplete_sample", "the shard was cut before this sample's image was read")
        raise RejectError("no_image", f"members: {', '.join(sorted(m)) or 'none'}; want one of {', '.join(IMAGE_EXTS)}")
    if not m[ext]:
        raise RejectError("empty_image", f".{ext} has 0 bytes")

    label = None
    if "cls" in m:
        try:
            label = int(m["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise RejectError("bad_label", f".cls is not an integer: {m['cls'][:40]!r}") from None
        if label < 0:  # the cache stores -1 for "no label"; a negative class index is not a class
            raise RejectError("bad_label", f".cls is negative: {label}")

    meta = None
    if "json" in m:
        try:
            meta = json.loads(_text(m["json"], "json"))
        except json.JSONDecodeError as e:
            raise RejectError("bad_json", f".json: {e}") from None
        if not isinstance(meta, dict):
            raise RejectError("bad_json", f".json is a {type(meta).__name__}, not an object")

    caption = None
    if "txt" in m:
        caption = _text(m["txt"], "txt").strip() or None
    if caption is None and meta is not None and isinstance(meta.get("caption"), str):
        caption = meta["caption"].strip() or None

    image = decode_image(m[ext], max_pixels=max_pixels, background=background)
    return Sample(key=raw.key, position=raw.position, image=image, caption=caption, label=label)


# ---------------------------------------------------------------------------------------------------------------
# Caption corpora


@dataclass(frozen=True)
class CaptionRow:
    """One usable caption record."""

    index: int  # 0-based record index in the corpus (line index for line formats, annotation index for coco)
    text: str
    ref: str  # source reference: coco image_id as str, cc url, "" otherwise


def _exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def parse_caption_spec(spec: str) -> tuple[str, str]:
    """`kind:path` -> (kind, path); without a known prefix the kind comes from the file suffix."""
    head, sep, rest = spec.partition(":")
    if sep and head in CAPTION_KINDS:
        kind, path = head, rest
    else:
        path = spec
        suffix = os.path.splitext(spec)[1].lower()
        if suffix not in _CAPTION_SUFFIXES:
            raise ValueError(f"cannot tell the format of caption corpus {spec!r}: prefix it with one of "
                             + ", ".join(f"{k}:" for k in CAPTION_KINDS)
                             + " (inferred only from " + ", ".join(_CAPTION_SUFFIXES) + ")")
        kind = _CAPTION_SUFFIXES[suffix]
    if not path:
        raise ValueError(f"caption spec {spec!r} has no path")
    if not _exists(path):
        raise FileNotFoundError(f"caption corpus not found: {path}")
    return kind, path


def _check_kind(kind: str) -> None:
    if kind not in CAPTION_KINDS:
        raise ValueError(f"unknown caption corpus kind {kind!r}; valid: {', '.join(CAPTION_KINDS)}")


def _file_id(path: str) -> tuple:
    fs, p = fsspec.core.url_to_fs(path)
    info = fs.info(p)
    return (info.get("mtime") or info.get("LastModified") or info.get("created"), info.get("size"))


@functools.lru_cache(maxsize=2)
def _coco_annotations(path: str, file_id: tuple) -> tuple:
    """(caption, image_id) per annotation; `file_id` (mtime, size) is in the key so an edited file is re-read."""
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise ValueError(f"{path}:1: no 'annotations' list; is this a COCO captions file?")
    return tuple((a.get("caption"), a.get("image_id")) if isinstance(a, dict) else (None, None)
                 for a in doc["annotations"])


def count_caption_records(kind: str, path: str) -> int:
    """Records in a corpus: lines for the line formats (blank lines included, so indices match line numbers - 1),
    annotations for coco."""
    _check_kind(kind)
    if kind == "coco":
        return len(_coco_annotations(path, _file_id(path)))
    n, last = 0, b"\n"
    with fsspec.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")  # a last line without a newline is still a record


def _line_record(kind: str, index: int, line: bytes, where: str) -> CaptionRow | Reject:
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return Reject(index, where, "parse_error", f"not UTF-8: {e}")
    if index == 0:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return Reject(index, where, "empty_caption", "blank line")
    ref = ""
    if kind == "cc":
        if "\t" not in text:
            return Reject(index, where, "parse_error", "no TAB between caption and url")
        caption, url = text.split("\t")[:2]
        # CC3M puts the caption first, CC12M the url; a url in the caption column is the one mistake to fix here.
        if caption.startswith(("http://", "https://")) and not url.startswith(("http://", "https://")):
            caption, url = url, caption
        text, ref = caption, url.strip()
    elif kind == "jsonl":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return Reject(index, where, "parse_error", f"not valid JSON: {e}")
        value = obj.get("caption", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            return Reject(index, where, "parse_error", 'want a JSON object with a "caption" or "text" string')
        text = value
    text = text.strip()
    if not text:
        return Reject(index, where, "empty_caption", "empty caption")
    return CaptionRow(index=index, text=text, ref=ref)


def iter_caption_records(kind: str, path: str, *, start: int, stop: int) -> Iterator[CaptionRow | Reject]:
    """Records [start, stop) of a corpus, each a CaptionRow or a Reject (reason empty_caption or parse_error).

    Line formats stream: memory does not depend on the file size. A whole COCO file that is not COCO raises
    ValueError naming file:line.
    """
    _check_kind(kind)
    if not 0 <= start <= stop:
        raise ValueError(f"bad record range [{start}, {stop})")
    if kind == "coco":
        anns = _coco_annotations(path, _file_id(path))
        for i in range(start, min(stop, len(anns))):
            caption, image_id = anns[i]
            where = f"{path}:annotations[{i}]"
            if not isinstance(caption, str):
                yield Reject(i, where, "parse_error", 'annotation has no "caption" string')
            elif not caption.strip():
                yield Reject(i, where, "empty_caption", "empty caption")
            else:
                yield CaptionRow(index=i, text=caption.strip(), ref="" if image_id is None else str(image_id))
        return
    # Binary lines, decoded one by one: a bad byte rejects its line instead of stopping the corpus, and only "\n"
    # ends a record (text mode would also split at a lone "\r" and shift every later index).
    with fsspec.open(path, "rb") as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if i >= stop:
                break
            yield _line_record(kind, i, line, f"{path}:{i + 1}")
