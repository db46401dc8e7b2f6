"""Tiny synthetic data: WebDataset image shards and caption corpora in every supported format.

Used by the tests and by `kdcache quickstart`, so the whole pipeline runs offline in minutes on a CPU. Pictures are
a coloured shape on noise whose colour is the class, so a tiny student can learn something real from them.
Everything is deterministic in `seed`, and tars have fixed metadata, so the same call writes the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Named colours for the default vocabulary; any other class name gets a colour derived from its name.
_COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30),
    "cyan": (30, 200, 210), "magenta": (200, 40, 200), "orange": (240, 130, 20), "purple": (120, 40, 170),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
_SHAPES = ("square", "circle", "blob")
_TEMPLATES = ("a photo of a {}.", "a photo of a {} {}.", "a picture of a {} {}.", "a {} {} on a noisy background.")
_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def class_colour(name: str) -> tuple[int, int, int]:
    """The dominant colour of pictures of class `name` (stable across runs and machines)."""
    if name in _COLOURS:
        return _COLOURS[name]
    h = hashlib.sha256(name.encode()).digest()
    return (40 + h[0] % 180, 40 + h[1] % 180, 40 + h[2] % 180)


def _caption(rng: np.random.Generator, cls: str, shape: str) -> str:
    t = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return t.format(cls) if t.count("{}") == 1 else t.format(cls, shape)


def _picture(rng: np.random.Generator, size: tuple[int, int], colour: tuple[int, int, int], shape: str) -> Image.Image:
    w, h = size
    noise = rng.integers(60, 196, size=(h, w, 3), dtype=np.uint8)
    im = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(im)
    # The shape covers roughly a third to two thirds of each side, anywhere in the frame.
    sw, sh = (max(2, int(d * rng.uniform(0.35, 0.7))) for d in (w, h))
    x0, y0 = int(rng.integers(0, w - sw + 1)), int(rng.integers(0, h - sh + 1))
    jitter = rng.integers(-20, 21, size=3)
    fill = tuple(int(c) for c in np.clip(np.asarray(colour) + jitter, 0, 255))
    box = (x0, y0, x0 + sw - 1, y0 + sh - 1)
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x0, y0 + sh - 1), (x0 + sw // 2, y0), (x0 + sw - 1, y0 + sh - 1)], fill=fill)
    return im


def _encode(im: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=90)
    elif ext == "webp":
        im.save(buf, format="WEBP", quality=90, method=4)
    else:
        im.save(buf, format=_FORMATS[ext])
    return buf.getvalue()


def write_tar(path: str | os.PathLike, members: Sequence[tuple[str, bytes]]) -> str:
    """Write a tar with exactly these member names and bytes, in this order; fixed metadata makes the bytes
    reproducible. Returns the path as a string."""
    path = str(path)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    return path


def write_image_shards(out_dir: str | os.PathLike, *, n_shards: int, per_shard: int, size: tuple[int, int] = (48, 40),
                       seed: int = 0, classes: Sequence[str] = ("red", "green", "blue"), captions: bool = True,
                       labels: bool = True, ext: str = "jpg", prefix: str = "shard") -> list[str]:
    """Write `n_shards` WebDataset tars of `per_shard` samples each (KEY.<ext>, KEY.cls, KEY.txt) into `out_dir`.

    `size` is (width, height). Keys are unique across shards. Labels are drawn at random, not cycled, so a reader
    that shifts rows cannot still look right. Returns the shard paths in order.
    """
    if ext not in _FORMATS:
        raise ValueError(f"unknown image ext {ext!r}; valid: {', '.join(_FORMATS)}")
    if not classes:
        raise ValueError("need at least one class")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(per_shard - 1)))
    paths = []
    for s in range(n_shards):
        rng = np.random.default_rng([seed, s])  # per shard, so shard s is the same whatever n_shards is
        members: list[tuple[str, bytes]] = []
        for i in range(per_shard):
            key = f"{s:05d}{i:0{width}d}"
            label = int(rng.integers(len(classes)))
            shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
            members.append((f"{key}.{ext}", _encode(_picture(rng, size, class_colour(classes[label]), shape), ext)))
            if labels:
                members.append((f"{key}.cls", str(label).encode()))
            if captions:
                members.append((f"{key}.txt", _caption(rng, classes[label], shape).encode()))
        paths.append(write_tar(out / f"{prefix}-{s:05d}.tar", members))
    return paths


def write_captions(path: str | os.PathLike, kind: str, *, n: int, seed: int = 0,
                   classes: Sequence[str] = ("red", "green", "blue")) -> str:
    """Write a corpus of `n` captions in format `kind` (coco, cc, txt, jsonl); returns the spec "kind:path"."""
    rng = np.random.default_rng(seed)
    texts = [_caption(rng, classes[int(rng.integers(len(classes)))], _SHAPES[int(rng.integers(len(_SHAPES)))])
             for _ in range(n)]
    path = str(path)
    if kind == "coco":
        # Five captions per image, like COCO; indent so parse errors have meaningful line numbers.
        doc = {"info": {"description": "kdcache synthetic captions"},
               "images": [{"id": i // 5, "file_name": f"{i // 5:012d}.jpg"} for i in range(0, n, 5)],
               "annotations": [{"id": i, "image_id": i // 5, "caption": t} for i, t in enumerate(texts)]}
        Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    elif kind == "cc":
        lines = [f"{t}\thttps://example.com/img/{i:06d}.jpg" for i, t in enumerate(texts)]
        Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    elif kind == "txt":
        Path(path).write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    elif kind == "jsonl":
        Path(path).write_text("".join(json.dumps({"caption": t, "id": i}) + "\n" for i, t in enumerate(texts)),
                              encoding="utf-8")
    else:
        raise ValueError(f"unknown caption corpus kind {kind!r}; valid: coco, cc, txt, jsonl")
    return f"{kind}:{path}"
