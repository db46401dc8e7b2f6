"""Turning a raw shard sample into an RGB image, caption and label (`parse_sample`), or a `RejectError` with a
reason code, so one bad sample never kills a shard. The build, the student's loader and eval decode identically.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kdcache.shards.tar import RawSample, RejectError, describe_error

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
# Only formats a shard plausibly holds. Others (EPS runs Ghostscript, exotic plugins) are refused as undecodable.
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG also opens MPO (camera) files
_PIL_LIMIT_LOCK = threading.Lock()
# Members parse_sample reads: a sample that has one of these only as a link or device cannot be read faithfully.
_USED_EXTS = (*IMAGE_EXTS, "txt", "json", "cls")
LABEL_MAX = 2**31 - 1  # the cache stores labels as int32
# Captions longer than this many characters are cut to it (and counted as truncated in the unit's status): the text
# encoder sees 77 tokens (a few hundred characters) anyway, and tokenising a megabyte of text takes about a second.
MAX_CAPTION_CHARS = 4096
_CAPTION_UNSAFE = re.compile("[\x00\ud800-\udfff]")
_LABEL = re.compile(rb"\s*([+-]?[0-9]+)\s*")

# ---------------------------------------------------------------------------------------------------------------
# Image shards: decoded samples


@dataclass
class Sample:
    """A usable image sample: the picture as fully loaded RGB plus its optional caption and label."""

    key: str
    position: int
    image: Image.Image | None  # mode "RGB", fully loaded; None from parse_sample(decode=False)
    caption: str | None
    label: int | None
    caption_truncated: bool = False  # the caption was cut to MAX_CAPTION_CHARS
    image_bytes: bytes = b""  # the encoded image member (parse_sample(decode=False): the caller decodes it)


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
    im = open_image(data, max_pixels=max_pixels)
    try:
        return to_rgb(im, background=background)
    except (ValueError, OSError) as e:  # a mode PIL cannot convert
        raise RejectError("undecodable", f"cannot convert mode {im.mode} to RGB: {describe_error(e)}") from None


def open_image(data: bytes, *, max_pixels: int, load: bool = True) -> Image.Image:
    """PIL's image of `data` in its own mode, fully loaded (or, with load=False, only its header read: size, mode and
    format, for a decoder elsewhere). Raises RejectError as `decode_image` does."""
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
            if load:
                im.load()
        except RejectError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise RejectError("too_large", str(e)) from None
        # Untrusted bytes reach many PIL plugins, each with its own exception types; all mean "cannot decode".
        except Exception as e:
            raise RejectError("undecodable", describe_error(e)) from None
        finally:
            if bump:
                Image.MAX_IMAGE_PIXELS = old
    return im


def _text(data: bytes, ext: str) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise RejectError("bad_text" if ext == "txt" else "bad_json", f".{ext} is not UTF-8: {e}") from None


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored as UTF-8 text faithfully ("holds a NUL character at character 4"), or None."""
    bad = _CAPTION_UNSAFE.search(text)
    if bad is None:
        return None
    c = ord(bad.group())
    what = "a NUL character" if c == 0 else f"a lone surrogate \\u{c:04x} (not a character: invalid UTF-16 in JSON)"
    return f"holds {what} at character {bad.start()}"


def check_caption(text: str, where: str) -> tuple[str, bool]:
    """A caption as the cache can store it faithfully: (text, whether it was cut to MAX_CAPTION_CHARS). A NUL or a
    lone surrogate (JSON's "\\ud800") cannot be stored as UTF-8 text (NUL would be dropped silently), so either
    raises RejectError("bad_caption") naming `where`."""
    why = text_problem(text)
    if why:
        raise RejectError("bad_caption", f"{where} {why}")
    if len(text) > MAX_CAPTION_CHARS:
        return text[:MAX_CAPTION_CHARS].rstrip(), True
    return text, False


def _label(data: bytes) -> int:
    m = _LABEL.fullmatch(data)
    if m is None:
        raise RejectError("bad_label", f".cls is not an integer: {data[:40]!r}")
    digits = m.group(1).lstrip(b"+-").lstrip(b"0")
    if len(digits) > len(str(LABEL_MAX)):  # before int(): Python refuses to parse more than 4300 digits
        raise RejectError("bad_label", f".cls {m.group(1)[:40]!r} does not fit the cache's int32 labels "
                          f"(max {LABEL_MAX})")
    label = int(m.group(1))
    if label < 0:  # the cache stores -1 for "no label"; a negative class index is not a class
        raise RejectError("bad_label", f".cls is negative: {label}")
    if label > LABEL_MAX:
        raise RejectError("bad_label", f".cls {label} does not fit the cache's int32 labels (max {LABEL_MAX})")
    return label


def _unreadable(raw: RawSample) -> None:
    """Reject a sample that needs a member the stream cannot read (a link, a device, a FIFO)."""
    for ext, what in raw.unreadable.items():
        if ext not in _USED_EXTS:
            continue  # not read by parse_sample, as an unknown regular member would not be
        name = f"{raw.key}.{ext}"
        if what.startswith(("a hard link", "a symbolic link")):
            flag = "--hard-dereference" if what.startswith("a hard") else "--dereference"
            raise RejectError("link_member", f"{name} is {what}; shards are read as a stream, which cannot follow "
                              f"links: re-create the tar with `tar {flag}`")
        raise RejectError("special_member", f"{name} is {what}, not a file")


def parse_sample(raw: RawSample, *, max_pixels: int, background: tuple[int, int, int] = (255, 255, 255),
                 decode: bool = True) -> Sample:
    """Turn a raw sample into an RGB image, caption and label, or raise RejectError with the reason.

    Metadata is checked before the image is decoded: it is cheaper, and a sample is rejected either way. With
    decode=False the image is left encoded (`Sample.image_bytes`, `Sample.image` None) for a decoder elsewhere
    (`kdcache.shards.gpudecode`), which must apply `decode_image`'s checks itself.
    """
    m = raw.members
    if raw.problem == "split_sample":
        raise RejectError("split_sample", f"key {raw.key!r} reappears after other keys; its members are not adjacent")
    if raw.bad_key:
        raise RejectError("bad_key", f"the member names' key is not UTF-8 text (escaped: {raw.key!r}); rename the "
                          "members with UTF-8 names")
    _unreadable(raw)
    ext = next((e for e in IMAGE_EXTS if e in m), None)
    if ext is None:
        if raw.problem == "incomplete":
            raise RejectError("incomplete_sample", "the shard was cut before this sample's image was read")
        raise RejectError("no_image", f"members: {', '.join(sorted(m)) or 'none'}; want one of {', '.join(IMAGE_EXTS)}")
    if not m[ext]:
        raise RejectError("empty_image", f".{ext} has 0 bytes")

    label = _label(m["cls"]) if "cls" in m else None

    meta = None
    if "json" in m:
        try:
            meta = json.loads(_text(m["json"], "json"))
        except json.JSONDecodeError as e:
            raise RejectError("bad_json", f".json: {e}") from None
        if not isinstance(meta, dict):
            raise RejectError("bad_json", f".json is a {type(meta).__name__}, not an object")

    caption, truncated = None, False
    if "txt" in m:
        caption, truncated = check_caption(_text(m["txt"], "txt").strip(), ".txt")
    if not caption and meta is not None and isinstance(meta.get("caption"), str):
        caption, truncated = check_caption(meta["caption"].strip(), '.json "caption"')

    image = decode_image(m[ext], max_pixels=max_pixels, background=background) if decode else None
    return Sample(key=raw.key, position=raw.position, image=image, caption=caption or None, label=label,
                  caption_truncated=truncated, image_bytes=m[ext])


