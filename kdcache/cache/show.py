"""`kdcache show`: a contact sheet of one sample's views exactly as the teacher saw them, each captioned with its record
and the teacher's top-3 classes — the picture to look at when tuning an `--augment` policy.

    kdcache show cache.zarr --key 000042 --out views.png

The views are rendered from the cache's records with the build's own renderer (`kdcache.augment.render`) at the
teacher's size, from the sample's shard (and, for a mixed view, its partner's); nothing is re-drawn. A `--decode gpu`
cache's views are rendered by its tensor path (`kdcache.tensorviews`) from the same batched decode call, on the CPU:
the build's pixels up to nvjpeg's IDCT, which libjpeg stands in for here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from kdcache.augment import Policy, ViewRecord, erase_fill, record_arrays, render, unpack_record
from kdcache.augment_ops import OPS
from kdcache.cache import schema
from kdcache.cache.reader import Cache, CacheError, open_cache
from kdcache.shards import RejectError, ShardReport, decode_image, iter_shard, parse_sample
from kdcache.shards.gpudecode import decode_pictures, probe_image
from kdcache.tensorviews import TensorViews
from kdcache.views import eval_transform_uint8

TILE = 192          # views are shown at least this large (nearest-neighbour upscaling keeps their pixels visible)
CAPTION_LINES = 6
LINE = 12           # pixels per caption line with PIL's default bitmap font


def find_key(cache: Cache, key: str) -> tuple[schema.Unit, int]:
    """The image unit and row of `key` (the first, if the key is duplicated across shards)."""
    for unit in cache.units(schema.IMAGES):
        if cache.status(unit) is None:
            continue
        keys = cache.read(unit, ["key"])["key"]
        hits = np.flatnonzero(keys == key)
        if len(hits):
            return unit, int(hits[0])
    raise CacheError(f"{cache.path}: no image sample has key {key!r}")


def describe(rec: ViewRecord, view: int) -> list[str]:
    """A view's record in words, a few short lines."""
    if view == 0:
        return ["view 0: eval transform"]
    left, top, w, h = rec.box
    lines = [f"view {view}: crop {w}x{h}+{left}+{top}" + (" flip" if rec.flip else "")]
    ops = [f"{OPS[o]}{m:+d}" for o, m in zip(rec.ops, rec.mags, strict=True) if o != 0]
    if ops:
        lines.append(" ".join(ops))
    if rec.erase is not None:
        lines.append(f"erase {rec.erase}")
    if rec.mix_kind == 1:
        lines.append(f"mixup lam={rec.mix_lam / 255:.2f} with {rec.mix_offset:+d}")
    elif rec.mix_kind == 2:
        lines.append(f"cutmix {rec.mix_box} from {rec.mix_offset:+d}")
    return lines


def _samples(url: str, positions: set[int], *, max_pixels: int, background: tuple[int, int, int],
             device_decode: bool = False) -> dict:
    """The decoded pictures at `positions` of a shard (read up to the last one). With `device_decode` (a `--decode
    gpu` cache), a JPEG the build decoded on its device is decoded by the same call here, on the CPU (a uint8 tensor;
    libjpeg standing in for nvjpeg); other members as PIL decodes them."""
    out, last = {}, max(positions)
    for raw in iter_shard(url, ShardReport(url=url)):
        if raw.position in positions:
            try:
                sample = parse_sample(raw, max_pixels=max_pixels, background=background, decode=not device_decode)
                pic = sample.image
                if device_decode:
                    on_device = probe_image(sample.image_bytes, max_pixels=max_pixels).fallback is None
                    pic = (decode_pictures([sample.image_bytes], device="cpu", max_pixels=max_pixels,
                                           background=background)[0] if on_device else
                           decode_image(sample.image_bytes, max_pixels=max_pixels, background=background))
                    if isinstance(pic, RejectError):
                        raise pic
                out[raw.position] = pic
            except RejectError as e:
                raise CacheError(f"{url} position {raw.position} ({raw.key!r}) no longer decodes: {e}") from None
        if raw.position >= last:
            break
    return out


def contact_sheet(cache_path: str, key: str, *, out: str, images: Sequence[str] = ()) -> Path:
    """Write the contact sheet of `key`'s views to `out` (PNG) and return its path."""
    cache = open_cache(cache_path, allow_incomplete=True, need=[schema.CAP_IMAGES])
    unit, p = find_key(cache, key)
    policy, fill = cache.view_policy()
    policy = policy or Policy()
    pp = cache.attrs["preprocess"]
    fill = fill or erase_fill(pp)
    names = list(record_arrays(policy))
    a = cache.read(unit, ["valid", *names, *(["topk_idx", "topk_val", "lse"] if "logits" in cache.capabilities
                                           else [])])
    if not a["valid"][p]:
        raise CacheError(f"{cache.path}: sample {key!r} was rejected at build time (see `kdcache info`)")
    records = [unpack_record({k: a[k][p] for k in names}, v) for v in range(cache.views)]
    partners = {p + r.mix_offset for r in records if r.mix_kind}
    build = cache.attrs["build"]
    gpu = build.get("decode", "cpu") == "gpu"  # rendered as the --decode gpu build did, on this CPU
    pics = _samples(cache.shard_urls(images)[unit.index], {p, *partners}, max_pixels=int(build["max_pixels"]),
                    background=tuple(build["background"]), device_decode=gpu)
    classes = cache.vocab()[0] if "logits" in cache.capabilities else None
    eval_tf = eval_transform_uint8(pp)
    tensor_views = TensorViews(pp, fill=fill) if gpu else None
    tiles = []
    for v, rec in enumerate(records):
        if tensor_views is not None:  # a gpu build has no mixed views
            px = tensor_views.render(pics[p], None if v == 0 else rec)
        elif v == 0:
            px = eval_tf(pics[p])
        else:
            q = p + rec.mix_offset
            px = render(pics[p], rec, size=pp["size"], interpolation=pp["interpolation"], fill=fill,
                        partner=pics.get(q) if rec.mix_kind else None,
                        partner_rec=unpack_record({k: a[k][q] for k in names}, v) if rec.mix_kind else None)
        lines = describe(rec, v)
        if classes is not None:
            prob = np.exp(a["topk_val"][p, v, :3] - a["lse"][p, v])
            lines.append("teacher: " + ", ".join(f"{classes[i]} {pr:.0%}"
                                                 for i, pr in zip(a["topk_idx"][p, v, :3], prob, strict=True)))
        tiles.append((px, lines))
    how = " - decoded as --decode gpu does (libjpeg for nvjpeg)" if gpu else ""
    return _draw(tiles, title=f"{key} ({unit.source} #{p}) - policy {policy.spec() or 'default'}{how}", out=Path(out))


def _draw(tiles: list[tuple[torch.Tensor, list[str]]], *, title: str, out: Path) -> Path:
    h, w = tiles[0][0].shape[-2:]
    zoom = max(1, -(-TILE // max(h, w)))
    tw, th = w * zoom, h * zoom
    cap = LINE * CAPTION_LINES
    sheet = PIL.Image.new("RGB", (max(len(tiles) * (tw + 8) + 8, 8 * len(title) + 16), th + cap + LINE + 16), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    draw.text((8, 4), title, fill="black")
    for i, (px, lines) in enumerate(tiles):
        x = 8 + i * (tw + 8)
        img = PIL.Image.fromarray(px.permute(1, 2, 0).numpy()).resize((tw, th), PIL.Image.Resampling.NEAREST)
        sheet.paste(img, (x, LINE + 8))
        for j, line in enumerate(_wrap(lines, tw)[:CAPTION_LINES]):
            draw.text((x, LINE + 12 + th + j * LINE), line, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _wrap(lines: list[str], width: int) -> list[str]:
    per = max(8, width // 5)  # characters of PIL's default font per line
    return [line[i:i + per] for line in lines for i in range(0, max(len(line), 1), per)]
