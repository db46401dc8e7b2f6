"""Strong augmentation: policies round-trip and refuse other versions; the default policy is exactly today's views;
records are pure functions of their arguments; every op, erase and mix replays exactly from the record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from kdcache.augment import (
    DEFAULT_POLICY,
    POLICY_VERSION,
    Policy,
    PolicyError,
    ViewRecord,
    pack_records,
    parse_policy,
    premix,
    record_bytes,
    render,
    sample_view,
    unpack_record,
)
from kdcache.augment_ops import OPS, apply_op, op_magnitude
from kdcache.views import random_view, render_view

STRONG = "rrc=0.35-1,flip,randaugment=2x9,erase=0.25,mix=mixup:0.2|cutmix:1.0"
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
FILL = (122, 116, 104)
KW = dict(interpolation="bicubic", fill=FILL)


def textured(w: int, h: int, seed: int = 0) -> Image.Image:
    """Noise with a colour gradient in 30..200: not full-range (AutoContrast acts), not flat (Equalize acts), coloured
    (Color acts), with values above the M=9 solarize threshold 178.5 and odd values (7-bit posterize acts)."""
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 1, w)[None, :, None] * np.array([60, -40, 20])
    px = rng.integers(60, 170, (h, w, 3)) + grad
    return Image.fromarray(np.clip(px, 30, 200).astype(np.uint8))


def smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    """Low-frequency colour blobs, so a picture rendered at two resolutions can be compared pixel by pixel."""
    cells = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((w, h), Image.Resampling.BICUBIC)


def mae(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


# ---- policy ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [DEFAULT_POLICY, STRONG, "rrc=0.08-1,noflip", "rrc=0.5-0.75,ratio=0.5-2,flip",
                                  "randaugment=4x30,erase=1", "mix=cutmix:1,mixprob=0.5,window=127", ""])
def test_policy_spec_and_json_round_trip(spec):
    p = parse_policy(spec)
    assert parse_policy(p.spec()) == p
    assert Policy.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert p.mixes == ("mix=" in spec)


def test_default_policy_is_todays_views():
    p = parse_policy(DEFAULT_POLICY)
    assert p == Policy() and p.spec() == DEFAULT_POLICY and p.version == POLICY_VERSION
    assert p.rrc_scale == (0.9, 1.0) and p.rrc_ratio == (3 / 4, 4 / 3) and p.flip and not p.mixes
    s = parse_policy(STRONG)
    assert (s.rrc_scale, s.ra_ops, s.ra_magnitude, s.erase) == ((0.35, 1.0), 2, 9, 0.25)
    assert s.mix == (("mixup", 0.2), ("cutmix", 1.0)) and (s.mix_prob, s.mix_window) == (1.0, 16)


@pytest.mark.parametrize("spec, token", [
    ("rrc=0.9-1,blur", "blur"), ("rrc=0-1", "rrc=0-1"), ("rrc=0.5", "rrc=0.5"), ("rrc=0.9-0.5", "rrc=0.9-0.5"),
    ("randaugment=5x9", "randaugment=5x9"), ("randaugment=2x31", "randaugment=2x31"), ("randaugment=2", "randaugment"),
    ("erase=1.5", "erase=1.5"), ("erase=nan", "erase=nan"), ("mix=blend:1", "mix=blend:1"),
    ("mix=mixup:0", "mix=mixup:0"), ("mix=mixup", "mix=mixup"), ("mix=mixup:1,window=128", "window=128"),
    ("mix=mixup:1|mixup:2", "mixup:2"), ("flip,noflip", "noflip"), ("flip=1", "flip=1"),
    ("mixprob=0.5", "mixprob=0.5"), ("erase", "erase"),
])
def test_bad_tokens_name_the_token_and_list_valid_ones(spec, token):
    with pytest.raises(PolicyError) as e:
        parse_policy(spec)
    assert token in str(e.value) and "randaugment=NxM" in str(e.value)


def test_from_json_refuses_another_version():
    d = parse_policy(STRONG).to_json()
    with pytest.raises(PolicyError, match=r"version 2 .*version 1"):
        Policy.from_json({**d, "version": 2})
    with pytest.raises(PolicyError, match="version"):
        Policy.from_json({k: v for k, v in d.items() if k != "version"})
    with pytest.raises(PolicyError, match="version 0"):
        Policy(version=0)
    with pytest.raises(PolicyError, match="unknown fields"):
        Policy.from_json({**d, "blur": 1})
    with pytest.raises(PolicyError, match="does not match"):
        Policy.from_json({**d, "erase": 0.5})  # the recorded spec says 0.25


# ---- sampling ----------------------------------------------------------------------------------------------------


def test_default_policy_records_are_exactly_random_view():
    p = parse_policy(DEFAULT_POLICY)
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h, seed, shard, pos, view = (int(v) for v in rng.integers(1, 700, 6))
        where = dict(width=w, height=h, seed=seed, shard=shard, position=pos, view=view % 8)
        box, flip = random_view(**where)
        assert sample_view(p, **where) == ViewRecord(box=box, flip=flip)
    # a strong policy draws the same box (with its own scale); noflip keeps the box and never flips
    where = dict(width=300, height=200, seed=1, shard=2, position=3)
    strong, noflip = parse_policy(STRONG), parse_policy("rrc=0.35-1,noflip")
    flips = set()
    for v in range(1, 40):
        box, flip = random_view(**where, view=v, scale=(0.35, 1.0))
        rec = sample_view(strong, **where, view=v)
        assert (rec.box, rec.flip) == (box, flip)
        assert sample_view(noflip, **where, view=v) == ViewRecord(box=box, flip=False)
        flips.add(flip)
    assert flips == {False, True}


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_default_records_render_exactly_like_render_view(interpolation):
    p = parse_policy(DEFAULT_POLICY)
    for i, (w, h) in enumerate([(57, 43), (43, 57), (100, 100)]):
        img = textured(w, h, i)
        for v in range(1, 4):
            rec = sample_view(p, width=w, height=h, seed=0, shard=0, position=i, view=v)
            out = render(img, rec, size=(24, 40), interpolation=interpolation, fill=FILL)
            assert out.dtype == torch.uint8 and out.shape == (3, 24, 40)
            assert torch.equal(out, render_view(img, rec.box, rec.flip, size=(24, 40), interpolation=interpolation))


def test_sample_view_is_pure_and_ignores_global_rng():
    p = parse_policy(STRONG)
    where = dict(width=320, height=240, seed=5, shard=1)
    torch.manual_seed(1)
    np.random.seed(1)
    a = [sample_view(p, **where, position=pos, view=v) for pos in range(20) for v in range(1, 4)]
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    torch.manual_seed(2)
    np.random.seed(2)
    b = [sample_view(p, **where, position=pos, view=v) for pos in range(20) for v in range(1, 4)]
    assert a == b
    torch.manual_seed(1)
    np.random.seed(1)
    [sample_view(p, **where, position=pos, view=1) for pos in range(20)]
    assert torch.equal(torch.random.get_rng_state(), torch_state)  # nothing read from or written to the global RNGs
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and np.random.get_state()[2] == np_state[2]
    # the draws vary with the view, and the seed matters
    assert len({(r.ops, r.mags) for r in a}) > 20
    assert sample_view(p, **{**where, "seed": 6}, position=3, view=1) != a[3 * 3]


def test_randaugment_draws_ops_uniformly_with_signed_magnitudes():
    p = parse_policy("randaugment=3x9")
    recs = [sample_view(p, width=64, height=64, seed=0, shard=0, position=i, view=1) for i in range(800)]
    ops = np.array([r.ops for r in recs])
    mags = np.array([r.mags for r in recs])
    assert ops.shape == (800, 3) and set(ops.ravel()) == set(range(len(OPS)))
    assert np.all(np.abs(mags) == 9)
    signed = np.isin(ops, [OPS.index(n) for n in (*GEOMETRIC, "Brightness", "Color", "Contrast", "Sharpness")])
    assert 0.4 < np.mean(mags[signed] < 0) < 0.6
    assert np.all(mags[~signed] == 9)  # unsigned ops always carry a positive bin


def test_erase_geometry_and_fill():
    p = parse_policy("erase=1")
    recs = [sample_view(p, width=64, height=64, seed=0, shard=0, position=i, view=1) for i in range(300)]
    boxes = [r.erase for r in recs if r.erase is not None]
    assert len(boxes) > 250  # torchvision's 10 attempts almost always find a fit
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 255 and 0 <= y0 < y1 <= 255
        assert 0.015 < (x1 - x0) * (y1 - y0) / 255**2 < 0.34
        assert 0.25 < (y1 - y0) / (x1 - x0) < 3.6
    assert parse_policy("erase=0.25") and 0.15 < np.mean([
        sample_view(parse_policy("erase=0.25"), width=64, height=64, seed=0, shard=0, position=i, view=1).erase
        is not None for i in range(300)]) < 0.35
    img = textured(64, 64)
    rec = next(r for r in recs if r.erase is not None)
    out = premix(img, rec, size=(32, 48), **KW)
    x0, y0, x1, y1 = rec.erase
    c0, r0, c1, r1 = round(x0 * 48 / 255), round(y0 * 32 / 255), round(x1 * 48 / 255), round(y1 * 32 / 255)
    assert torch.all(out[:, r0:r1, c0:c1] == torch.tensor(FILL, dtype=torch.uint8)[:, None, None])
    plain = render_view(img, rec.box, rec.flip, size=(32, 48), interpolation="bicubic")
    outside = torch.ones(32, 48, dtype=torch.bool)
    outside[r0:r1, c0:c1] = False
    assert torch.equal(out[:, outside], plain[:, outside])


# ---- ops ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", range(len(OPS)), ids=OPS)
def test_every_op_replays_exactly_and_changes_the_picture(op):
    img = textured(80, 60)
    base = ViewRecord(box=(5, 4, 70, 50), flip=True)
    ident = render(img, base, size=(48, 64), **KW)
    for mag in (9, -9):
        rec = ViewRecord(box=base.box, flip=True, ops=(op,), mags=(mag,))
        a, b = render(img, rec, size=(48, 64), **KW), render(img, rec, size=(48, 64), **KW)
        assert a.dtype == torch.uint8 and a.shape == (3, 48, 64) and torch.equal(a, b)
        assert torch.equal(a, ident) == (OPS[op] == "Identity")


def test_op_table_matches_torchvision_randaugment():
    """The magnitude tables are written out in augment.py (a torchvision upgrade must not change old records), so
    compare them and the ops' pixels with torchvision's own RandAugment (private helpers, read-only)."""
    from torchvision.transforms import InterpolationMode, RandAugment
    from torchvision.transforms.autoaugment import _apply_op

    h, w = 48, 64
    space = RandAugment()._augmentation_space(31, (h, w))
    assert tuple(space) == OPS
    x = render_view(textured(80, 60), (0, 0, 80, 60), False, size=(h, w), interpolation="bicubic")
    for op, name in enumerate(OPS):
        table, signed = space[name]
        for m in range(31):
            ref = float(table[m]) if table.ndim else 0.0
            ours = op_magnitude(op, m) * {"TranslateX": w, "TranslateY": h}.get(name, 1)
            assert ours == pytest.approx(ref, rel=1e-6, abs=1e-5), (name, m)
            if signed:
                assert op_magnitude(op, -m) == -op_magnitude(op, m)
        if name in ("TranslateX", "TranslateY"):
            continue  # ours rounds a fraction of the size to whole pixels; checked by the resolution test
        for m in (9, -9, 30) if signed else (9, 30):
            ref = _apply_op(x, name, (-1 if m < 0 else 1) * (float(table[abs(m)]) if table.ndim else 0.0),
                            InterpolationMode.NEAREST, None)
            # torchvision's v1 and v2 colour kernels round differently by at most 1
            assert (apply_op(x, op, m).int() - ref.int()).abs().max() <= 1, (name, m)


def test_translate_direction_matches_torchvision():
    x = render_view(textured(80, 60), (0, 0, 80, 60), False, size=(40, 40), interpolation="bicubic")
    shift = round(op_magnitude(OPS.index("TranslateX"), 9) * 40)
    assert shift == 5
    assert torch.equal(apply_op(x, OPS.index("TranslateX"), 9)[:, :, shift:], x[:, :, :-shift])
    assert torch.equal(apply_op(x, OPS.index("TranslateY"), -9)[:, :-shift], x[:, shift:])


def test_geometric_ops_are_resolution_independent():
    """A record means the same picture at any render size: rendered at 64x64, or at 128x128 then downscaled, it agrees
    up to NEAREST resampling (measured: 6.3-7.1 mean abs error, 0.4 with no ops). A translate in pixels rather than
    a fraction of the size (the same pixel count at both sizes) is far off (measured 41-47)."""
    geo = tuple(OPS.index(n) for n in GEOMETRIC)
    errors = []
    for seed in range(3):
        img = smooth(200, 160, seed)
        for mag in (9, -9):
            rec = ViewRecord(box=(10, 5, 150, 140), flip=False, ops=geo, mags=(mag,) * len(geo))
            small = render(img, rec, size=(64, 64), **KW)
            large = render(img, rec, size=(128, 128), **KW)
            assert not torch.equal(small, render(img, ViewRecord(box=rec.box, flip=False), size=(64, 64), **KW))
            errors.append(mae(small, F.resize(large, [64, 64], antialias=True)))
        # the same translate as a pixel count, applied at 128 as at 64
        moved = ViewRecord(box=(10, 5, 150, 140), flip=False, ops=geo[2:4], mags=(9, 9))
        px = round(op_magnitude(OPS.index("TranslateX"), 9) * 64)
        large = render(img, ViewRecord(box=moved.box, flip=False), size=(128, 128), **KW)
        large = F.affine(large, angle=0.0, translate=[px, px], scale=1.0, shear=[0.0, 0.0])
        pixel_err = mae(render(img, moved, size=(64, 64), **KW), F.resize(large, [64, 64], antialias=True))
        assert pixel_err > 25, pixel_err
    assert max(errors) < 10, errors


# ---- mixing ------------------------------------------------------------------------------------------------------


def _mixed(spec: str, kind: int) -> tuple[int, ViewRecord]:
    p = parse_policy(spec)
    for pos in range(1, 200):
        rec = sample_view(p, width=80, height=60, seed=0, shard=0, position=pos, view=1)
        if rec.mix_kind == kind and rec.ops and rec.mix_lam not in (0, 255):
            return pos, rec
    raise AssertionError("no mixed record found")


def test_mixup_renders_the_rounded_blend_of_the_premixes():
    pos, rec = _mixed("randaugment=2x9,erase=0.5,mix=mixup:0.4", 1)
    p = parse_policy("randaugment=2x9,erase=0.5,mix=mixup:0.4")
    partner_rec = sample_view(p, width=80, height=60, seed=0, shard=0, position=pos + rec.mix_offset, view=1)
    img, partner = textured(80, 60, 1), textured(80, 60, 2)
    out = render(img, rec, size=(32, 32), **KW, partner=partner, partner_rec=partner_rec)
    a = premix(img, rec, size=(32, 32), **KW).numpy().astype(np.float32)
    b = premix(partner, partner_rec, size=(32, 32), **KW).numpy().astype(np.float32)
    lam = np.float32(rec.mix_lam / 255)
    want = np.rint(lam * a + (np.float32(1) - lam) * b).astype(np.uint8)
    assert np.array_equal(out.numpy(), want)
    assert not np.array_equal(want, a.astype(np.uint8)) and not np.array_equal(want, b.astype(np.uint8))
    with pytest.raises(ValueError, match="partner"):
        render(img, rec, size=(32, 32), **KW)
    with pytest.raises(ValueError, match="partner"):
        render(img, rec, size=(32, 32), **KW, partner=partner)


def test_cutmix_pastes_the_partners_box():
    pos, rec = _mixed("randaugment=1x9,mix=cutmix:1", 2)
    partner_rec = ViewRecord(box=(0, 0, 80, 60), flip=False, ops=(OPS.index("Solarize"),), mags=(9,), mix_kind=1,
                             mix_offset=-1, mix_lam=100)  # a partner's own mix is not applied
    img, partner = textured(80, 60, 1), textured(80, 60, 2)
    out = render(img, rec, size=(40, 50), **KW, partner=partner, partner_rec=partner_rec)
    a = premix(img, rec, size=(40, 50), **KW)
    b = premix(partner, partner_rec, size=(40, 50), **KW)
    x0, y0, x1, y1 = rec.mix_box
    c0, r0, c1, r1 = round(x0 * 50 / 255), round(y0 * 40 / 255), round(x1 * 50 / 255), round(y1 * 40 / 255)
    want = a.clone()
    want[:, r0:r1, c0:c1] = b[:, r0:r1, c0:c1]
    assert torch.equal(out, want) and not torch.equal(out, a) and r1 > r0 and c1 > c0
    assert abs(rec.mix_lam / 255 - (1 - (x1 - x0) * (y1 - y0) / 255**2)) < 0.01
    with pytest.raises(ValueError, match="partner"):
        render(img, rec, size=(40, 50), **KW)


def test_mix_partners_window_rejection_and_position_zero():
    p = parse_policy("mix=mixup:0.2|cutmix:1.0,window=5")
    where = dict(width=64, height=64, seed=3, shard=7)
    asked: list[tuple[int, int]] = []
    kinds = []
    for pos in range(0, 300):

        def ok(q: int, pos: int = pos) -> bool:
            asked.append((pos, q))
            return True

        rec = sample_view(p, **where, position=pos, view=1, partner_ok=ok)
        kinds.append(rec.mix_kind)
        if pos == 0:
            assert rec.mix_kind == 0
        if rec.mix_kind:
            assert -min(5, pos) <= rec.mix_offset <= -1 and (pos, pos + rec.mix_offset) in asked
        else:
            assert (rec.mix_offset, rec.mix_lam, rec.mix_box) == (0, 255, None)
        assert sample_view(p, **where, position=pos, view=0).mix_kind == 0  # view 0 is never mixed
        assert sample_view(p, **where, position=pos, view=1, partner_ok=lambda q: False).mix_kind == 0
    assert set(kinds) == {0, 1, 2} and sum(k == 0 for k in kinds) < 20  # 0: position 0, empty cutmix boxes
    assert {off for pos, q in asked for off in [q - pos]} == {-1, -2, -3, -4, -5}
    half = parse_policy("mix=mixup:0.2,mixprob=0.5")
    frac = np.mean([sample_view(half, **where, position=pos, view=2).mix_kind == 1 for pos in range(1, 400)])
    assert 0.4 < frac < 0.6


# ---- packing -----------------------------------------------------------------------------------------------------


def test_pack_unpack_round_trip_and_record_bytes():
    p = parse_policy(STRONG)
    recs = [sample_view(p, width=90, height=70, seed=1, shard=0, position=pos, view=v)
            for pos in range(40) for v in range(1, 3)]
    assert {r.mix_kind for r in recs} == {0, 1, 2} and {r.erase is None for r in recs} == {True, False}
    arrays = pack_records(recs, p)
    assert {k: (a.dtype.str, a.shape) for k, a in arrays.items()} == {
        "view_box": ("<i4", (80, 4)), "view_flip": ("|b1", (80,)), "view_ops": ("|u1", (80, 2)),
        "view_mag": ("|i1", (80, 2)), "view_erase": ("|u1", (80, 4)), "view_mix": ("<i2", (80, 3)),
        "view_mixbox": ("|u1", (80, 4))}
    assert [unpack_record(arrays, i) for i in range(len(recs))] == recs
    assert sum(a[0].nbytes for a in arrays.values()) == record_bytes(p) == 35 <= 40

    d = parse_policy(DEFAULT_POLICY)
    drecs = [sample_view(d, width=90, height=70, seed=1, shard=0, position=pos, view=1) for pos in range(10)]
    darrays = pack_records(drecs, d)
    assert set(darrays) == {"view_box", "view_flip"} and record_bytes(d) == 17
    assert [unpack_record(darrays, i) for i in range(10)] == drecs
    with pytest.raises(ValueError, match="ops"):
        pack_records(recs[:1], d)  # a strong record does not fit the default policy's arrays
