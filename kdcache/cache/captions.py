"""Caption corpora for `kdcache build`: COCO captions JSON, Conceptual Captions TSV, plain text and JSONL.

Records are read by index range so a caption unit (a block of records) can be re-read on `--resume`; a bad record
becomes a `Reject` with a reason, never an exception that stops the build.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

from kdcache.shards.decode import check_caption, text_problem
from kdcache.shards.tar import Reject, RejectError

CAPTION_KINDS = ("coco", "cc", "txt", "jsonl")
_CAPTION_SUFFIXES = {".json": "coco", ".tsv": "cc", ".txt": "txt", ".jsonl": "jsonl"}
_CHUNK = 1 << 20

# ---------------------------------------------------------------------------------------------------------------
# Caption corpora


@dataclass(frozen=True)
class CaptionRow:
    """One usable caption record."""

    index: int  # 0-based record index in the corpus (line index for line formats, annotation index for coco)
    text: str
    ref: str  # source reference: coco image_id as str, cc url, "" otherwise
    truncated: bool = False  # the caption was cut to MAX_CAPTION_CHARS


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
    """(caption, image_id) per annotation; `file_id` (mtime, size) is in the key so an edited file is re-read. A
    UTF-8 byte-order mark is accepted, as the line formats accept it."""
    with fsspec.open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); a COCO captions file is "
                         "UTF-8 JSON") from None
    try:
        doc = json.loads(text)
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
    return _row(index, text, ref, where)


def _row(index: int, text: str, ref: str, where: str) -> CaptionRow | Reject:
    """A caption as the cache stores it (stripped, cut to MAX_CAPTION_CHARS), or a Reject: empty_caption, or
    bad_caption (a NUL or a lone surrogate, which UTF-8 text cannot hold faithfully)."""
    text = text.strip()
    if not text:
        return Reject(index, where, "empty_caption", "empty caption")
    try:
        text, cut = check_caption(text, "the caption")
    except RejectError as e:
        return Reject(index, where, e.reason, e.detail)
    why = text_problem(ref)
    if why:
        return Reject(index, where, "bad_caption", f"the caption's url / image_id {why}")
    return CaptionRow(index=index, text=text, ref=ref, truncated=cut)


def iter_caption_records(kind: str, path: str, *, start: int, stop: int) -> Iterator[CaptionRow | Reject]:
    """Records [start, stop) of a corpus, each a CaptionRow or a Reject (reason empty_caption, bad_caption or
    parse_error).

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
            else:
                yield _row(i, caption, "" if image_id is None else str(image_id), where)
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
