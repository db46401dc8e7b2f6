"""Reading WebDataset image shards as raw bytes, for the build, training and evaluation alike.

`iter_shard` yields each sample's members as bytes (`RawSample`); members are never deserialized (no pickle, no
torch.load, no webdataset decoders): a shard is untrusted data. Truncated shards are the failure that silently loses
data, so `iter_shard` checks both ways a tar can be cut: inside a member (tarfile raises) and at a 512-byte boundary
(tarfile ends quietly; we check the end-of-archive zeros ourselves).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

# webdataset's default `skip_meta`: members like `__index__` or `__meta__/x` describe the tar, not a sample.
_META = re.compile(r"__[^/]*__($|/)")
_BLOCK = tarfile.BLOCKSIZE
_END_OF_ARCHIVE = 2 * _BLOCK  # a complete tar ends with at least two zero blocks
_CHUNK = 1 << 20
# What a damaged or unreadable shard can raise while we read it (gzip raises EOFError on a cut stream).
_DATA_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


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
    # Members that are not regular files (links, devices, FIFOs), by extension: what each is, e.g. "a hard link to
    # x.jpg". They hold no bytes a stream can read; `parse_sample` rejects a sample that would need one.
    unreadable: dict[str, str] = field(default_factory=dict)
    bad_key: bool = False  # the key's bytes are not UTF-8 (or hold NUL): `key` shows them escaped, e.g. "a\\xff"


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
            self.error = describe_error(e)
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


def describe_error(e: BaseException) -> str:
    """Exception text for reports. Object reprs ("<_io.BytesIO object at 0x7f...>", as in PIL's messages) are
    dropped: their addresses would make identical builds record different reject details."""
    msg = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e))
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


_UNSAFE = re.compile("[\x00\ud800-\udfff]")


def clean_name(name: str) -> tuple[str, bool]:
    """A tar member name as text that can be stored: tarfile decodes non-UTF-8 bytes as lone surrogates
    (surrogateescape), which no UTF-8 writer accepts. Returns (name with such bytes, and NUL, escaped as "\\xff",
    whether anything was escaped); the mapping is deterministic, so the build and the student's loader agree."""
    if not _UNSAFE.search(name):
        return name, False

    def esc(m: re.Match) -> str:
        c = ord(m.group())
        if 0xDC80 <= c <= 0xDCFF:  # the byte surrogateescape stood in for
            return f"\\x{c - 0xDC00:02x}"
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    return _UNSAFE.sub(esc, name), True


def _member_kind(info: tarfile.TarInfo) -> str | None:
    """None for a regular file; otherwise what the member is, for a reject's detail."""
    if info.isreg():
        return None
    if info.islnk():
        return f"a hard link to {clean_name(info.linkname)[0]!r}"
    if info.issym():
        return f"a symbolic link to {clean_name(info.linkname)[0]!r}"
    if info.ischr():
        return "a character device"
    if info.isblk():
        return "a block device"
    if info.isfifo():
        return "a FIFO"
    return f"a tar member of type {info.type!r}"


@dataclass
class _TarState:
    end: int = 0  # uncompressed offset just past the last member's (padded) data
    cut: str | None = None  # why reading stopped early
    cut_name: str | None = None  # the member whose data was being read at the cut, if the header was whole


def _tar_members(tar: tarfile.TarFile, state: _TarState) -> Iterator[tuple[str, bytes | None, str | None]]:
    """Non-meta members except directories, as (name, bytes, None) for regular files and (name, None, what it is)
    for the others (links, devices, FIFOs: a sample's key must not vanish because its member is one). Stops without
    raising at a cut and says why in `state`."""
    while True:
        info = None
        try:
            info = tar.next()
            if info is None:
                return
            state.end = info.offset_data + _padded(info.size)
            data, kind = None, _member_kind(info)
            keep = not info.isdir() and not _META.match(info.name)
            if keep and kind is None:
                data = tar.extractfile(info).read()
        except _DATA_ERRORS as e:
            state.cut = describe_error(e)
            state.cut_name = info.name if info is not None and info.isreg() else None
            return
        # Stream mode keeps every TarInfo it has seen; drop them so memory does not grow with the shard.
        tar.members = []
        if keep:
            yield info.name, data, kind


def iter_shard(url: str, report: ShardReport) -> Iterator[RawSample]:
    """Yield the samples of one tar shard as raw bytes, in tar order, filling `report` as it goes.

    Data problems never raise: an unreadable or cut shard sets `report.truncated` and `report.error`, and every
    complete sample before the damage is still yielded. The report is final once the iterator is exhausted.
    """
    try:
        f = fsspec.open(url, "rb").open()
    except OSError as e:
        report.truncated, report.error = True, f"cannot open {url}: {describe_error(e)}"
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
        report.error = (report.error + "; " if report.error else "") + f"cannot read to the end: {describe_error(e)}"


def _shard_samples(raw: _HashingReader, report: ShardReport) -> Iterator[RawSample]:
    tail = None
    try:
        tail = _TailReader(_uncompressed(raw))
        tar = tarfile.open(fileobj=tail, mode="r|*")
    except _DATA_ERRORS as e:
        why = tail.error if tail is not None and tail.error else describe_error(e)
        report.truncated, report.error = True, f"not a readable tar file: {why}"
        _finish_digest(raw, report)
        return

    state = _TarState()
    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    unreadable: dict[str, str] = {}
    problem: str | None = None
    position = 0

    def emit(p: str | None) -> RawSample:
        nonlocal position
        clean, bad = clean_name(key)
        s = RawSample(key=clean, position=position, members=members, problem=p, unreadable=unreadable, bad_key=bad)
        position += 1
        report.samples += 1
        return s

    for name, data, kind in _tar_members(tar, state):
        k, ext = base_plus_ext(name)
        if k is None:
            continue  # no extension: webdataset's grouping skips these too
        ext = clean_name(ext.lower())[0]
        # A sample is a run of consecutive members with one key; a repeated extension also starts a new run.
        if k != key or ext in members or ext in unreadable:
            if key is not None:
                yield emit(problem)
            key, members, unreadable = k, {}, {}
            problem = "split_sample" if k in seen else None
            seen.add(k)
        if kind is None:
            members[ext] = data
        else:
            unreadable[ext] = kind

    if state.cut is not None:
        report.truncated = True
        cut_key = base_plus_ext(state.cut_name)[0] if state.cut_name else None
        report.error = (f"truncated shard: {tail.error or state.cut}"
                        + (f" (while reading {clean_name(state.cut_name)[0]})" if cut_key else ""))
        if cut_key is not None and cut_key != key:
            # The cut member starts a new sample, so the one before it is whole; record the cut one as incomplete.
            if key is not None:
                yield emit(problem)
            key, members, unreadable = cut_key, {}, {}
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


