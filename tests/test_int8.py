"""int8 embedding storage (`--embed-dtype int8`): what a reader gets back is the teacher's output to within 0.999
cosine, zero-shot predictions do not move, verify sees through it, training works on it, and 1.0 caches still open."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from conftest import build_cache
from PIL import Image

from kdcache.cache import schema
from kdcache.cache.reader import open_cache
from kdcache.cache.verify import info, verify
from kdcache.cli.main import cli

DTYPES = ("fp32", "fp16", "int8")


def _jpg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_spec, shards, classes_file) -> dict[str, str]:
    """The same data (3 shards, a shard with rejected rows, a caption corpus) built with each embed dtype."""
    from kdcache.synth import write_captions, write_tar

    d = tmp_path_factory.mktemp("int8")
    bad = write_tar(d / "bad.tar", [
        ("b000.jpg", _jpg((200, 30, 30))), ("b000.txt", b"a photo of a red square."),
        ("b001.jpg", b"<html>Not found</html>"),                  # rejected: its row stays unwritten
        ("b002.jpg", _jpg((30, 30, 200))), ("b002.txt", b"a photo of a blue circle."),
    ])
    caps = write_captions(d / "caps.jsonl", "jsonl", n=12, seed=2)
    out = {}
    for dt in DTYPES:
        out[dt] = str(d / f"{dt}.zarr")
        res = build_cache(out[dt], teacher=teacher_spec, images=(*shards, bad), captions=(caps,), views=2,
                          classes=classes_file, embed_dtype=dt)
        assert res.ok, res.summary
    return out


def _embeddings(path: str) -> dict[str, np.ndarray]:
    """Every embedding vector of a cache as the reader returns it, keyed 'unit/array', views flattened."""
    c = open_cache(path)
    out = {}
    for u in c.units():
        names = schema.EMBEDDING_ARRAYS if u.kind == schema.IMAGES else ("emb",)
        for name, arr in c.read(u, names).items():
            out[f"{u.name}/{name}"] = arr.reshape(-1, arr.shape[-1])
    return out


def test_quantiser_error_is_within_half_a_step_and_unwritten_is_nan():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[3] = np.nan                                     # a non-finite output is stored as unwritten, not as a vector
    q = schema.encode_embeddings(x, "int8")
    assert q.dtype == np.int8 and (q[3] == schema.INT8_UNWRITTEN).all()
    ok = np.arange(len(x)) != 3
    s = np.abs(x[ok]).max(axis=1, keepdims=True)
    assert (np.abs(q[ok]).max(axis=1) == schema.INT8_MAX).all()
    assert (np.abs(q[ok] * s / schema.INT8_MAX - x[ok]) <= s / 254 + 1e-7).all()   # half a quantisation step
    y = schema.decode_embeddings(q)
    assert y.dtype == np.float32 and np.isnan(y[3]).all()
    assert np.abs(np.linalg.norm(y[ok], axis=1) - 1).max() < 1e-6
    assert (np.sum(y[ok] * x[ok], axis=1) >= np.sqrt(1 - 64 * s[:, 0] ** 2 / 254**2) - 1e-6).all()
    half = q[5].copy()
    half[:10] = schema.INT8_UNWRITTEN                 # a partly unwritten row is not a vector
    assert np.isnan(schema.decode_embeddings(half)).all()


def test_schema_specs_for_int8():
    img = schema.image_arrays(views=2, dim=8, topk=3, embed_dtype="int8")
    cap = schema.caption_arrays(dim=8, embed_dtype="int8")
    for spec in (img["emb"], img["caption_emb"], cap["emb"]):
        assert np.dtype(spec.dtype) == np.int8 and spec.fill == schema.INT8_UNWRITTEN
    assert np.dtype(schema.image_arrays(views=2, dim=8, topk=3, embed_dtype="fp16")["emb"].dtype) == np.float16
    with pytest.raises(ValueError, match="int8"):
        schema.caption_arrays(dim=8, embed_dtype="int4")


def test_capability_and_version_are_recorded(caches):
    c8, c16 = open_cache(caches["int8"]), open_cache(caches["fp16"])
    assert c8.attrs["schema_version"] == schema.SCHEMA_VERSION == "1.4"
    assert schema.CAP_INT8 in c8.capabilities and c8.attrs["build"]["embed_dtype"] == "int8"
    assert schema.CAP_INT8 not in c16.capabilities
    u = c8.units(schema.IMAGES)[0]
    assert c8.read(u, ["emb"], raw=True)["emb"].dtype == np.int8
    assert c8.read(u, ["emb"])["emb"].dtype == np.float32


def test_int8_matches_fp32_and_fp16_to_0999_cosine(caches):
    e32, e16, e8 = (_embeddings(caches[dt]) for dt in DTYPES)
    assert sorted(e8) == sorted(e32)
    n = 0
    for k, x8 in e8.items():
        x32, x16 = e32[k].astype(np.float32), e16[k].astype(np.float32)
        written = np.isfinite(x32).all(axis=1)
        assert (np.isnan(x8).all(axis=1) == ~written).all(), f"{k}: NaN rows differ from the fp32 cache's"
        if written.any():
            assert np.sum(x8[written] * x32[written], axis=1).min() >= 0.999, k
            cos16 = np.sum(x8[written] * x16[written], axis=1) / np.linalg.norm(x16[written], axis=1)
            assert cos16.min() >= 0.999, k
            n += int(written.sum())
    assert n >= 3 * 10 * 2 + 2 * 2 + 12   # every view, paired caption and corpus row was compared


def test_zero_shot_predictions_do_not_move(caches):
    c32, c8 = open_cache(caches["fp32"]), open_cache(caches["int8"])
    head = c8.vocab()[2]
    assert (head == c32.vocab()[2]).all()
    agree = total = 0
    for u32, u8 in zip(c32.units(schema.IMAGES), c8.units(schema.IMAGES), strict=True):
        a32, a8 = c32.read(u32, ["emb", "valid"]), c8.read(u8, ["emb", "valid", "topk_idx"])
        v = a8["valid"]
        p32, p8 = (a32["emb"][v] @ head.T).argmax(-1), (a8["emb"][v] @ head.T).argmax(-1)
        agree += int((p8 == p32).sum())
        total += p8.size
        assert (p8 == a8["topk_idx"][v][..., 0]).all()   # and they agree with the teacher's own top-1
    assert total == (30 + 2) * 2 and agree == total


def test_info_counts_int8_bytes(caches):
    i16, i8 = info(caches["fp16"]), info(caches["int8"])
    elements = sum(v.size for v in _embeddings(caches["int8"]).values())
    assert i16["bytes_raw"] - i8["bytes_raw"] == elements   # one byte per component instead of two
    assert i8["bytes_on_disk"] < i16["bytes_on_disk"] and i8["compression_ratio"] > 0


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_verify_passes_on_int8(caches):
    rep = verify(caches["int8"], progress=False)
    assert rep.ok, rep.problems


def test_verify_catches_a_flipped_byte_in_an_int8_chunk(tmp_path, caches):
    bad = _copy(caches["int8"], tmp_path / "flip.zarr")
    unit = open_cache(str(bad)).units(schema.IMAGES)[1]
    chunk = next(p for p in (bad / unit.data_path / "emb").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    r = CliRunner().invoke(cli, ["verify", str(bad), "--no-progress"])
    assert r.exit_code == 1 and f"{unit.data_path}/emb" in r.output and "cannot be decoded" in r.output


def test_verify_catches_codes_that_decoding_would_hide(tmp_path, caches):
    """Checksummed but wrong: a valid vector rescaled (decodes to the same kind of unit vector), a rejected row
    partly overwritten (decodes to NaN like an unwritten one)."""
    bad = _copy(caches["int8"], tmp_path / "codes.zarr")
    c = open_cache(str(bad))
    unit = c.units(schema.IMAGES)[-1]                  # the shard with rejected row 1
    g = zarr.open_group(str(bad / unit.data_path), mode="r+")
    emb = g["emb"][...]
    emb[0, 1] = (emb[0, 1] // 2).astype(np.int8)
    emb[1, 0, :3] = 5
    g["emb"][...] = emb
    problems = " | ".join(verify(str(bad), progress=False).problems)
    assert "rows [0] are not int8-quantised vectors" in problems
    assert "rows [1] are rejected/empty but partly hold values" in problems


def test_verify_catches_a_valid_row_left_unwritten(tmp_path, caches):
    bad = _copy(caches["int8"], tmp_path / "hole.zarr")
    unit = open_cache(str(bad)).units(schema.CAPTIONS)[0]
    arr = zarr.open_array(str(bad / unit.data_path / "emb"), mode="r+")
    rows = arr[...]
    rows[4] = schema.INT8_UNWRITTEN
    arr[...] = rows
    problems = verify(str(bad), progress=False).problems
    assert any("rows [4] are valid but not finite" in p for p in problems), problems


def _first_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("tower,student,terms", [("image", "kdc-tiny-image", ()),  # the default: cosine + kl
                                                  ("text", "kdc-tiny-text", (("cosine", 1.0), ("l1", 1.0)))])
def test_training_on_int8_matches_fp32(tmp_path, caches, tower, student, terms):
    """Same student, seed and data: the losses track the fp32 cache's. Each tower has a term that sees the teacher
    vector's length (kl, l1), so a reader handing out raw codes would fail this."""
    from kdcache.train.config import TrainConfig
    from kdcache.train.loop import run

    losses = {}
    for dt in ("fp32", "int8"):
        res = run(TrainConfig(cache=caches[dt], tower=tower, student=student, out=str(tmp_path / dt), max_steps=3,
                              batch_size=8, progress=False, threads=1, losses=terms))
        assert res.steps == 3
        losses[dt] = _first_losses(tmp_path / dt)
    assert len(losses["int8"]) == 3 and np.isfinite(losses["int8"]).all()
    np.testing.assert_allclose(losses["int8"], losses["fp32"], rtol=2e-2)


def test_a_1_0_cache_still_opens(tmp_path, caches):
    old = _copy(caches["fp16"], tmp_path / "old.zarr")
    root = zarr.open_group(str(old), mode="r+")
    attrs = dict(root.attrs[schema.ROOT_ATTR])
    root.attrs[schema.ROOT_ATTR] = {**attrs, "schema_version": "1.0"}
    c = open_cache(str(old))
    assert c.attrs["schema_version"] == "1.0"
    d = c.read(c.units(schema.IMAGES)[0], ["emb", "valid"])
    assert d["emb"].dtype == np.float16 and np.isfinite(d["emb"][d["valid"]]).all()
    assert verify(str(old), progress=False).ok
    assert info(str(old))["schema_version"] == "1.0"


def test_cli_builds_int8(tmp_path, teacher_spec, shards):
    out = tmp_path / "cli.zarr"
    r = CliRunner().invoke(cli, ["build", "--teacher", teacher_spec, "--images", shards[0], "--out", str(out),
                                 "--embed-dtype", "int8", "--no-progress", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert schema.CAP_INT8 in open_cache(str(out)).capabilities
    r = CliRunner().invoke(cli, ["info", str(out)])
    assert r.exit_code == 0 and "stored as int8" in r.output and "int8_embeddings" in r.output


def test_readers_refuse_a_required_capability_they_do_not_know(tmp_path, teacher_spec, shards):
    import zarr

    from kdcache.cache.reader import CacheError, open_cache

    out = tmp_path / "req.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards[:1]), embed_dtype="int8").ok
    assert open_cache(str(out)).attrs["required_capabilities"] == ["int8_embeddings"]
    root = zarr.open_group(str(out), mode="r+")
    attrs = dict(root.attrs)["kdcache"]
    attrs["required_capabilities"] = ["int8_embeddings", "int4_embeddings_from_the_future"]
    root.attrs["kdcache"] = attrs
    with pytest.raises(CacheError, match="int4_embeddings_from_the_future"):
        open_cache(str(out))
