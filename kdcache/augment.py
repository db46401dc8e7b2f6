"""Strong augmentation that replays exactly: a versioned policy, a compact record per view, one renderer.

A `Policy` (parsed from a spec such as ``rrc=0.35-1,flip,randaugment=2x9,erase=0.25,mix=mixup:0.2|cutmix:1.0``) says
how random views are drawn. `sample_view` draws one view's `ViewRecord` as a pure function of (policy, image size,
seed, shard, position, view); the record holds every random choice, already quantised, so the teacher (at build time)
and the student (at train time) both call `render` on the same record and get the same uint8 pixels. The record is the
truth: nothing is re-drawn at replay, so a later change of numpy's samplers cannot change a cache that exists.

Pipeline of one view: crop + flip + resize (`kdcache.views.render_view`, exactly today's random views) -> RandAugment
ops in order -> random erasing -> mixup / cutmix with an earlier sample of the same shard (the partner, rendered up to
erasing from its own record of the same view index).

`DEFAULT_POLICY` is today's views: its records carry only box and flip, drawn by `kdcache.views.random_view`, and render
bit-identically to `render_view`. Changing what a record means (op tables, draw order, rounding) needs a new
`POLICY_VERSION`; a cache recorded with another version is refused, never replayed with today's code.

Shared by the build and the student trainer, like `kdcache.views`: this module must not import the teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import PIL.Image
import torch

from kdcache.augment_ops import NUM_BINS, OPS, SIGNED_OPS, apply_op
from kdcache.views import VIEW_RATIO, VIEW_SCALE, random_view, render_view, view_seed

POLICY_VERSION = 1
DEFAULT_POLICY = "rrc=0.9-1,flip"

MIX_KINDS: tuple[str, ...] = ("mixup", "cutmix")  # record mix_kind = index + 1 (0 = not mixed)
ERASE_SCALE = (0.02, 0.33)  # torchvision RandomErasing defaults: area fraction and aspect-ratio range
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10
MAX_WINDOW = 127  # mix offsets are stored in int8 by the cache's byte budget

# Salt mixed into every non-crop draw, so they are independent of the crop draw that shares `view_seed`; each part
# (ops, erase, mix) has its own stream, so turning one on does not change the others' draws.
_SALT = 0x6B64_6175_6731  # "kdaug1"
_STREAM_OPS, _STREAM_ERASE, _STREAM_MIX = 1, 2, 3

_SPEC_HELP = ("rrc=LO-HI, ratio=LO-HI, flip, noflip, randaugment=NxM (N 1..4, M 0..30), erase=P, "
              "mix=mixup:A|cutmix:A, mixprob=P, window=W (1..127)")
_VALUED = {"rrc", "ratio", "randaugment", "erase", "mix", "mixprob", "window"}


class PolicyError(ValueError):
    """A policy spec or record that this code cannot (or must not) use."""


def _fmt(x: float) -> str:
    # Shortest round-trip decimal without an exponent (a '-' in an exponent would break 'LO-HI'); 1.0 -> '1'.
    return np.format_float_positional(float(x), trim="-")


@dataclass(frozen=True)
class Policy:
    """How random views (views >= 1) are drawn. See the module docstring and `parse_policy` for the spec grammar."""

    rrc_scale: tuple[float, float] = VIEW_SCALE
    rrc_ratio: tuple[float, float] = VIEW_RATIO
    flip: bool = True  # p = 0.5
    ra_ops: int = 0  # RandAugment N (ops per view); 0 = off
    ra_magnitude: int = 9  # RandAugment M: bin index of torchvision's 31 bins
    erase: float = 0.0  # random-erasing probability
    mix: tuple[tuple[str, float], ...] = ()  # (kind, Beta(a, a) alpha); one kind drawn uniformly per mixed view
    mix_prob: float = 1.0  # probability that a view (>= 1) is mixed when mix is given
    mix_window: int = 16  # partner = an earlier sample of the same shard, at most this many positions back
    version: int = POLICY_VERSION

    def __post_init__(self) -> None:
        # Accept lists (from JSON or a caller) but store tuples of floats, so equal policies compare equal.
        object.__setattr__(self, "rrc_scale", tuple(float(v) for v in self.rrc_scale))
        object.__setattr__(self, "rrc_ratio", tuple(float(v) for v in self.rrc_ratio))
        object.__setattr__(self, "mix", tuple((str(k), float(a)) for k, a in self.mix))
        if self.version != POLICY_VERSION:
            raise PolicyError(f"augmentation policy version {self.version} cannot be replayed by this code, which "
                              f"implements policy version {POLICY_VERSION}")
        lo, hi = self.rrc_scale if len(self.rrc_scale) == 2 else (0.0, -1.0)
        if not 0 < lo <= hi <= 1:
            raise PolicyError(f"rrc scale must satisfy 0 < LO <= HI <= 1, got {self.rrc_scale}")
        lo, hi = self.rrc_ratio if len(self.rrc_ratio) == 2 else (0.0, -1.0)
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise PolicyError(f"rrc ratio must satisfy 0 < LO <= HI, got {self.rrc_ratio}")
        if not 0 <= self.ra_ops <= 4:
            raise PolicyError(f"randaugment N must be 1..4 (0 = off), got {self.ra_ops}")
        if not 0 <= self.ra_magnitude < NUM_BINS:
            raise PolicyError(f"randaugment M must be 0..{NUM_BINS - 1}, got {self.ra_magnitude}")
        if self.ra_ops == 0 and self.ra_magnitude != Policy.ra_magnitude:
            raise PolicyError(f"randaugment magnitude {self.ra_magnitude} given without randaugment ops")
        if not 0 <= self.erase <= 1:
            raise PolicyError(f"erase probability must be in [0, 1], got {self.erase}")
        kinds = [k for k, _ in self.mix]
        if len(set(kinds)) != len(kinds) or not set(kinds) <= set(MIX_KINDS):
            raise PolicyError(f"mix kinds must be distinct and among {list(MIX_KINDS)}, got {kinds}")
        if any(not (a > 0 and math.isfinite(a)) for _, a in self.mix):
            raise PolicyError(f"mix alphas must be positive and finite, got {self.mix}")
        if not 0 < self.mix_prob <= 1:
            raise PolicyError(f"mixprob must be in (0, 1], got {self.mix_prob}")
        if not 1 <= self.mix_window <= MAX_WINDOW:
            raise PolicyError(f"mix window must be 1..{MAX_WINDOW}, got {self.mix_window}")
        if not self.mix and (self.mix_prob != Policy.mix_prob or self.mix_window != Policy.mix_window):
            raise PolicyError("mixprob / window given without mix")

    @property
    def mixes(self) -> bool:
        return bool(self.mix)

    def spec(self) -> str:
        """The canonical spec string: `parse_policy(p.spec()) == p`."""
        toks = [f"rrc={_fmt(self.rrc_scale[0])}-{_fmt(self.rrc_scale[1])}"]
        if self.rrc_ratio != VIEW_RATIO:
            toks.append(f"ratio={_fmt(self.rrc_ratio[0])}-{_fmt(self.rrc_ratio[1])}")
        toks.append("flip" if self.flip else "noflip")
        if self.ra_ops:
            toks.append(f"randaugment={self.ra_ops}x{self.ra_magnitude}")
        if self.erase:
            toks.append(f"erase={_fmt(self.erase)}")
        if self.mix:
            toks.append("mix=" + "|".join(f"{k}:{_fmt(a)}" for k, a in self.mix))
            if self.mix_prob != Policy.mix_prob:
                toks.append(f"mixprob={_fmt(self.mix_prob)}")
            if self.mix_window != Policy.mix_window:
                toks.append(f"window={self.mix_window}")
        return ",".join(toks)

    def to_json(self) -> dict:
        """Every field (JSON types) plus the spec for people reading the cache; `Policy.from_json` inverts it."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(rrc_scale=list(self.rrc_scale), rrc_ratio=list(self.rrc_ratio), mix=[[k, a] for k, a in self.mix])
        d["spec"] = self.spec()
        return d

    @classmethod
    def from_json(cls, d: dict) -> Policy:
        """The policy a cache recorded. Another policy version is refused (naming both): its records mean something
        this code does not render."""
        if "version" not in d:
            raise PolicyError("augmentation policy record has no 'version'")
        if d["version"] != POLICY_VERSION:
            raise PolicyError(f"augmentation policy version {d['version']} cannot be replayed by this code, which "
                              f"implements policy version {POLICY_VERSION}")
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - set(d)), sorted(set(d) - names - {"spec"})
        if missing or unknown:
            raise PolicyError(f"augmentation policy record: missing fields {missing}, unknown fields {unknown}")
        p = cls(**{k: d[k] for k in names})
        if "spec" in d and d["spec"] != p.spec():
            raise PolicyError(f"augmentation policy record: spec {d['spec']!r} does not match its fields "
                              f"({p.spec()!r})")
        return p


def _bad(tok: str, why: str) -> PolicyError:
    return PolicyError(f"policy token {tok!r}: {why}; valid tokens: {_SPEC_HELP}")


def _float(tok: str, s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise _bad(tok, f"{s!r} is not a number") from None
    if not math.isfinite(v):
        raise _bad(tok, f"{s!r} is not a finite number")
    return v


def _int(tok: str, s: str, lo: int, hi: int) -> int:
    if not s.isdigit() or not lo <= int(s) <= hi:
        raise _bad(tok, f"{s!r} is not an integer in {lo}..{hi}")
    return int(s)


def _range(tok: str, s: str) -> tuple[float, float]:
    parts = s.split("-")
    if len(parts) != 2:
        raise _bad(tok, "expected LO-HI")
    return _float(tok, parts[0]), _float(tok, parts[1])


def parse_policy(spec: str) -> Policy:
    """Parse a comma-separated policy spec, e.g. ``rrc=0.35-1,flip,randaugment=2x9,erase=0.25,mix=mixup:0.2|cutmix:1``.

    Tokens: ``rrc=LO-HI`` (crop scale, default 0.9-1), ``ratio=LO-HI`` (crop aspect ratio, default 3/4-4/3),
    ``flip`` / ``noflip`` (default flip), ``randaugment=NxM``, ``erase=P``, ``mix=KIND:ALPHA|...``, ``mixprob=P``,
    ``window=W``. An unknown, repeated or malformed token raises `PolicyError` naming it.
    """
    kw: dict = {}
    seen: set[str] = set()
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        key, eq, val = tok.partition("=")
        key = "flip" if key == "noflip" else key
        if key in seen:
            raise _bad(tok, "given twice")
        seen.add(key)
        if key == "flip":
            if eq:
                raise _bad(tok, "flip / noflip take no value")
            kw["flip"] = tok == "flip"
        elif not eq:
            raise _bad(tok, "unknown token" if key not in _VALUED else "expected a value")
        elif key == "rrc":
            kw["rrc_scale"] = _range(tok, val)
        elif key == "ratio":
            kw["rrc_ratio"] = _range(tok, val)
        elif key == "randaugment":
            n, x, m = val.partition("x")
            if not x:
                raise _bad(tok, "expected NxM")
            kw["ra_ops"], kw["ra_magnitude"] = _int(tok, n, 1, 4), _int(tok, m, 0, NUM_BINS - 1)
        elif key == "erase":
            kw["erase"] = _float(tok, val)
        elif key == "mix":
            mix = []
            for part in val.split("|"):
                kind, colon, alpha = part.partition(":")
                if kind not in MIX_KINDS or not colon:
                    raise _bad(tok, f"expected KIND:ALPHA with KIND in {list(MIX_KINDS)}, got {part!r}")
                mix.append((kind, _float(tok, alpha)))
            kw["mix"] = tuple(mix)
        elif key == "mixprob":
            kw["mix_prob"] = _float(tok, val)
        elif key == "window":
            kw["mix_window"] = _int(tok, val, 1, MAX_WINDOW)
        else:
            raise _bad(tok, "unknown token")
    try:
        return Policy(**kw)
    except PolicyError as e:
        raise PolicyError(f"policy {spec!r}: {e}; valid tokens: {_SPEC_HELP}") from None


Box = tuple[int, int, int, int]  # (left, top, width, height) in source pixels
FracBox = tuple[int, int, int, int]  # (x0, y0, x1, y1) as uint8 fractions (/255) of the rendered view


@dataclass(frozen=True)
class ViewRecord:
    """Everything random about one view, quantised: what the cache stores and what `render` replays."""

    box: Box  # crop (left, top, width, height) in source pixels
    flip: bool
    ops: tuple[int, ...] = ()  # RandAugment op ids (indices into OPS), applied in order
    mags: tuple[int, ...] = ()  # signed magnitude bin per op (-30..30); the sign is the direction of signed ops
    erase: FracBox | None = None  # erased rectangle
    mix_kind: int = 0  # 0 none, 1 mixup, 2 cutmix
    mix_offset: int = 0  # partner position = position + mix_offset (in [-window, -1]); 0 = none
    mix_lam: int = 255  # this sample's weight * 255 (cutmix: 1 - the quantised box's area fraction)
    mix_box: FracBox | None = None  # cutmix: region taken from the partner


def _generator(stream: int, *, seed: int, shard: int, position: int, view: int) -> np.random.Generator:
    vs = view_seed(seed=seed, shard=shard, position=position, view=view)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([vs, _SALT, stream])))


def _q(f: float) -> int:
    """A fraction in [0, 1] as a uint8 fraction (/255), rounded half up."""
    return min(255, max(0, math.floor(f * 255 + 0.5)))


def _erase_box(rng: np.random.Generator) -> FracBox | None:
    # torchvision RandomErasing.get_params on a unit square: area fraction, log-uniform aspect ratio, up to 10 tries,
    # then a position uniform over where the rectangle fits; no fit -> no erase (torchvision returns the image).
    # The render size is not known here, so the geometry is that of a square view (the usual CLIP input); a
    # non-square render stretches the rectangle with the view.
    log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    for _ in range(ERASE_ATTEMPTS):
        area = rng.uniform(*ERASE_SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        h, w = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if not (h < 1 and w < 1):
            continue
        top, left = rng.uniform(0, 1 - h), rng.uniform(0, 1 - w)
        box = (_q(left), _q(top), _q(left + w), _q(top + h))
        if box[2] > box[0] and box[3] > box[1]:
            return box
    return None


def sample_view(policy: Policy, *, width: int, height: int, seed: int, shard: int, position: int, view: int,
                partner_ok: Callable[[int], bool] | None = None) -> ViewRecord:
    """The record of one random view: a pure function of its arguments (no global RNG is read or advanced).

    Crop box and flip come from `kdcache.views.random_view` (so a `DEFAULT_POLICY` record is today's view); every
    other draw comes from private numpy generators seeded by `view_seed` and a salt. Views >= 1 may be mixed with an
    earlier sample of the same shard; `partner_ok(partner_position)` returning False (e.g. the partner failed to
    decode) means this view is not mixed.
    """
    where = dict(seed=seed, shard=shard, position=position, view=view)
    box, flip = random_view(width=width, height=height, **where, scale=policy.rrc_scale, ratio=policy.rrc_ratio)
    rec: dict = {"box": box, "flip": flip and policy.flip}

    if policy.ra_ops:
        rng = _generator(_STREAM_OPS, **where)
        ops = rng.integers(0, len(OPS), size=policy.ra_ops)  # with replacement, as torchvision
        negative = rng.integers(0, 2, size=policy.ra_ops)  # one coin per op; used by the signed ops only
        rec["ops"] = tuple(int(o) for o in ops)
        rec["mags"] = tuple(-policy.ra_magnitude if (o in SIGNED_OPS and n) else policy.ra_magnitude
                            for o, n in zip(rec["ops"], negative, strict=True))

    if policy.erase:
        rng = _generator(_STREAM_ERASE, **where)
        if rng.random() < policy.erase:
            rec["erase"] = _erase_box(rng)

    if policy.mix and view >= 1 and position >= 1:
        rec.update(_sample_mix(policy, _generator(_STREAM_MIX, **where), position, partner_ok))
    return ViewRecord(**rec)


def _sample_mix(policy: Policy, rng: np.random.Generator, position: int,
                partner_ok: Callable[[int], bool] | None) -> dict:
    if rng.random() >= policy.mix_prob:
        return {}
    kind, alpha = policy.mix[int(rng.integers(len(policy.mix)))]
    offset = -1 - int(rng.integers(min(policy.mix_window, position)))
    if partner_ok is not None and not partner_ok(position + offset):
        return {}
    lam = float(rng.beta(alpha, alpha))
    if kind == "mixup":
        return {"mix_kind": 1, "mix_offset": offset, "mix_lam": _q(lam)}
    # CutMix (Yun et al. 2019): a box of area 1 - lam with a uniform centre, clipped to the view.
    cut = math.sqrt(1.0 - lam)
    cx, cy = rng.random(), rng.random()
    box = (_q(max(cx - cut / 2, 0.0)), _q(max(cy - cut / 2, 0.0)), _q(min(cx + cut / 2, 1.0)),
           _q(min(cy + cut / 2, 1.0)))
    area = (box[2] - box[0]) * (box[3] - box[1])
    if area == 0:
        return {}  # nothing would be pasted: record no mix, so no partner is rendered for nothing
    return {"mix_kind": 2, "mix_offset": offset, "mix_lam": _q(1.0 - area / 255**2), "mix_box": box}


def _frac_px(box: FracBox, h: int, w: int) -> tuple[int, int, int, int]:
    # uint8 fractions -> pixel bounds, round(frac * size / 255) half up in exact integer arithmetic.
    x0, y0, x1, y1 = (int(v) for v in box)
    return (x0 * w + 127) // 255, (y0 * h + 127) // 255, (x1 * w + 127) // 255, (y1 * h + 127) // 255


def premix(img: PIL.Image.Image, rec: ViewRecord, *, size: tuple[int, int] | list[int], interpolation: str,
           fill: tuple[int, int, int]) -> torch.Tensor:
    """A view before mixing: crop + flip + resize (`render_view`) -> RandAugment ops -> erase (constant `fill`
    RGB) -> uint8 [3, h, w]. This is also what a partner contributes to a mixed view."""
    if len(rec.ops) != len(rec.mags):
        raise ValueError(f"record has {len(rec.ops)} ops but {len(rec.mags)} magnitudes")
    return finish_view(render_view(img, rec.box, rec.flip, size=size, interpolation=interpolation), rec, fill=fill)


def finish_view(x: torch.Tensor, rec: ViewRecord, *, fill: tuple[int, int, int]) -> torch.Tensor:
    """`premix` after the crop + flip + resize: the record's RandAugment ops, then its erase, on uint8 [3, h, w] on
    any device (the --decode gpu path renders the geometry on tensors, `kdcache.tensorviews`)."""
    if len(rec.ops) != len(rec.mags):
        raise ValueError(f"record has {len(rec.ops)} ops but {len(rec.mags)} magnitudes")
    for op, mag in zip(rec.ops, rec.mags, strict=True):
        x = apply_op(x, op, mag)
    if rec.erase is not None:
        x0, y0, x1, y1 = _frac_px(rec.erase, *x.shape[-2:])
        x = x.clone()
        x[:, y0:y1, x0:x1] = torch.tensor(fill, dtype=torch.uint8, device=x.device)[:, None, None]
    return x


def render(img: PIL.Image.Image, rec: ViewRecord, *, size: tuple[int, int] | list[int], interpolation: str,
           fill: tuple[int, int, int], partner: PIL.Image.Image | None = None,
           partner_rec: ViewRecord | None = None) -> torch.Tensor:
    """The exact uint8 [3, h, w] pixels of a view, for the teacher and the student alike.

    A mixed record needs its partner's source image and the partner's own record of the same view index (its mix,
    if any, is not applied: partners contribute their `premix`); without them this raises rather than silently
    dropping the mix. A partner passed for an unmixed record is ignored.
    """
    x = premix(img, rec, size=size, interpolation=interpolation, fill=fill)
    if rec.mix_kind == 0:
        return x
    if partner is None or partner_rec is None:
        raise ValueError(f"view record is mixed ({MIX_KINDS[rec.mix_kind - 1]} with the sample at offset "
                         f"{rec.mix_offset}) but no partner image and record were given")
    b = premix(partner, partner_rec, size=size, interpolation=interpolation, fill=fill)
    if rec.mix_kind == 1:
        lam = torch.tensor(rec.mix_lam / 255, dtype=torch.float32)
        return (lam * x.float() + (1 - lam) * b.float()).round().clamp(0, 255).to(torch.uint8)
    if rec.mix_kind == 2:
        if rec.mix_box is None:
            raise ValueError("cutmix record without a mix_box")
        x0, y0, x1, y1 = _frac_px(rec.mix_box, *x.shape[-2:])
        x = x.clone()
        x[:, y0:y1, x0:x1] = b[:, y0:y1, x0:x1]
        return x
    raise ValueError(f"unknown mix_kind {rec.mix_kind}")


def record_arrays(policy: Policy) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The cache arrays holding a policy's view records: name -> (dtype, per-view shape). The default policy needs
    exactly today's view_box and view_flip."""
    out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
        "view_box": (np.dtype(np.int32), (4,)), "view_flip": (np.dtype(np.bool_), ())}
    if policy.ra_ops:
        out["view_ops"] = (np.dtype(np.uint8), (policy.ra_ops,))
        out["view_mag"] = (np.dtype(np.int8), (policy.ra_ops,))
    if policy.erase:
        out["view_erase"] = (np.dtype(np.uint8), (4,))  # (0, 0, 0, 0) = not erased
    if policy.mix:
        out["view_mix"] = (np.dtype(np.int16), (3,))  # (kind, offset, lam); int16 because lam needs 0..255
        out["view_mixbox"] = (np.dtype(np.uint8), (4,))  # (0, 0, 0, 0) unless cutmix
    return out


def record_bytes(policy: Policy) -> int:
    """Raw bytes one view's record takes in the cache's arrays for this policy (17 for the default policy)."""
    return sum(dt.itemsize * math.prod(shape) for dt, shape in record_arrays(policy).values())


def pack_records(records: list[ViewRecord], policy: Policy) -> dict[str, np.ndarray]:
    """Records -> the fixed-width arrays of `record_arrays(policy)`. A record the policy cannot produce (wrong number
    of ops, an erase or mix the policy does not have) raises rather than being truncated."""
    n = len(records)
    arrays = {k: np.zeros((n, *shape), dtype=dt) for k, (dt, shape) in record_arrays(policy).items()}
    for i, r in enumerate(records):
        if len(r.ops) != policy.ra_ops or len(r.mags) != policy.ra_ops:
            raise ValueError(f"record {i} has {len(r.ops)} ops / {len(r.mags)} mags; the policy has {policy.ra_ops}")
        if (r.erase is not None and not policy.erase) or (r.mix_kind and not policy.mix):
            raise ValueError(f"record {i} erases or mixes but policy {policy.spec()!r} does not")
        arrays["view_box"][i] = r.box
        arrays["view_flip"][i] = r.flip
        if policy.ra_ops:
            arrays["view_ops"][i] = r.ops
            arrays["view_mag"][i] = r.mags
        if policy.erase and r.erase is not None:
            arrays["view_erase"][i] = r.erase
        if policy.mix:
            arrays["view_mix"][i] = (r.mix_kind, r.mix_offset, r.mix_lam)
            if r.mix_box is not None:
                arrays["view_mixbox"][i] = r.mix_box
    return arrays


def unpack_record(arrays: dict[str, np.ndarray], i: int) -> ViewRecord:
    """Row `i` of `pack_records`' arrays (or the cache's) as a `ViewRecord`; absent arrays mean 'not in the policy'."""
    rec: dict = {"box": tuple(int(v) for v in arrays["view_box"][i]), "flip": bool(arrays["view_flip"][i])}
    if "view_ops" in arrays:
        rec["ops"] = tuple(int(v) for v in arrays["view_ops"][i])
        rec["mags"] = tuple(int(v) for v in arrays["view_mag"][i])
    if "view_erase" in arrays:
        erase = tuple(int(v) for v in arrays["view_erase"][i])
        rec["erase"] = erase if any(erase) else None
    if "view_mix" in arrays:
        kind, offset, lam = (int(v) for v in arrays["view_mix"][i])
        rec.update(mix_kind=kind, mix_offset=offset, mix_lam=lam)
        if kind == 2:
            rec["mix_box"] = tuple(int(v) for v in arrays["view_mixbox"][i])
    return ViewRecord(**rec)


# ------------------------------------------------------------------------------------- for the build and the loader

def erase_fill(preprocess: dict) -> tuple[int, int, int]:
    """The RGB an erased rectangle is filled with: the teacher's normalisation mean, so erased pixels normalise to 0
    for the teacher (as torchvision's RandomErasing(value=0) after Normalize). Recorded in the cache; students replay
    with it whatever their own mean."""
    return tuple(int(round(255 * float(m))) for m in preprocess["mean"])


def strong(policy: Policy | None) -> bool:
    """Whether a policy's records need arrays beyond view_box and view_flip (the cache capability `strong_views`)."""
    return policy is not None and set(record_arrays(policy)) != {"view_box", "view_flip"}


def eval_record(box: Box, policy: Policy) -> ViewRecord:
    """View 0's record (the eval transform: informational box, no flip, no ops, no erase, no mix), padded with
    Identity ops so it packs into the policy's fixed-width arrays."""
    return ViewRecord(box=box, flip=False, ops=(0,) * policy.ra_ops, mags=(0,) * policy.ra_ops)
