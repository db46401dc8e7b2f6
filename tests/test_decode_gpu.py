"""`kdcache build --decode gpu`: JPEGs decoded in batches with torchvision's decode_jpeg and views rendered from the
tensor (`kdcache.tensorviews`). Without a GPU the same path runs on the CPU (libjpeg instead of nvjpeg) through the
build's internal `decode_device`, so everything but nvjpeg itself is exercised here: the tensor rendering against the
PIL path, the per-sample PIL fallback, the build record, the --resume refusal and the no-CUDA error."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import build_cache
from PIL import Image, ImageDraw

from kdcache.augment import ViewRecord, erase_fill, render
from kdcache.cache import schema
from kdcache.cache.config import BuildError
from kdcache.cli.main import cli
from kdcache.shards import RejectError, decode_image
from kdcache.shards.gpudecode import decode_jpegs, probe_image
from kdcache.synth import write_tar
from kdcache.tensorviews import TensorViews
from kdcache.views import eval_transform_uint8, random_view

MAX_PIXELS = 10**8


def photo(rng: np.random.Generator, w: int, h: int, *, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A photo-like picture (smooth noise and a disc, JPEG-compressed at quality 90) in the given format and mode."""
    base = rng.integers(0, 255, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    disc = tuple(int(c) for c in rng.integers(0, 255, 3))
    ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=disc)
    buf = io.BytesIO()
    img.convert(mode).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _embed(teacher, views: list[torch.Tensor]) -> np.ndarray:
    return teacher.encode_images(torch.stack(views)).numpy()


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_tensor_views_match_the_pil_path(resize_mode, teacher_spec):
    """The decoded tensor rendered on the tensor path is the PIL path's view within a few levels per pixel, and the
    teacher's embeddings of the two agree to cos >= 0.999 (view 0 and random views, RGB and greyscale JPEGs)."""
    from kdcache.teacher import load_teacher

    teacher = load_teacher(teacher_spec)
    pp = {**teacher.preprocess, "resize_mode": resize_mode}
    fill = erase_fill(pp)
    tv, eval_tf = TensorViews(pp, fill=fill), eval_transform_uint8(pp)
    rng = np.random.default_rng(0)
    a, b = [], []
    for k in range(6):
        w, h = (int(x) for x in rng.integers(60, 240, 2))
        data = photo(rng, w, h, mode="L" if k == 5 else "RGB")
        assert probe_image(data, max_pixels=MAX_PIXELS).fallback is None
        (x,) = decode_jpegs([data], device="cpu")
        im = decode_image(data, max_pixels=MAX_PIXELS)
        assert x.shape == (3, h, w)
        a.append(tv.eval_view(x)), b.append(eval_tf(im))
        for v in (1, 2):
            box, flip = random_view(width=w, height=h, seed=0, shard=0, position=k, view=v)
            rec = ViewRecord(box=box, flip=flip, ops=(1,), mags=(9,), erase=(10, 20, 60, 90) if v == 2 else None)
            a.append(tv.view(x, rec))
            b.append(render(im, rec, size=pp["size"], interpolation=pp["interpolation"], fill=fill))
    diff = max(int((p.int() - q.int()).abs().max()) for p, q in zip(a, b, strict=True))
    assert diff <= 4, f"max abs pixel difference {diff}"
    cos = (_embed(teacher, a) * _embed(teacher, b)).sum(-1)
    assert cos.min() >= 0.999, cos.min()


@pytest.mark.parametrize("resize_mode, interpolation", [("shortest", "bicubic"), ("longest", "bilinear"),
                                                         ("squash", "bicubic")])
def test_render_all_renders_each_view_as_render_does(resize_mode, interpolation):
    """A batch's view 0s of same-size pictures rendered in one call (as on a GPU) are, pixel for pixel, the views
    rendered one by one; random views and PIL-decoded pictures in the same batch are rendered as `render` renders
    them, in batch order."""
    pp = {"size": 40, "mode": "RGB", "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": interpolation,
          "resize_mode": resize_mode, "fill_color": 0}
    tv = TensorViews(pp, fill=(7, 8, 9))
    rng = np.random.default_rng(3)
    sizes = [(120, 90), (64, 200), (120, 90), (77, 55), (64, 200), (120, 90)]
    pics = [decode_jpegs([photo(rng, w, h)], device="cpu")[0] for w, h in sizes]
    jobs = [(x, None) for x in pics]
    jobs += [(pics[0], ViewRecord(box=(3, 4, 50, 60), flip=True, ops=(1,), mags=(9,))),
             (decode_image(photo(rng, 120, 90), max_pixels=MAX_PIXELS), None)]
    jobs.insert(2, (pics[1], ViewRecord(box=(0, 0, 64, 100), flip=False)))
    got = tv.render_all(jobs, together=True)  # as on a GPU
    want = [tv.render(pic, rec) for pic, rec in jobs]
    assert all(torch.equal(a, b) for a, b in zip(tv.render_all(jobs), want, strict=True))  # CPU: one by one
    assert len(got) == len(want) == 9
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape == (3, 40, 40) and torch.equal(g, w), i


def test_probe_routes_members_by_header():
    rng = np.random.default_rng(1)
    assert probe_image(photo(rng, 40, 30), max_pixels=MAX_PIXELS).fallback is None
    assert probe_image(photo(rng, 40, 30, fmt="PNG"), max_pixels=MAX_PIXELS).fallback == "not_jpeg"
    assert probe_image(photo(rng, 40, 30, mode="CMYK"), max_pixels=MAX_PIXELS).fallback == "jpeg_mode"
    cut = photo(rng, 40, 30)
    assert probe_image(cut[: len(cut) - 40], max_pixels=MAX_PIXELS).fallback == "jpeg_no_eoi"
    p = probe_image(photo(rng, 41, 29), max_pixels=MAX_PIXELS)
    assert (p.width, p.height) == (41, 29)
    with pytest.raises(RejectError) as e:
        probe_image(photo(rng, 40, 30), max_pixels=100)
    assert e.value.reason == "too_large"


def test_decode_jpegs_retries_one_by_one(monkeypatch):
    """One member the device refuses costs only itself: the batch is retried image by image."""
    import kdcache.shards.gpudecode as gd

    rng = np.random.default_rng(2)
    good = [photo(rng, 30, 20), photo(rng, 20, 30)]
    bad = b"\xff\xd8\xff" + b"\x00" * 40 + b"\xff\xd9"
    out = gd.decode_jpegs([good[0], bad, good[1]], device="cpu")
    assert out[1] is None and out[0].shape == (3, 20, 30) and out[2].shape == (3, 30, 20)


@pytest.fixture
def mixed_shard(tmp_path) -> tuple[str, list[str]]:
    """One shard of every kind of member: RGB and greyscale JPEGs (device), PNG, WebP and CMYK JPEG (PIL)."""
    rng = np.random.default_rng(3)
    kinds = [("jpg", "JPEG", "RGB"), ("png", "PNG", "RGB"), ("jpg", "JPEG", "L"), ("webp", "WEBP", "RGB"),
             ("jpg", "JPEG", "CMYK"), ("jpg", "JPEG", "RGB")]
    members, keys = [], []
    for i, (ext, fmt, mode) in enumerate(kinds):
        key = f"s{i:03d}"
        keys.append(key)
        members += [(f"{key}.{ext}", photo(rng, 70 + 9 * i, 60 + 5 * i, fmt=fmt, mode=mode)),
                    (f"{key}.txt", f"picture {i}".encode())]
    return write_tar(tmp_path / "mixed-00000.tar", members), keys


def _status(out) -> dict:
    return dict(zarr.open_group(str(out), mode="r")[f"{schema.STATUS}/images-00000"].attrs)


def _arrays(out) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(out), mode="r")["images/00000"]
    return {k: g[k][...] for k in ("emb", "valid", "view_box", "view_flip", "src_size", "key")}


def test_build_falls_back_to_pil_per_sample(tmp_path, mixed_shard, teacher_spec):
    """Non-JPEG and CMYK members are decoded by PIL, per sample and counted; every row is cached; the records are the
    --decode cpu build's; PIL rows embed as in the CPU build, device rows within cos 0.999."""
    shard, keys = mixed_shard
    common = dict(teacher=teacher_spec, images=(shard,), views=3, batch_size=4, embed_dtype="fp32")
    build_cache(tmp_path / "cpu.zarr", **common)
    r = build_cache(tmp_path / "gpu.zarr", decode="gpu", decode_device="cpu", **common)
    assert r.ok and r.summary["this_run"]["decoded_on_device"] == 3 and r.summary["this_run"]["decoded_by_pil"] == 3
    assert _status(tmp_path / "gpu.zarr")["decode"] == {"device": 3, "pil": {"jpeg_mode": 1, "not_jpeg": 2}}
    assert "decode" not in _status(tmp_path / "cpu.zarr")
    cpu, gpu = _arrays(tmp_path / "cpu.zarr"), _arrays(tmp_path / "gpu.zarr")
    for k in ("valid", "view_box", "view_flip", "src_size", "key"):
        assert (cpu[k] == gpu[k]).all(), k
    assert gpu["valid"].all()
    cos = (cpu["emb"].astype(np.float32) * gpu["emb"].astype(np.float32)).sum(-1)  # [rows, views]
    pil_rows = [1, 3, 4]
    assert cos[pil_rows].min() > 0.99999
    assert cos.min() >= 0.999


def test_device_refusal_falls_back_then_rejects(tmp_path, mixed_shard, teacher_spec, monkeypatch):
    """A JPEG the device refuses at decode time is decoded by PIL (counted nvjpeg_error); one PIL refuses too becomes
    that row's reject, with PIL's reason; the other rows are unaffected."""
    import kdcache.shards.gpudecode as gv  # where the build's device decode and its PIL fallback live

    shard, keys = mixed_shard
    real_decode, real_pil = gv.decode_jpegs, gv.decode_image
    members = {}
    import tarfile
    with tarfile.open(shard) as t:
        for m in t.getmembers():
            members[m.name] = t.extractfile(m).read()
    refuse = {members["s000.jpg"], members["s005.jpg"]}
    pil_refuses = members["s005.jpg"]

    def device(datas, *, device):
        out = real_decode(datas, device=device)
        return [None if d in refuse else x for d, x in zip(datas, out, strict=True)]

    def pil(data, **kw):
        if data == pil_refuses:
            raise RejectError("undecodable", "broken on purpose")
        return real_pil(data, **kw)

    monkeypatch.setattr(gv, "decode_jpegs", device)
    monkeypatch.setattr(gv, "decode_image", pil)
    common = dict(teacher=teacher_spec, images=(shard,), views=2, batch_size=3, embed_dtype="fp32")
    build_cache(tmp_path / "ref.zarr", **common)
    r = build_cache(tmp_path / "gpu.zarr", decode="gpu", decode_device="cpu", **common)
    st = _status(tmp_path / "gpu.zarr")
    assert st["decode"] == {"device": 1, "pil": {"jpeg_mode": 1, "not_jpeg": 2, "nvjpeg_error": 1}}
    assert st["rejected"] == {"undecodable": 1} and st["rejects"][0]["key"] == "s005"
    assert r.summary["images"] == 5
    a, ref = _arrays(tmp_path / "gpu.zarr"), _arrays(tmp_path / "ref.zarr")
    assert a["valid"].tolist() == [True] * 5 + [False]
    assert np.isnan(a["emb"][5].astype(np.float32)).all() and (a["view_box"][5] == 0).all()
    # s000 fell back to PIL: exactly the CPU build's pixels
    assert (a["emb"][0] * ref["emb"][0]).sum(-1).min() > 0.99999


def test_decoder_is_recorded_and_resume_refuses_another(tmp_path, shards, teacher_spec):
    out = tmp_path / "c.zarr"
    build_cache(out, teacher=teacher_spec, images=tuple(shards[:1]), decode="gpu", decode_device="cpu", limit=4)
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)[schema.ROOT_ATTR]
    assert attrs["build"]["decode"] == "gpu" and "torchvision" in attrs["versions"]
    with pytest.raises(BuildError, match=r"--resume refused: build changed \(decode: cache has 'gpu', now 'cpu'\)"):
        build_cache(out, teacher=teacher_spec, images=tuple(shards[:1]), resume=True, limit=4)
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards[:1]), decode="gpu", decode_device="cpu",
                       resume=True, limit=4).ok
    cpu = tmp_path / "cpu.zarr"
    build_cache(cpu, teacher=teacher_spec, images=tuple(shards[:1]), limit=2)
    assert dict(zarr.open_group(str(cpu), mode="r").attrs)[schema.ROOT_ATTR]["build"]["decode"] == "cpu"


def test_resume_of_a_cache_from_before_decode_counts_as_cpu(tmp_path, shards, teacher_spec):
    out = tmp_path / "old.zarr"
    build_cache(out, teacher=teacher_spec, images=tuple(shards[:1]), limit=2)
    g = zarr.open_group(str(out), mode="r+")
    attrs = dict(g.attrs)[schema.ROOT_ATTR]
    del attrs["build"]["decode"]  # as a cache written before --decode existed
    g.attrs[schema.ROOT_ATTR] = attrs
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards[:1]), resume=True, limit=2).ok
    with pytest.raises(BuildError, match="decode: cache has 'cpu', now 'gpu'"):
        build_cache(out, teacher=teacher_spec, images=tuple(shards[:1]), resume=True, limit=2, decode="gpu",
                    decode_device="cpu")


def test_gpu_decode_refuses_mixed_views(tmp_path, shards, teacher_spec):
    with pytest.raises(BuildError, match="--decode gpu does not render mixed views"):
        build_cache(tmp_path / "m.zarr", teacher=teacher_spec, images=tuple(shards[:1]), views=2,
                    augment="mix=mixup:0.2", decode="gpu", decode_device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given without CUDA")
@pytest.mark.parametrize("device, says", [("cuda", "--decode gpu needs CUDA"), ("cpu", "give --device cuda")])
def test_cli_decode_gpu_without_cuda_is_one_clear_line(tmp_path, shards, teacher_spec, device, says):
    out = tmp_path / "c.zarr"
    r = CliRunner().invoke(cli, ["build", "--images", shards[0], "--teacher", teacher_spec, "--out", str(out),
                                 "--decode", "gpu", "--device", device, "--no-progress"])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and says in lines[0], r.output
    assert not out.exists()


def test_student_replays_a_gpu_decoded_cache_with_pil_and_says_so_once(tmp_path, shards, teacher_spec, caplog):
    from kdcache.cache.reader import open_cache
    from kdcache.train import rows

    out = tmp_path / "c.zarr"
    build_cache(out, teacher=teacher_spec, images=tuple(shards[:1]), decode="gpu", decode_device="cpu", limit=2)
    cache = open_cache(str(out))
    with caplog.at_level("INFO", logger="kdcache.train.rows"):
        rows.note_decoder(cache)
        rows.note_decoder(cache)
    notes = [r for r in caplog.records if "--decode gpu" in r.getMessage()]
    assert len(notes) == 1 and "replays its views with PIL" in notes[0].getMessage()


def test_gpu_check_dry_run_exercises_its_cpu_helpers(tmp_path):
    """bench/gpu_check.py cannot run here; its --dry-run runs the GPU-decode part's helpers on the CPU."""
    path = Path(__file__).parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--dry-run", "--out", str(tmp_path / "r.json"), "--n-images", "16"])
    d = res["gpu_decode"]
    assert d["fidelity"]["views"] == 32 and 0.99 <= d["fidelity"]["min_cos"] <= 1.0
    # replayed as a CUDA student replays it (the build's own decode and rendering): the teacher's pixels
    assert d["replay_fidelity"]["views"] == 32 and d["replay_fidelity"]["min_cos"] > 0.99999
    ph = d["phases"]  # each phase of a device-decoded batch timed alone (numbers mean nothing on this CPU)
    assert ph["batches"] == 3 and set(ph["ms_per_batch"]) == {"decode", "render", "forward", "to_host"}
    assert ph["img_s_if_serial"] <= ph["img_s_if_overlapped"]
    assert set(d["build_img_s"]) == {"gpu", "gpu_inline", "cpu"} and min(d["build_img_s"].values()) > 0
    assert json.loads((tmp_path / "r.json").read_text())["gpu_decode"]["dry_run"] is True


def test_gpu_check_part_4_takes_real_shards_a_teacher_and_a_limit(tmp_path):
    """The fidelity target is on real photos: --images/--teacher/--limit replace the synthetic JPEGs and the default
    teacher in part 4 (here: two synthetic shards standing in for real ones, the first 5 images, 2 views each)."""
    from kdcache.quickstart import tiny_teacher_path
    from kdcache.synth import write_image_shards

    path = Path(__file__).parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shards = [str(s) for s in write_image_shards(tmp_path / "s", n_shards=2, per_shard=4, seed=3)]
    teacher = tiny_teacher_path()
    res = mod.main(["--dry-run", "--out", str(tmp_path / "r.json"), "--images", *shards, "--teacher", teacher,
                    "--limit", "5"])["gpu_decode"]
    assert res["fidelity"]["views"] == 10 and 0.99 <= res["fidelity"]["min_cos"] <= 1.0
    assert res["replay_fidelity"]["views"] == 10 and res["replay_fidelity"]["min_cos"] > 0.99999
    assert res["images"] == shards and res["teacher"] == teacher and res["limit"] == 5
    assert "first 5" in res["note"] and "libjpeg" in res["note"]


@pytest.mark.parametrize("decode", ["gpu", "cpu"], ids=["nvjpeg-cache", "pil-cache"])  # an id "gpu" means CUDA
def test_a_row_pil_cannot_replay_names_the_decoder_and_the_way_around(tmp_path, shards, teacher_spec, decode):
    """A row the build accepted whose image PIL now refuses (nvjpeg takes some bytes PIL refuses; or the shard was
    rewritten): training stops with one line that names the key, says why for this cache's decoder and how to train
    without it, and that way works. Here the shard is rewritten with the same keys and one image's bytes spoiled."""
    import tarfile

    from kdcache.train.config import TrainConfig
    from kdcache.train.dataspec import DataError
    from kdcache.train.loop import run as train

    shard = tmp_path / "s.tar"
    shard.write_bytes(Path(shards[0]).read_bytes())
    out = tmp_path / "c.zarr"
    build_cache(out, teacher=teacher_spec, images=(str(shard),), decode=decode, limit=4,
                **({"decode_device": "cpu"} if decode == "gpu" else {}))
    with tarfile.open(shards[0]) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
    first_image = next(m.name for m, _ in members if m.name.endswith((".jpg", ".png")))
    with tarfile.open(shard, "w") as dst:
        for m, data in members:
            data = b"\xff\xd8\xff\xe0 not a picture" if m.name == first_image else data
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    key = first_image.rsplit(".", 1)[0]
    with pytest.raises(DataError) as e:
        train(TrainConfig(cache=str(out), tower="image", student="kdc-tiny-image", out=str(tmp_path / "run"),
                          max_steps=2, batch_size=4, threads=1, progress=False, val_fraction=0.0))
    msg = str(e.value)
    assert f"(key {key!r})" in msg and f"--exclude '{key}' trains without it" in msg, msg
    assert ("nvjpeg (--decode gpu)" in msg) == (decode == "gpu") and "rewritten" in msg
    # the way around it works: the same run without that key trains to the end
    from kdcache.subset import Subset

    res = train(TrainConfig(cache=str(out), tower="image", student="kdc-tiny-image", out=str(tmp_path / "run2"),
                            max_steps=2, batch_size=3, threads=1, progress=False, val_fraction=0.0,
                            subset=Subset(exclude=(key,))))
    assert res.steps == 2
