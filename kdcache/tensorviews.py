"""The views of `kdcache.views` and `kdcache.augment`, rendered from a decoded uint8 tensor on any device (the
`--decode gpu` build: JPEGs decoded by nvjpeg, views cut and resized on the GPU).

Same geometry as the PIL path: view 0 runs open_clip's own eval transform steps on the tensor (Resize / CenterCrop /
CenterCropOrPad; ResizeKeepRatio's size from `kdcache.views.eval_resize`, which is its formula); a random view crops
the record's box in source pixels, flips, and resizes with the teacher's interpolation, antialiased
(`torchvision.transforms.v2.functional.resize`, whose antialiasing follows PIL's), then applies the record's ops and
erase (`kdcache.augment.finish_view`). The pixels are close to the PIL path's, not equal: resampling in float then
rounding differs from PIL's fixed-point resampling by a level or two, and nvjpeg's IDCT and chroma upsampling differ
from libjpeg's. Mixed views (mixup/cutmix) are not rendered here.

Shared by the build and students (`kdcache.train.replay`), like `kdcache.views`: it must not import the teacher.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as F2
from open_clip.transform import CenterCropOrPad, MaybeConvertMode, ResizeKeepRatio
from torchvision.transforms import CenterCrop, Resize

from kdcache.augment import ViewRecord, finish_view, render
from kdcache.views import _INTERPOLATION, eval_resize, eval_transform_uint8, size_hw


class TensorViews:
    """Render one teacher preprocessing's views from decoded uint8 [3, H, W] tensors, on the tensors' device."""

    def __init__(self, preprocess: dict, *, fill: tuple[int, int, int]):
        interp = preprocess["interpolation"]
        if interp not in _INTERPOLATION:
            raise ValueError(f"unsupported interpolation {interp!r}; expected one of {sorted(_INTERPOLATION)}")
        self.preprocess, self.fill = preprocess, fill
        self.size = list(size_hw(preprocess))
        self.interpolation = _INTERPOLATION[interp]
        steps = list(eval_transform_uint8(preprocess).transforms)[:-1]  # the last is pil_to_tensor
        for s in steps:
            if not isinstance(s, (Resize, CenterCrop, CenterCropOrPad, ResizeKeepRatio, MaybeConvertMode)):
                raise RuntimeError(f"unexpected open_clip eval transform step {s!r} (this open_clip is not supported)")
        self.eval_steps = steps
        self._eval_tf = None  # the PIL eval transform, built on first use (`render` of a PIL picture)

    def render(self, pic, rec: ViewRecord | None) -> torch.Tensor:
        """View 0 (`rec` None) or a random view of a decoded picture: a tensor on its device, or, for a picture the
        device did not decode (a PIL image), as the PIL path renders it (`--decode cpu`), on the CPU."""
        if isinstance(pic, torch.Tensor):
            return self.eval_view(pic) if rec is None else self.view(pic, rec)
        if rec is None:
            if self._eval_tf is None:
                self._eval_tf = eval_transform_uint8(self.preprocess)
            return self._eval_tf(pic)
        return render(pic, rec, size=tuple(self.size), interpolation=self.preprocess["interpolation"], fill=self.fill)

    def render_all(self, jobs: list[tuple], *, together: bool | None = None) -> list[torch.Tensor]:
        """`render` of each (picture, record) pair, pixel for pixel, with the view 0s of decoded pictures of one size
        rendered `together` in one call (`eval_view` of their stack; each picture of a stack is resized as it would be
        alone: the same kernel, element by element). On a GPU (`together` None: pictures not on the CPU) a batch then
        costs a few kernel launches per picture size instead of a few per picture, and a dataset's or a camera's
        pictures often share a size; on the CPU, where an op's dispatch is cheap beside its work, stacking the
        pictures costs more than it saves (bench/bench_render.py)."""
        out: list = [None] * len(jobs)
        same_size: dict[tuple, list[int]] = {}
        for i, (pic, rec) in enumerate(jobs):
            if rec is None and isinstance(pic, torch.Tensor) and (pic.device.type != "cpu" if together is None
                                                                   else together):
                _check(pic)
                same_size.setdefault(tuple(pic.shape), []).append(i)
            else:
                out[i] = self.render(pic, rec)
        for idx in same_size.values():
            if len(idx) == 1:
                out[idx[0]] = self._eval_steps(jobs[idx[0]][0])
            else:
                stacked = self._eval_steps(torch.stack([jobs[i][0] for i in idx]))
                for i, x in zip(idx, stacked.unbind(0), strict=True):
                    out[i] = x
        return out

    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        """View 0: open_clip's eval transform of the source picture, uint8 [3, h, w]."""
        _check(x)
        return self._eval_steps(x)

    def _eval_steps(self, x: torch.Tensor) -> torch.Tensor:
        # The eval transform's steps on [..., 3, H, W]: one picture, or a stack of same-size ones (`render_all`).
        for s in self.eval_steps:
            if isinstance(s, ResizeKeepRatio):
                w, h = eval_resize(x.shape[-1], x.shape[-2], self.preprocess)
                x = _resize(x, [h, w], s.interpolation)
            elif isinstance(s, Resize):
                x = _resize(x, s.size, s.interpolation, max_size=s.max_size)
            elif isinstance(s, CenterCrop):
                x = F2.center_crop(x, list(s.size))
            elif isinstance(s, CenterCropOrPad):
                x = s(x)
            # MaybeConvertMode: a decoded tensor is RGB already
        return x

    def view(self, x: torch.Tensor, rec: ViewRecord) -> torch.Tensor:
        """A random view (>= 1) from its record: crop, flip, resize, ops, erase -> uint8 [3, h, w]."""
        _check(x)
        if rec.mix_kind:
            raise ValueError("mixed views (mixup/cutmix) are rendered by the PIL path only (--decode cpu)")
        left, top, w, h = (int(v) for v in rec.box)
        H, W = x.shape[-2:]
        if w < 1 or h < 1 or left < 0 or top < 0 or left + w > W or top + h > H:
            raise ValueError(f"view box {(left, top, w, h)} (left, top, w, h) is not inside the {W}x{H} image: the "
                             "view record is damaged")
        v = x[:, top:top + h, left:left + w]
        if rec.flip:
            v = v.flip(-1)
        return finish_view(_resize(v, self.size, self.interpolation), rec, fill=self.fill)


def _check(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] picture, got {x.dtype} {tuple(x.shape)}")


def _resize(x: torch.Tensor, size, interpolation, max_size: int | None = None) -> torch.Tensor:
    # Antialiased as PIL resamples (torchvision's antialias was written to match PIL's filters); uint8 in and out,
    # rounded and clamped, so bicubic overshoot saturates as PIL's does.
    size = [int(size)] if isinstance(size, int) else [int(s) for s in size]
    return F2.resize(x.contiguous(), size, interpolation=interpolation, max_size=max_size, antialias=True)
