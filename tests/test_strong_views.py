"""Strong views end to end: a cache built with `--augment` replays, in the student's loader, exactly the pixels the
teacher saw (RandAugment ops, erasing, mixup and cutmix with a partner sample), for any worker count; the replayed
views reproduce the cached teacher embeddings; a student at another size sees the same geometry; and a record from
another policy version is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner
from conftest import assert_identical_caches, build_cache

from kdcache.augment import parse_policy
from kdcache.augment_ops import OPS
from kdcache.cache import schema
from kdcache.cache.config import BuildConfig
from kdcache.cache.reader import CacheError, open_cache
from kdcache.cache.stream import Batch, ShardStream
from kdcache.cache.verify import verify
from kdcache.cli.main import cli
from kdcache.teacher import load_teacher
from kdcache.train.data import count_rows
from kdcache.train.dataspec import DataError, DataSpec
from kdcache.train.loader import make_loader

STRONG = "rrc=0.35-1,flip,randaugment=2x9,erase=0.5,mix=mixup:0.4|cutmix:1.0,window=4"
VIEWS = 4


@pytest.fixture(scope="module")
def strong_shards(tmp_path_factory):
    from kdcache.synth import write_image_shards

    return write_image_shards(tmp_path_factory.mktemp("strong-shards"), n_shards=2, per_shard=14, size=(56, 40),
                              seed=3)


@pytest.fixture(scope="module")
def strong_cache(tmp_path_factory, teacher_spec, strong_shards, classes_file):
    out = tmp_path_factory.mktemp("strong") / "cache.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(strong_shards), views=VIEWS, augment=STRONG,
                       classes=classes_file, batch_size=16).ok
    return out


def _teacher_saw(cache_path, teacher_spec, shards) -> dict[tuple[int, int, int], torch.Tensor]:
    """The uint8 pixels the build fed the teacher, by (shard, position, view), from the build's own stream."""
    cache = open_cache(str(cache_path))
    cfg = BuildConfig(out=str(cache_path), teacher=teacher_spec, images=tuple(shards), views=VIEWS, augment=STRONG,
                      batch_size=16)
    stream = ShardStream(cache.units(schema.IMAGES), preprocess=cache.attrs["preprocess"], cfg=cfg)
    seen = {}
    for item in stream:
        if isinstance(item, Batch):
            for s, p, v, px in zip([item.unit.index] * len(item.positions), item.positions, item.views, item.pixels,
                                   strict=True):
                seen[(s, int(p), int(v))] = px
    return seen


def _spec(cache, **kw) -> DataSpec:
    return DataSpec(cache=str(cache), tower="image", batch_size=kw.pop("batch_size", 8), seed=0, val_fraction=0.0,
                    **kw)


def test_cache_records_the_policy_and_its_records(strong_cache):
    c = open_cache(str(strong_cache))
    assert schema.CAP_STRONG_VIEWS in c.capabilities and schema.CAP_STRONG_VIEWS in c.attrs["required_capabilities"]
    policy, fill = c.view_policy()
    assert policy == parse_policy(STRONG) and fill == tuple(round(255 * m) for m in c.attrs["preprocess"]["mean"])
    a = c.read(c.units(schema.IMAGES)[0])
    assert a["view_ops"].shape == (14, VIEWS, 2) and a["view_mix"].shape == (14, VIEWS, 3)
    # view 0 is the eval transform: no ops, no erase, no mix
    assert (a["view_ops"][:, 0] == 0).all() and (a["view_erase"][:, 0] == 0).all()
    assert (a["view_mix"][:, 0, :2] == 0).all()  # (kind, offset); lam stays at its unmixed 255
    assert verify(str(strong_cache), progress=False).ok


def test_every_kind_of_record_occurs(strong_cache):
    # The replay tests below only mean something if the cache holds every op, erasing and both kinds of mix.
    c = open_cache(str(strong_cache))
    ops, erased, kinds = set(), 0, set()
    for u in c.units(schema.IMAGES):
        a = c.read(u, ["view_ops", "view_erase", "view_mix", "valid"])
        ops |= set(a["view_ops"][:, 1:].ravel().tolist())
        erased += int(a["view_erase"][:, 1:].any(axis=-1).sum())
        kinds |= set(a["view_mix"][:, 1:, 0].ravel().tolist())
    assert ops == set(range(len(OPS))), f"ops never drawn: {set(range(len(OPS))) - ops}"
    assert erased > 0 and kinds == {0, 1, 2}


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_replay_is_pixel_exact_and_reproduces_the_cached_embeddings(strong_cache, strong_shards, teacher_spec,
                                                                    workers):
    saw = _teacher_saw(strong_cache, teacher_spec, strong_shards)
    c = open_cache(str(strong_cache))
    pp = c.attrs["preprocess"]
    # views_per_sample = VIEWS: one epoch shows every cached view of every sample once
    loader = make_loader(_spec(strong_cache, views_per_sample=VIEWS), split="train", epoch=0, workers=workers,
                         student_preprocess=pp, teacher_preprocess=pp)
    replayed, teacher_px, cached = {}, [], []
    for b in loader:
        for i in range(len(b["view"])):
            k = (int(b["shard"][i]), int(b["position"][i]), int(b["view"][i]))
            replayed[k] = b["teacher_pixels"][i]
            assert torch.equal(b["pixels"][i], b["teacher_pixels"][i])  # student at the teacher's size: same view
        teacher_px.append(b["teacher_pixels"]), cached.append(b["teacher"])
    assert len(replayed) >= 0.9 * len(saw)  # the last partial batch of the epoch is dropped
    for k, px in replayed.items():
        assert torch.equal(px, saw[k]), f"view {k} does not replay pixel for pixel"
    if workers == 0:  # the teacher on the replayed views gives back the cached embeddings
        teacher = load_teacher(teacher_spec)
        emb = teacher.encode_images(torch.cat(teacher_px))
        cos = F.cosine_similarity(emb, torch.cat(cached), dim=-1)
        assert cos.min() >= 0.999, cos.min()


def test_a_student_at_another_size_sees_the_same_geometry(strong_cache):
    c = open_cache(str(strong_cache))
    pp = c.attrs["preprocess"]
    big = {**pp, "size": [2 * s for s in pp["size"]]}
    b = next(iter(make_loader(_spec(strong_cache, views_per_sample=VIEWS, batch_size=16), split="train", epoch=0,
                              student_preprocess=big, teacher_preprocess=pp)))
    strong = b["view"] > 0
    down = F.interpolate(b["pixels"][strong].float(), size=tuple(pp["size"]), mode="area")
    err = (down - b["teacher_pixels"][strong].float()).abs().mean()
    assert err < 16, err  # same crop, ops, erase and mix: only resampling differs
    # and the check can fail: another sample's view is far away
    other = (down - b["teacher_pixels"][strong].float().roll(1, dims=0)).abs().mean()
    assert other > 2 * err


def test_views_per_sample_shares_decoding_and_keeps_the_order_pure(strong_cache, monkeypatch):
    spec = _spec(strong_cache, views_per_sample=2)
    assert count_rows(spec, "train") == 2 * count_rows(_spec(strong_cache), "train")
    runs = [[{k: v for k, v in b.items()} for b in make_loader(spec, split="train", epoch=1, workers=w)]
            for w in (0, 2)]
    assert len(runs[0]) == len(runs[1]) == count_rows(spec, "train") // 8
    for a, b in zip(*runs, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for b in runs[0]:  # a batch of 8 views holds 4 samples x 2 distinct views, side by side
        pos = b["shard"] * 1000 + b["position"]
        assert (pos[0::2] == pos[1::2]).all() and (b["view"][0::2] != b["view"][1::2]).all()
    # each sample's picture is decoded once for its two views (partners of mixed views are decoded on their own)
    from kdcache.train.rows import ImageRows

    calls = []
    real = ImageRows._decode
    monkeypatch.setattr(ImageRows, "_decode", lambda self, *a: calls.append(a[2]) or real(self, *a))
    batch = next(iter(make_loader(spec, split="train", epoch=1)))
    mixed = int((batch["view"] > 0).sum())  # upper bound on partner decodes
    own = [k for k in calls if not k.startswith("partner of")]
    assert len(own) == 4 and len(calls) - len(own) <= mixed
    with pytest.raises(DataError, match="multiple of views_per_sample"):
        _spec(strong_cache, views_per_sample=3)


def test_another_policy_version_is_refused_never_replayed(strong_cache, tmp_path):
    import shutil

    copy = tmp_path / "v2.zarr"
    shutil.copytree(strong_cache, copy)
    root = zarr.open_group(str(copy), mode="r+")
    attrs = json.loads(json.dumps(dict(root.attrs)[schema.ROOT_ATTR]))
    attrs["build"]["augment"]["policy"]["version"] = 2
    root.attrs[schema.ROOT_ATTR] = attrs
    with pytest.raises(CacheError, match="version 2"):
        make_loader(_spec(copy), split="train", epoch=0)
    # a reader that does not know the capability refuses the cache instead of replaying views without their ops
    attrs["build"]["augment"]["policy"]["version"] = 1
    attrs["required_capabilities"] = [*attrs["required_capabilities"], "strong_views_v9"]
    root.attrs[schema.ROOT_ATTR] = attrs
    with pytest.raises(CacheError, match="does not understand"):
        open_cache(str(copy))


def test_the_default_policy_leaves_caches_as_they_were(tmp_path, teacher_spec, shards):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert build_cache(a, teacher=teacher_spec, images=tuple(shards), views=3).ok
    assert build_cache(b, teacher=teacher_spec, images=tuple(shards), views=3, augment="rrc=0.9-1,flip").ok
    assert_identical_caches(a, b)
    assert schema.CAP_STRONG_VIEWS not in open_cache(str(a)).capabilities


def test_resume_refuses_another_policy_and_cli_names_bad_tokens(strong_cache, tmp_path, teacher_spec, strong_shards):
    from kdcache.cache.config import BuildError

    copy = tmp_path / "c.zarr"
    import shutil

    shutil.copytree(strong_cache, copy)
    with pytest.raises(BuildError, match="augment"):
        build_cache(copy, teacher=teacher_spec, images=tuple(strong_shards), views=VIEWS, batch_size=16,
                    augment=STRONG.replace("2x9", "2x5"), resume=True)
    r = CliRunner().invoke(cli, ["build", "--images", strong_shards[0], "--teacher", teacher_spec, "--out",
                                 str(tmp_path / "x.zarr"), "--augment", "rrc=0.35-1,randaugmnt=2x9"])
    assert r.exit_code != 0 and "randaugmnt" in r.output and "Traceback" not in r.output


def test_records_cost_what_the_issue_budgets(strong_cache):
    from kdcache.augment import record_bytes

    assert record_bytes(parse_policy("rrc=0.9-1,flip")) == 17
    assert record_bytes(parse_policy("rrc=0.35-1,flip,randaugment=2x9,erase=0.25")) <= 25
    assert record_bytes(parse_policy(STRONG)) <= 40
    c = open_cache(str(strong_cache))
    a = c.read(c.units(schema.IMAGES)[0], [n for n in ("view_box", "view_flip", "view_ops", "view_mag", "view_erase",
                                                       "view_mix", "view_mixbox")])
    assert sum(x[0].nbytes for x in a.values()) / VIEWS == record_bytes(parse_policy(STRONG))
    assert np.isfinite(c.read(c.units(schema.IMAGES)[0], ["emb"])["emb"]).all()


def test_show_draws_every_view_of_a_sample(strong_cache, tmp_path):
    import PIL.Image

    c = open_cache(str(strong_cache))
    a = c.read(c.units(schema.IMAGES)[1], ["key", "view_mix"])
    mixed = int(np.flatnonzero((a["view_mix"][:, 1:, 0] > 0).any(axis=1))[0])  # a sample with a mixed view
    key = str(a["key"][mixed])
    r = CliRunner().invoke(cli, ["show", str(strong_cache), "--key", key, "--out", str(tmp_path / "v.png")])
    assert r.exit_code == 0, r.output
    with PIL.Image.open(tmp_path / "v.png") as img:
        assert img.width >= VIEWS * 192 and img.height > 192
    r = CliRunner().invoke(cli, ["show", str(strong_cache), "--key", "no-such-key", "--out", str(tmp_path / "x.png")])
    assert r.exit_code != 0 and "no-such-key" in r.output and not (tmp_path / "x.png").exists()
