"""RandAugment's op set on uint8 tensors, resolution-independent: the part of a view record that `kdcache.augment`
renders after the crop and resize. Magnitudes follow torchvision's RandAugment table (31 bins); shear and rotate are
angles and translate is a fraction of the view's size, so one record means the same picture at any render size.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

# torchvision RandAugment's op set, in its order (`RandAugment._augmentation_space`); a record stores indices into it.
OPS: tuple[str, ...] = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                        "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
NUM_BINS = 31  # torchvision's num_magnitude_bins; a magnitude is a bin index 0..30

# Value at the last bin of the ops whose magnitude is linear in the bin (linspace(0, max, 31) in torchvision), and
# whether the op is signed. Translate is a fraction of the view's width / height (torchvision: 150/331 * size in
# pixels), so a record means the same picture at any render size. Written out here rather than read from torchvision
# at run time, so that a torchvision upgrade cannot change what an existing record renders.
_LINEAR: dict[str, tuple[float, bool]] = {
    "ShearX": (0.3, True), "ShearY": (0.3, True),
    "TranslateX": (150.0 / 331.0, True), "TranslateY": (150.0 / 331.0, True),
    "Rotate": (30.0, True),
    "Brightness": (0.9, True), "Color": (0.9, True), "Contrast": (0.9, True), "Sharpness": (0.9, True),
}
SIGNED_OPS = frozenset(OPS.index(name) for name, (_, signed) in _LINEAR.items() if signed)


def op_magnitude(op: int, mag: int) -> float:
    """The value of op `op` at signed bin `mag`, as torchvision's RandAugment table (translate as a fraction of the
    view's size; posterize in bits; solarize as a threshold; 0 for ops without a magnitude)."""
    name, m = OPS[op], abs(int(mag))
    if not 0 <= m < NUM_BINS:
        raise ValueError(f"magnitude bin {mag} outside -{NUM_BINS - 1}..{NUM_BINS - 1}")
    sign = -1.0 if mag < 0 else 1.0
    if name in _LINEAR:
        top, signed = _LINEAR[name]
        return (sign if signed else 1.0) * top * m / (NUM_BINS - 1)
    if name == "Posterize":
        return float(8 - round(m / ((NUM_BINS - 1) / 4)))  # m / 7.5 is never a tie for integer m
    if name == "Solarize":
        return 255.0 * (NUM_BINS - 1 - m) / (NUM_BINS - 1)
    return 0.0


def _pixels(frac: float, size: int) -> int:
    # Whole pixels (an exact shift under NEAREST), rounded half away from zero so +/- are mirror images.
    return int(math.copysign(math.floor(abs(frac) * size + 0.5), frac))


def apply_op(x: torch.Tensor, op: int, mag: int) -> torch.Tensor:
    """One RandAugment op on a uint8 [3, h, w] tensor, as torchvision's RandAugment applies it (NEAREST, fill 0),
    except that translate is a fraction of the size (rounded to whole pixels) instead of torchvision's truncation."""
    name, v = OPS[op], op_magnitude(op, mag)
    near = InterpolationMode.NEAREST
    if name == "Identity":
        return x
    if name in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(v))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return F.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=near, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        h, w = x.shape[-2:]
        t = [_pixels(v, w), 0] if name == "TranslateX" else [0, _pixels(v, h)]
        return F.affine(x, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], interpolation=near)
    if name == "Rotate":
        return F.rotate(x, v, interpolation=near)
    if name == "Brightness":
        return F.adjust_brightness(x, 1.0 + v)
    if name == "Color":
        return F.adjust_saturation(x, 1.0 + v)
    if name == "Contrast":
        return F.adjust_contrast(x, 1.0 + v)
    if name == "Sharpness":
        return F.adjust_sharpness(x, 1.0 + v)
    if name == "Posterize":
        return F.posterize(x, int(v))
    if name == "Solarize":
        return F.solarize(x, v)
    if name == "AutoContrast":
        return F.autocontrast(x)
    if name == "Equalize":
        return F.equalize(x)
    raise AssertionError(name)
