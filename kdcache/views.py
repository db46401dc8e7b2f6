"""The image views a cache records, and how to replay them exactly.

View 0 of a sample is the teacher's eval transform (`eval_transform_uint8`); views 1..K-1 are random-resized crops +
horizontal flips whose parameters are a pure function of (seed, shard, position, view) (`random_view`), rendered with
`render_view`. The cache stores each view's crop box and flip, so a student can reproduce the teacher's exact input
crop (`crop_view`) without the teacher and without any RNG state.

Shared by the build and the student trainer: this module must not import the teacher or open_clip's models.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import fields

import PIL.Image
import torch
import torchvision.transforms.functional as TF
from open_clip.transform import PreprocessCfg, image_transform_v2
from torchvision.transforms import Compose, InterpolationMode, Normalize, RandomResizedCrop, ToTensor

VIEW_SCALE = (0.9, 1.0)  # open_clip's default train RandomResizedCrop scale (AugmentationCfg.scale)
VIEW_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range, which open_clip's train transform keeps

Box = tuple[int, int, int, int]  # (left, top, width, height) in source pixels

# open_clip's eval transform maps 'bilinear' to BILINEAR and everything else it accepts ('bicubic', 'random') to
# BICUBIC; random views use the same mapping so that they are resampled like view 0.
_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "random": InterpolationMode.BICUBIC}


def _preprocess_cfg(preprocess: dict) -> PreprocessCfg:
    # The cache stores JSON (lists); open_clip's transforms expect the tuples its model attribute holds.
    kw = {f.name: preprocess[f.name] for f in fields(PreprocessCfg) if f.name in preprocess}
    for k in ("size", "mean", "std"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    return PreprocessCfg(**kw)


def eval_transform(preprocess: dict) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """open_clip's eval transform for this preprocessing (what `create_model_and_transforms` returns as the
    validation transform): PIL image -> normalised float [3, H, W]."""
    return image_transform_v2(_preprocess_cfg(preprocess), is_train=False)


def eval_transform_uint8(preprocess: dict) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """open_clip's own eval transform for this preprocessing, stopping at uint8 [3, H, W] pixels: the float
    conversion and normalisation happen on the teacher's device (`Teacher.encode_images`)."""
    tf = eval_transform(preprocess)
    steps = list(tf.transforms)
    # The last two steps are open_clip's MaybeToTensor (a ToTensor) and Normalize; everything before them is
    # geometry and mode conversion on PIL images, which is kept exactly as open_clip built it.
    if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        raise RuntimeError(f"unexpected open_clip eval transform (this open_clip is not supported): {tf}")
    return Compose([*steps[:-2], TF.pil_to_tensor])


def size_hw(preprocess: dict) -> tuple[int, int]:
    size = preprocess["size"]
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def eval_box(width: int, height: int, preprocess: dict) -> Box:
    """The part of a width x height source image that the eval transform shows the teacher (informational):
    for resize_mode 'shortest' the centred crop with the target's aspect ratio, otherwise the whole image."""
    mode = preprocess.get("resize_mode", "shortest")
    if mode in ("squash", "longest"):
        # squash stretches the whole image; longest fits it whole and pads (the <=1 px rounding crop is ignored).
        return 0, 0, width, height
    if mode != "shortest":
        raise ValueError(f"unknown resize_mode {mode!r}")
    th, tw = size_hw(preprocess)
    ratio = min(height / th, width / tw)  # source pixels per target pixel after the shortest-edge resize
    bw, bh = min(width, round(tw * ratio)), min(height, round(th * ratio))
    return round((width - bw) / 2), round((height - bh) / 2), bw, bh


def eval_resize(width: int, height: int, preprocess: dict) -> tuple[int, int]:
    """(w, h) of the image after the eval transform's resize step, before its crop or pad: the largest picture the
    transform makes. As open_clip builds it: 'shortest' to a square scales the short edge to the size (torchvision
    Resize, long edge truncated), to a non-square size it uses ResizeKeepRatio; 'longest' fits the long edge
    (ResizeKeepRatio, rounded); 'squash' resizes to the size."""
    mode = preprocess.get("resize_mode", "shortest")
    th, tw = size_hw(preprocess)
    if mode == "squash":
        return tw, th
    if mode == "shortest" and th == tw:
        short, long = min(width, height), max(width, height)
        new_long = int(th * long / short)
        return (th, new_long) if width <= height else (new_long, th)
    if mode not in ("shortest", "longest"):
        raise ValueError(f"unknown resize_mode {mode!r}")
    rh, rw = height / th, width / tw
    ratio = max(rh, rw) if mode == "longest" else min(rh, rw)
    return round(width / ratio), round(height / ratio)


def eval_view_problem(width: int, height: int, preprocess: dict, *, max_pixels: int) -> str | None:
    """Why the eval transform cannot be run on a width x height image, or None. An extreme aspect ratio passes any
    source-pixel bound (a 3,000,000x1 PNG is a few KB) yet asks the short-edge resize for billions of pixels, or the
    long-edge fit for a 0-pixel side. Random views need no such check: they crop inside the source (bounded by
    max_pixels) and resize the crop to the fixed view size."""
    w, h = eval_resize(width, height, preprocess)
    if w < 1 or h < 1:
        return f"{width}x{height} resizes to {w}x{h} for the eval view: a side would vanish"
    if w * h > max_pixels:
        return (f"{width}x{height} resizes to {w}x{h} = {w * h} pixels for the eval view, above max_pixels "
                f"{max_pixels}")
    return None


def view_seed(*, seed: int, shard: int, position: int, view: int) -> int:
    """A stable 63-bit seed for one view of one sample: blake2b of the four integers, independent of Python's hash
    randomisation, worker count and arrival order."""
    digest = hashlib.blake2b(struct.pack("<4q", seed, shard, position, view), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_view(*, width: int, height: int, seed: int, shard: int, position: int, view: int,
                scale: tuple[float, float] = VIEW_SCALE, ratio: tuple[float, float] = VIEW_RATIO) -> tuple[Box, bool]:
    """The crop box (left, top, w, h) and horizontal flip of one random view: torchvision's RandomResizedCrop
    parameters and a coin flip, drawn from a private generator seeded by `view_seed` (the global RNG is neither read
    nor advanced)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    # get_params only asks the image for its size (F.get_dimensions); a zero-stride view of one element has any size
    # without allocating it.
    shape_only = torch.empty(1, 1, 1).expand(1, height, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed(seed=seed, shard=shard, position=position, view=view))
        top, left, h, w = RandomResizedCrop.get_params(shape_only, list(scale), list(ratio))
        flip = bool(torch.rand(1).item() < 0.5)
    return (int(left), int(top), int(w), int(h)), flip


def crop_view(img: PIL.Image.Image, box: Box, flip: bool) -> PIL.Image.Image:
    """The exact source pixels of a view: crop `box`, then mirror if `flip` (before any resize, so replay is exact)."""
    left, top, w, h = (int(v) for v in box)
    # Records always crop inside the source; a box outside it (a damaged record) would make PIL allocate and pad a
    # crop of any size, so it is refused instead.
    if w < 1 or h < 1 or left < 0 or top < 0 or left + w > img.width or top + h > img.height:
        raise ValueError(f"view box {tuple(int(v) for v in box)} (left, top, w, h) is not inside the "
                         f"{img.width}x{img.height} image: the view record is damaged")
    out = img.crop((left, top, left + w, top + h))
    return out.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def render_view(img: PIL.Image.Image, box: Box, flip: bool, *, size: tuple[int, int] | list[int],
                interpolation: str) -> torch.Tensor:
    """`crop_view` resized to `size` (h, w) with the teacher's interpolation (PIL resampling, which antialiases as
    torchvision does on PIL images) -> uint8 [3, h, w]."""
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"unsupported interpolation {interpolation!r}; expected one of {sorted(_INTERPOLATION)}")
    view = crop_view(img, box, flip)
    if view.mode != "RGB":
        view = view.convert("RGB")  # as open_clip's eval transform does (MaybeConvertMode)
    view = TF.resize(view, [int(size[0]), int(size[1])], interpolation=_INTERPOLATION[interpolation], antialias=True)
    return TF.pil_to_tensor(view)
