"""Students replay a `--decode gpu` cache as it was built (`kdcache train --decode`, kdcache/train/replay.py).

Without a GPU the build's device path runs on the CPU (libjpeg standing in for nvjpeg, `decode_device="cpu"`), and so
does the student's: the test is that the student's pixels are the very pixels the build gave the teacher, row for
row and view for view, where the PIL replay is a level or two away; members the build decoded with PIL (PNG, WebP,
CMYK) replay with PIL in both."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import build_cache
from test_decode_gpu import photo

from kdcache.cli.main import cli
from kdcache.synth import write_tar
from kdcache.train import replay
from kdcache.train.config import TrainConfig, TrainError
from kdcache.train.dataspec import DataSpec
from kdcache.train.loader import make_loader
from kdcache.train.loop import run as train


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher_spec):
    """A --decode gpu cache (device path on the CPU) of JPEGs, greyscale JPEGs, PNG, WebP and CMYK, 3 views each,
    with every pixel the build gave the teacher, by (position, view)."""
    import kdcache.cache.gpuviews as gv

    d = tmp_path_factory.mktemp("replay")
    rng = np.random.default_rng(5)
    kinds = [("jpg", "JPEG", "RGB"), ("png", "PNG", "RGB"), ("jpg", "JPEG", "L"), ("webp", "WEBP", "RGB"),
             ("jpg", "JPEG", "CMYK")] + [("jpg", "JPEG", "RGB")] * 11
    members = []
    for i, (ext, fmt, mode) in enumerate(kinds):
        members += [(f"s{i:03d}.{ext}", photo(rng, 64 + 7 * i, 50 + 5 * i, fmt=fmt, mode=mode)),
                    (f"s{i:03d}.txt", f"picture {i}".encode())]
    shard = write_tar(d / "mixed-00000.tar", members)
    seen: dict[tuple[int, int], torch.Tensor] = {}
    real = gv.DeviceViews.pixels

    def pixels(self, batch):
        px = real(self, batch)
        for p, v, x in zip(batch.positions.tolist(), batch.views.tolist(), px, strict=True):
            seen[(p, v)] = x.clone()
        return px
    mp = pytest.MonkeyPatch()
    mp.setattr(gv.DeviceViews, "pixels", pixels)
    try:
        out = d / "gpu.zarr"
        assert build_cache(out, teacher=teacher_spec, images=(shard,), views=3, batch_size=4, decode="gpu",
                           decode_device="cpu").ok
    finally:
        mp.undo()
    return {"cache": str(out), "pixels": seen, "n": len(kinds)}


def _batches(built, *, device_decode: bool, split: str = "train", workers: int = 0, m: int = 1, online: bool = False):
    from kdcache.cache.reader import open_cache

    pp = open_cache(built["cache"]).attrs["preprocess"]
    spec = DataSpec(cache=built["cache"], tower="image", batch_size=4 * m, seed=0, val_fraction=0.25 if split == "val"
                    else 0.0, views_per_sample=m)
    loader = make_loader(spec, split=split, epoch=0, workers=workers, student_preprocess=pp,
                         teacher_preprocess=pp if online else None, device_decode=device_decode)
    rep = replay.DeviceReplay.for_rows(loader.dataset.rows, "cpu") if device_decode else None
    return list(replay.replayed(loader, rep))


@pytest.mark.parametrize("workers, m", [(0, 1), (2, 1), (0, 3)])
def test_the_student_sees_the_pixels_the_teacher_saw(built, workers, m):
    got = _batches(built, device_decode=True, workers=workers, m=m)
    pil = _batches(built, device_decode=False, workers=workers, m=m)
    rows = 0
    for b, p in zip(got, pil, strict=True):
        assert "replay" not in b and b["pixels"].dtype == torch.uint8
        assert torch.equal(b["position"], p["position"]) and torch.equal(b["view"], p["view"])
        for i, (pos, v) in enumerate(zip(b["position"].tolist(), b["view"].tolist(), strict=True)):
            assert torch.equal(b["pixels"][i], built["pixels"][(pos, v)]), (pos, v)
            if pos in (1, 3, 4):  # PNG, WebP, CMYK: the build decoded them with PIL, so does the PIL replay
                assert torch.equal(p["pixels"][i], b["pixels"][i])
            rows += 1
    assert rows == built["n"] * m
    # the PIL replay of the device-decoded rows is close to, not the same as, what the teacher saw
    diffs = [(b["pixels"].int() - p["pixels"].int()).abs().max().item() for b, p in zip(got, pil, strict=True)]
    assert 0 < max(diffs) <= 8


def test_validation_and_online_teacher_views_replay_on_the_device_too(built):
    for b in _batches(built, device_decode=True, split="val", online=True):
        for i, pos in enumerate(b["position"].tolist()):
            assert b["view"][i] == 0
            assert torch.equal(b["pixels"][i], built["pixels"][(pos, 0)])
            assert torch.equal(b["teacher_pixels"][i], built["pixels"][(pos, 0)])


def test_the_replay_decoder_is_resolved_from_the_cache_the_device_and_the_option():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    r = replay.resolve
    assert r("auto", cache_decode="cpu", tower="image", device=cuda, decode_device=None) == "cpu"
    assert r("auto", cache_decode="gpu", tower="image", device=cpu, decode_device=None) == "cpu"
    assert r("auto", cache_decode="gpu", tower="text", device=cuda, decode_device=None) == "cpu"
    assert r("cpu", cache_decode="gpu", tower="image", device=cuda, decode_device=None) == "cpu"
    assert r("gpu", cache_decode="gpu", tower="image", device=cpu, decode_device="cpu") == "gpu"
    if not torch.cuda.is_available():
        assert r("auto", cache_decode="gpu", tower="image", device=cuda, decode_device=None) == "cpu"
        with pytest.raises(TrainError, match="--decode gpu replays with nvjpeg on the student's CUDA device"):
            r("gpu", cache_decode="gpu", tower="image", device=cuda, decode_device=None)
    with pytest.raises(TrainError, match="decoded by PIL .* use --decode auto or cpu"):
        r("gpu", cache_decode="cpu", tower="image", device=cuda, decode_device=None)
    with pytest.raises(TrainError, match="--decode 'nvjpeg': expected one of auto, cpu, gpu"):
        TrainConfig(cache="c.zarr", tower="image", student="kdc-tiny-image", out="r", decode="nvjpeg")


def _cfg(built, out, **kw) -> TrainConfig:
    return TrainConfig(cache=built["cache"], tower="image", student="kdc-tiny-image", out=str(out), max_steps=4,
                       batch_size=4, threads=1, progress=False, val_fraction=0.25, checkpoint_every=2, **kw)


def test_a_run_records_its_replay_decoder_and_a_resume_keeps_it(built, tmp_path):
    out = tmp_path / "run"
    res = train(_cfg(built, out, decode="gpu", decode_device="cpu", workers=2))
    assert res.steps == 4
    assert json.loads((out / "config.json").read_text())["config"]["replay_decode"] == "gpu"
    with pytest.raises(TrainError, match="replay_decode"):
        train(_cfg(built, out, decode="cpu", resume=True))
    assert train(_cfg(built, out, decode="gpu", decode_device="cpu", resume=True)).steps == 4
    pil = tmp_path / "pil"
    train(_cfg(built, pil, decode="cpu"))
    assert "replay_decode" not in json.loads((pil / "config.json").read_text())["config"]


def test_cli_decode_gpu_without_cuda_is_one_clear_line(built, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = CliRunner().invoke(cli, ["train", "--cache", built["cache"], "--tower", "image", "--student", "kdc-tiny-image",
                                 "--out", str(tmp_path / "r"), "--decode", "gpu", "--device", "cpu", "--no-progress"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "--decode gpu replays with nvjpeg on the student's CUDA device" in r.output, r.output


def test_online_distillation_on_a_gpu_cache_sees_the_views_the_cache_was_built_from(built, teacher_spec, tmp_path):
    """Offline equals online for a --decode gpu cache too: the live teacher's embeddings of the device-replayed views
    match the cached ones to fp16 storage rounding (the pixels are the build's), and an online run trains through
    the device replay."""
    import torch.nn.functional as F

    from kdcache.cache.reader import open_cache
    from kdcache.online import OnlineTargets, run_online
    from kdcache.teacher import load_teacher

    targets = OnlineTargets(load_teacher(teacher_spec))
    live = targets.prepare(open_cache(built["cache"]), tower="image", needs=(), device=torch.device("cpu"))
    spec = DataSpec(cache=built["cache"], tower="image", batch_size=4, seed=0, val_fraction=0.0)
    loader = make_loader(spec, split="train", epoch=0, student_preprocess={"size": 24}, device_decode=True,
                         **live.loader)
    rep = replay.DeviceReplay.for_rows(loader.dataset.rows, "cpu")
    cos = []
    for b in replay.replayed(loader, rep):
        cached = b["teacher"].clone()
        cos.append(F.cosine_similarity(targets(b)["teacher"], cached, dim=-1))
    assert torch.cat(cos).min() > 0.9995
    res = run_online(_cfg(built, tmp_path / "on", decode="gpu", decode_device="cpu"), teacher=teacher_spec)
    assert res.steps == 4


def test_show_draws_a_gpu_caches_views_as_the_build_made_them(built, tmp_path, monkeypatch):
    """`kdcache show` on a --decode gpu cache renders with the build's tensor path: on this CPU (the build's device
    here) its tiles are the build's pixels, for device-decoded JPEGs and PIL-decoded members alike."""
    from kdcache.cache import show

    drawn = {}
    real = show._draw

    def capture(tiles, *, title, out):
        drawn["tiles"], drawn["title"] = tiles, title
        return real(tiles, title=title, out=out)
    monkeypatch.setattr(show, "_draw", capture)
    for pos in (0, 1, 2, 5):  # RGB JPEG, PNG, greyscale JPEG, RGB JPEG
        out = show.contact_sheet(built["cache"], f"s{pos:03d}", out=str(tmp_path / f"{pos}.png"))
        assert out.exists() and "decoded as --decode gpu does" in drawn["title"]
        for v, (px, _) in enumerate(drawn["tiles"]):
            assert torch.equal(px, built["pixels"][(pos, v)]), (pos, v)


def test_the_text_tower_refuses_a_device_replay(built):
    from kdcache.train.dataspec import DataError

    spec = DataSpec(cache=built["cache"], tower="text", batch_size=4, seed=0, val_fraction=0.0)
    with pytest.raises(DataError, match="device_decode replays image views"):
        make_loader(spec, split="train", epoch=0, tokenizer=lambda texts: torch.zeros(len(texts), 8),
                    device_decode=True)
