"""Reading shards and caption corpora: grouping, truncation, rejects, image modes, caption formats, synthetic data."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdcache.cache.captions import CaptionRow, count_caption_records, iter_caption_records, parse_caption_spec
from kdcache.shards import (
    RawSample,
    Reject,
    RejectError,
    ShardReport,
    decode_image,
    expand_urls,
    iter_shard,
    parse_sample,
    to_rgb,
)
from kdcache.synth import write_captions, write_image_shards, write_tar

MAX_PIXELS = 10_000_000


def _enc(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _jpg(color=(200, 30, 30), size=(16, 12)) -> bytes:
    return _enc(Image.new("RGB", size, color), "JPEG")


def _read(path) -> tuple[list[RawSample], ShardReport]:
    report = ShardReport(url=str(path))
    return list(iter_shard(str(path), report)), report


def _parse(members: dict[str, bytes], **kw):
    kw.setdefault("max_pixels", MAX_PIXELS)
    return parse_sample(RawSample("k", 0, members), **kw)


def _reason(members: dict[str, bytes], problem: str | None = None, **kw) -> str:
    kw.setdefault("max_pixels", MAX_PIXELS)
    with pytest.raises(RejectError) as e:
        parse_sample(RawSample("k", 0, members, problem), **kw)
    return e.value.reason


def _sha(path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Grouping


def test_members_group_by_key_in_any_order_with_positions(tmp_path):
    members = [
        ("a.txt", b"first"), ("a.jpg", b"A"), ("a.cls", b"1"),
        ("__index__", b"meta, skipped"),
        ("b.JPG", b"B"), ("b.seg.png", b"S"), ("b.json", b"{}"),
        ("noext", b"skipped like webdataset does"),
        ("dir/c.cls", b"2"), ("dir/c.jpg", b"C"),
    ]
    samples, report = _read(write_tar(tmp_path / "s.tar", members))
    assert [(s.key, s.position, s.problem) for s in samples] == [("a", 0, None), ("b", 1, None), ("dir/c", 2, None)]
    assert samples[0].members == {"txt": b"first", "jpg": b"A", "cls": b"1"}
    assert samples[1].members == {"jpg": b"B", "seg.png": b"S", "json": b"{}"}
    assert report.samples == 3 and not report.truncated and report.error is None


def test_key_reappearing_later_is_a_split_sample(tmp_path):
    members = [("a.jpg", _jpg()), ("b.jpg", _jpg()), ("a.txt", b"late caption"),
               ("c.jpg", _jpg()), ("c.jpg", _jpg())]  # a member repeated inside a run starts a new run too
    samples, _ = _read(write_tar(tmp_path / "s.tar", members))
    assert [(s.key, s.position, s.problem) for s in samples] == [
        ("a", 0, None), ("b", 1, None), ("a", 2, "split_sample"), ("c", 3, None), ("c", 4, "split_sample")]
    assert samples[2].members == {"txt": b"late caption"}
    assert parse_sample(samples[0], max_pixels=MAX_PIXELS).caption is None
    with pytest.raises(RejectError) as e:
        parse_sample(samples[4], max_pixels=MAX_PIXELS)
    assert e.value.reason == "split_sample"


class _SideEffect:
    """Unpickling this touches a file: the way to tell whether anything deserialized a member."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_members_are_never_deserialized(tmp_path):
    control, marker = tmp_path / "control", tmp_path / "unpickled"
    pickle.loads(pickle.dumps(_SideEffect(control)))
    assert control.exists(), "the payload must really have a side effect, or this test proves nothing"
    payload = pickle.dumps(_SideEffect(marker))
    members = [("a.pyd", payload), ("a.jpg", _jpg()), ("a.pickle", payload), ("a.pth", payload)]
    samples, _ = _read(write_tar(tmp_path / "s.tar", members))
    sample = parse_sample(samples[0], max_pixels=MAX_PIXELS)
    assert samples[0].members["pyd"] == payload and sample.image.size == (16, 12)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Truncation and digests


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    return write_image_shards(tmp_path_factory.mktemp("shard"), n_shards=1, per_shard=6, seed=3)[0]


def _members(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def _cut(src, dst: Path, nbytes: int) -> Path:
    dst.write_bytes(Path(src).read_bytes()[:nbytes])
    return dst


def test_intact_shard_digest_covers_every_byte(shard):
    samples, report = _read(shard)
    assert len(samples) == report.samples == 6
    assert not report.truncated and report.error is None
    assert report.digest == _sha(shard)
    assert all(s.problem is None and set(s.members) == {"jpg", "cls", "txt"} for s in samples)


def test_cut_inside_a_member_keeps_complete_samples(shard, tmp_path):
    img3 = [m for m in _members(shard) if m.name.endswith(".jpg")][3]
    bad = _cut(shard, tmp_path / "cut.tar", img3.offset_data + img3.size // 2)
    samples, report = _read(bad)
    good, _ = _read(shard)
    assert [s.members for s in samples[:3]] == [s.members for s in good[:3]]
    assert [s.problem for s in samples] == [None, None, None, "incomplete"]
    assert samples[3].key == good[3].key and samples[3].members == {}
    assert report.truncated and "unexpected end of data" in report.error and img3.name in report.error
    assert report.digest == _sha(bad)
    with pytest.raises(RejectError) as e:
        parse_sample(samples[3], max_pixels=MAX_PIXELS)
    assert e.value.reason == "incomplete_sample"


def test_incomplete_sample_with_its_image_read_is_kept(shard, tmp_path):
    txt2 = [m for m in _members(shard) if m.name.endswith(".txt")][2]
    samples, report = _read(_cut(shard, tmp_path / "cut.tar", txt2.offset_data + 3))
    assert report.truncated and [s.problem for s in samples] == [None, None, "incomplete"]
    assert set(samples[2].members) == {"jpg", "cls"}  # the txt was being read at the cut
    kept = parse_sample(samples[2], max_pixels=MAX_PIXELS)
    assert kept.caption is None and kept.label is not None


def test_cut_at_a_block_boundary_is_detected(shard, tmp_path):
    infos = _members(shard)
    img3 = [m for m in infos if m.name.endswith(".jpg")][3]
    # tarfile itself reads these silently as shorter archives.
    with tarfile.open(_cut(shard, tmp_path / "silent.tar", img3.offset), mode="r|") as tf:
        assert sum(1 for _ in tf) == 9
    samples, report = _read(tmp_path / "silent.tar")
    good, _ = _read(shard)
    assert [s.members for s in samples] == [s.members for s in good[:3]]
    assert all(s.problem is None for s in samples)
    assert report.truncated and "block boundary" in report.error
    assert report.digest == _sha(tmp_path / "silent.tar")


@pytest.mark.parametrize("zero_blocks, truncated", [(0, True), (1, True), (2, False)])
def test_end_of_archive_needs_two_zero_blocks(shard, tmp_path, zero_blocks, truncated):
    last = _members(shard)[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    samples, report = _read(_cut(shard, tmp_path / "end.tar", end + 512 * zero_blocks))
    assert len(samples) == 6 and all(s.problem is None for s in samples)
    assert report.truncated is truncated


def test_damaged_header_mid_shard_is_reported(shard, tmp_path):
    img2 = [m for m in _members(shard) if m.name.endswith(".jpg")][2]
    data = bytearray(Path(shard).read_bytes())
    data[img2.offset:img2.offset + 512] = b"garbage!" * 64  # tarfile stops here without an error
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    samples, report = _read(tmp_path / "bad.tar")
    assert len(samples) == 2 and report.truncated and "non-zero bytes" in report.error


@pytest.mark.parametrize("content, why", [
    (b"", "empty file"),
    (b"<html>404 Not Found</html>" * 40, "invalid header"),
    (gzip.compress(b"a gzipped text file" * 40, mtime=0), "invalid header"),
    (b"\x1f\x8b\x08garbage", "compressed file ended"),
])
def test_empty_or_non_tar_file_is_an_error_not_an_exception(tmp_path, content, why):
    (tmp_path / "x.tar").write_bytes(content)
    samples, report = _read(tmp_path / "x.tar")
    assert samples == [] and report.truncated and why.lower() in report.error.lower()
    assert report.digest == _sha(tmp_path / "x.tar")


def test_missing_shard_is_reported(tmp_path):
    samples, report = _read(tmp_path / "nope.tar")
    assert samples == [] and report.truncated and "cannot open" in report.error


def test_gzipped_shard_intact_and_cut(shard, tmp_path):
    gz = gzip.compress(Path(shard).read_bytes(), mtime=0)
    (tmp_path / "s.tar.gz").write_bytes(gz)
    samples, report = _read(tmp_path / "s.tar.gz")
    assert len(samples) == 6 and not report.truncated and report.digest == _sha(tmp_path / "s.tar.gz")
    # Cut in the gzip trailer: every sample decompressed, yet the file is damaged.
    samples, report = _read(_cut(tmp_path / "s.tar.gz", tmp_path / "c.tar.gz", len(gz) - 5))
    assert len(samples) == 6 and report.truncated and "Compressed file ended" in report.error


# ---------------------------------------------------------------------------------------------------------------
# Samples and rejects


def test_caption_label_and_image_preference():
    s = _parse({"png": _enc(Image.new("RGB", (4, 4), (0, 0, 255))), "jpg": _jpg((250, 0, 0)),
                "txt": b"  a red square \n", "cls": b" 2\n", "json": b'{"caption": "unused"}'})
    assert s.caption == "a red square" and s.label == 2 and s.image.mode == "RGB"
    assert s.image.getpixel((2, 2))[0] > 200  # the jpg, first in IMAGE_EXTS
    assert _parse({"jpg": _jpg(), "json": b'{"caption": " from json ", "url": "x"}'}).caption == "from json"
    assert _parse({"jpg": _jpg(), "txt": b"  ", "json": b'{"caption": "json"}'}).caption == "json"
    assert _parse({"jpg": _jpg(), "txt": b""}).caption is None
    assert _parse({"jpg": _jpg(), "json": b'{"caption": 5}'}).caption is None
    assert _parse({"webp": _enc(Image.new("RGB", (5, 3), "green"), "WEBP")}).image.size == (5, 3)


@pytest.mark.parametrize("members, problem, reason", [
    ({"txt": b"x"}, "incomplete", "incomplete_sample"),
    ({"jpg": _jpg()}, "split_sample", "split_sample"),
    ({"txt": b"caption without image", "seg.png": b"x"}, None, "no_image"),
    ({"jpg": b""}, None, "empty_image"),
    ({"jpg": _jpg()[:200]}, None, "undecodable"),
    ({"jpg": b"<html><body>Not found</body></html>"}, None, "undecodable"),
    ({"png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"}, None, "undecodable"),  # EPS would run gs
    ({"jpg": _jpg(), "cls": b"cat"}, None, "bad_label"),
    ({"jpg": _jpg(), "cls": b"1.5"}, None, "bad_label"),
    ({"jpg": _jpg(), "cls": b"-3"}, None, "bad_label"),
    ({"jpg": _jpg(), "json": b"{not json"}, None, "bad_json"),
    ({"jpg": _jpg(), "json": b"[1, 2]"}, None, "bad_json"),
    ({"jpg": _jpg(), "txt": b"caf\xe9"}, None, "bad_text"),
])
def test_reject_reasons(members, problem, reason):
    assert _reason(members, problem) == reason


def test_undecodable_detail_is_pils_message_without_addresses():
    with pytest.raises(RejectError) as e:
        decode_image(_jpg()[:200], max_pixels=MAX_PIXELS)
    assert e.value.reason == "undecodable" and "truncated" in e.value.detail.lower()
    with pytest.raises(RejectError) as e:
        decode_image(b"<html>Not found</html>", max_pixels=MAX_PIXELS)
    # The detail lands in the cache's reject manifest, which must be identical across identical builds.
    assert e.value.detail == "UnidentifiedImageError: cannot identify image file"


def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels but holds almost nothing: only a header check can reject it cheaply."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_too_large_is_checked_from_the_header():
    pil_limit = Image.MAX_IMAGE_PIXELS
    assert _reason({"jpg": _jpg(size=(40, 30))}, max_pixels=1199) == "too_large"
    assert _parse({"jpg": _jpg(size=(40, 30))}, max_pixels=1200).image.size == (40, 30)
    # Beyond PIL's own limits (a warning above 1x, an error above 2x): still a clean too_large, never a warning,
    # and decided from the header: decoding these would need gigabytes.
    assert _reason({"png": _png_header(10_000, 10_000)}, max_pixels=pil_limit) == "too_large"
    assert _reason({"png": _png_header(100_000, 100_000)}, max_pixels=pil_limit) == "too_large"
    assert Image.MAX_IMAGE_PIXELS == pil_limit


def test_a_limit_above_pils_is_the_one_that_applies(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # stands in for PIL's 89 Mpx default, at test scale
    data = _jpg(size=(40, 30))
    assert decode_image(data, max_pixels=5000).size == (40, 30)  # PIL alone would refuse 1200 > 2 x 500
    with pytest.raises(RejectError) as e:
        decode_image(data, max_pixels=1100)
    assert e.value.reason == "too_large" and "1200" in e.value.detail
    assert Image.MAX_IMAGE_PIXELS == 500


# ---------------------------------------------------------------------------------------------------------------
# Image modes


def test_16bit_png_is_scaled_not_saturated():
    grad = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    data = _enc(Image.frombytes("I;16", (64, 8), grad.astype("<u2").tobytes()))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[..., 0] == 255).mean() > 0.9  # PIL saturates
    out = np.asarray(decode_image(data, max_pixels=MAX_PIXELS)).astype(int)
    assert out.shape == (8, 64, 3) and (out[..., 0] == out[..., 2]).all()
    assert np.abs(out[..., 0] - np.round(grad / 257)).max() <= 1
    assert out.min() == 0 and out.max() == 255


def test_16bit_big_endian_tiff():
    grad = np.array([[0, 257, 32896, 65535]], np.uint16)
    data = _enc(Image.frombytes("I;16B", (4, 1), grad.astype(">u2").tobytes()), "TIFF")
    assert np.asarray(decode_image(data, max_pixels=MAX_PIXELS))[0, :, 1].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize("values, expected", [
    ([0, 100, 200, 255], [0, 100, 200, 255]),                 # 8-bit range stored as int32: as is
    ([0, 257, 32896, 65535], [0, 1, 128, 255]),               # 16-bit range: scaled like I;16
    ([-1000, 0, 1000, 3000], [0, 64, 128, 255]),              # anything else: min-max
])
def test_int32_image(values, expected):
    data = _enc(Image.fromarray(np.array([values], np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    out = np.asarray(decode_image(data, max_pixels=MAX_PIXELS))[0, :, 0].astype(int)
    assert np.abs(out - expected).max() <= 1


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),               # [0, 1]: x 255 (PIL gives 0, 0, 0, 1)
    ([-1.0, 0.0, 1.0, 3.0], [0, 64, 128, 255]),               # other ranges: min-max
])
def test_float_image(values, expected):
    data = _enc(Image.fromarray(np.array([values], np.float32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = np.asarray(decode_image(data, max_pixels=MAX_PIXELS))[0, :, 0].astype(int)
    assert np.abs(out - expected).max() <= 1


def test_rgba_is_composited_onto_the_background():
    a = np.zeros((1, 3, 4), np.uint8)
    a[0, 0] = (0, 0, 0, 0)          # fully transparent black
    a[0, 1] = (255, 0, 0, 128)      # half-transparent red
    a[0, 2] = (10, 20, 30, 255)     # opaque
    data = _enc(Image.fromarray(a, "RGBA"))
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, 0].tolist() == [0, 0, 0]  # what PIL gives
    out = np.asarray(decode_image(data, max_pixels=MAX_PIXELS)).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert np.abs(out[0, 1] - [255, 127, 127]).max() <= 1
    assert out[0, 2].tolist() == [10, 20, 30]
    green = np.asarray(decode_image(data, max_pixels=MAX_PIXELS, background=(0, 128, 0)))
    assert green[0, 0].tolist() == [0, 128, 0]


def test_la_and_palette_transparency():
    la = _enc(Image.fromarray(np.array([[[100, 0], [100, 255], [100, 128]]], np.uint8), "LA"))
    assert np.asarray(decode_image(la, max_pixels=MAX_PIXELS))[0, :, 0].tolist() == [255, 100, 177]
    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    p.putdata([0, 1, 2])
    for fmt in ("PNG", "GIF"):
        out = np.asarray(decode_image(_enc(p, fmt, transparency=2), max_pixels=MAX_PIXELS, background=(7, 8, 9)))
        assert out[0].tolist() == [[255, 0, 0], [0, 255, 0], [7, 8, 9]], fmt


def test_premultiplied_alpha():
    rgba = Image.fromarray(np.array([[[200, 0, 0, 255], [100, 0, 0, 128], [0, 0, 0, 0]]], np.uint8), "RGBA")
    out = np.asarray(to_rgb(rgba.convert("RGBa"), background=(0, 0, 255))).astype(int)
    assert np.abs(out[0] - [[200, 0, 0], [50, 0, 127], [0, 0, 255]]).max() <= 1


def test_palette_cmyk_and_bilevel():
    p = Image.new("P", (2, 1))
    p.putpalette([12, 34, 56, 200, 100, 0] + [0] * 762)
    p.putdata([0, 1])
    assert np.asarray(decode_image(_enc(p), max_pixels=MAX_PIXELS))[0].tolist() == [[12, 34, 56], [200, 100, 0]]
    cmyk = _enc(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    out = decode_image(cmyk, max_pixels=MAX_PIXELS)
    assert out.mode == "RGB" and np.abs(np.asarray(out)[0, 0].astype(int) - [255, 0, 0]).max() <= 2
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert np.asarray(decode_image(_enc(bilevel), max_pixels=MAX_PIXELS))[0].tolist() == [[0, 0, 0], [255] * 3]


# ---------------------------------------------------------------------------------------------------------------
# Caption corpora


def _all(kind, path, start=0, stop=10**9):
    return list(iter_caption_records(kind, path, start=start, stop=stop))


def test_parse_caption_spec(tmp_path):
    for suffix, kind in ((".json", "coco"), (".tsv", "cc"), (".txt", "txt"), (".jsonl", "jsonl")):
        (tmp_path / f"c{suffix}").write_text("x\n")
        assert parse_caption_spec(str(tmp_path / f"c{suffix}")) == (kind, str(tmp_path / f"c{suffix}"))
    (tmp_path / "odd:name.csv").write_text("x\n")
    assert parse_caption_spec(f"txt:{tmp_path}/odd:name.csv") == ("txt", f"{tmp_path}/odd:name.csv")
    with pytest.raises(ValueError, match="coco:, cc:, txt:, jsonl:"):
        parse_caption_spec(str(tmp_path / "odd:name.csv"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        parse_caption_spec(str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        parse_caption_spec(f"cc:{tmp_path}/missing.csv")


@pytest.mark.parametrize("kind", ["coco", "cc", "txt", "jsonl"])
def test_synthetic_corpora_read_back_in_blocks(tmp_path, kind):
    spec = write_captions(tmp_path / "corpus", kind, n=11, seed=2)
    kind_, path = parse_caption_spec(spec)
    assert kind_ == kind and count_caption_records(kind, path) == 11
    whole = _all(kind, path)
    assert [r.index for r in whole] == list(range(11)) and all(isinstance(r, CaptionRow) and r.text for r in whole)
    blocks = _all(kind, path, 0, 4) + _all(kind, path, 4, 4) + _all(kind, path, 4, 9) + _all(kind, path, 9, 50)
    assert blocks == whole
    if kind == "coco":
        assert [r.ref for r in whole[:6]] == ["0"] * 5 + ["1"]
    elif kind == "cc":
        assert whole[3].ref == "https://example.com/img/000003.jpg" and "http" not in whole[3].text
    else:
        assert all(r.ref == "" for r in whole)
    assert write_captions(tmp_path / "again", kind, n=11, seed=2) and \
        _all(kind, str(tmp_path / "again")) == whole


def test_line_formats_blank_lines_and_parse_errors(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_bytes(b"\xef\xbb\xbfa dog\n\n   \r\nbad \xff byte\nlast line without newline")
    assert count_caption_records("txt", str(txt)) == 5
    out = _all("txt", str(txt))
    assert out[0] == CaptionRow(0, "a dog", "")
    assert out[1] == Reject(1, f"{txt}:2", "empty_caption", "blank line")
    assert out[2].reason == "empty_caption" and out[2].key == f"{txt}:3"
    assert out[3].reason == "parse_error" and out[3].key == f"{txt}:4" and "UTF-8" in out[3].detail
    assert out[4] == CaptionRow(4, "last line without newline", "")

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"caption": "one"}\n{"text": " two "}\n{"caption": \n{"url": "x"}\n[1]\n{"caption": ""}\n')
    out = _all("jsonl", str(jsonl))
    assert [getattr(r, "text", None) or r.reason for r in out] == [
        "one", "two", "parse_error", "parse_error", "parse_error", "empty_caption"]
    assert out[2].key == f"{jsonl}:3" and "Expecting value" in out[2].detail

    cc = tmp_path / "c.tsv"
    cc.write_text("a cat\thttp://x/1.jpg\nno tab here\nhttps://x/3.jpg\ta url-first row\n\thttp://x/4.jpg\n")
    out = _all("cc", str(cc))
    assert out[0] == CaptionRow(0, "a cat", "http://x/1.jpg")
    assert out[1].reason == "parse_error" and out[1].key == f"{cc}:2" and "TAB" in out[1].detail
    assert out[2] == CaptionRow(2, "a url-first row", "https://x/3.jpg")
    assert out[3].reason == "empty_caption"
    assert count_caption_records("cc", str(cc)) == 4


def test_coco_errors_and_reload(tmp_path):
    coco = tmp_path / "c.json"
    coco.write_text('{\n "annotations": [\n  {"image_id": 7, "caption": "x"},\n  {"image_id": 8, "caption": }\n ]\n}')
    with pytest.raises(ValueError, match=rf"{coco}:4"):
        count_caption_records("coco", str(coco))
    coco.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        count_caption_records("coco", str(coco))
    coco.write_text(json.dumps({"annotations": [{"image_id": 7, "caption": " a b "}, {"image_id": 8, "caption": " "},
                                                {"image_id": 9}]}))
    out = _all("coco", str(coco))
    assert out[0] == CaptionRow(0, "a b", "7")
    assert [r.reason for r in out[1:]] == ["empty_caption", "parse_error"]
    assert out[2].key == f"{coco}:annotations[2]"
    # An edited file is re-read, not served from the per-path cache.
    coco.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "changed"}] * 2}))
    os.utime(coco, (1, 1))
    assert count_caption_records("coco", str(coco)) == 2 and _all("coco", str(coco))[0].text == "changed"


def test_caption_argument_errors(tmp_path):
    (tmp_path / "c.txt").write_text("x\n")
    with pytest.raises(ValueError, match="coco, cc, txt, jsonl"):
        count_caption_records("csv", str(tmp_path / "c.txt"))
    with pytest.raises(ValueError, match="range"):
        _all("txt", str(tmp_path / "c.txt"), 3, 2)


# ---------------------------------------------------------------------------------------------------------------
# URLs and synthetic shards


def test_expand_urls(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:05d}.tar").write_bytes(b"")
    got = expand_urls([f"{tmp_path}/s-{{00002..00000}}.tar", "s3://bucket/x-{a,b}.tar"])
    assert got == [f"{tmp_path}/s-{i:05d}.tar" for i in (2, 1, 0)] + ["s3://bucket/x-a.tar", "s3://bucket/x-b.tar"]
    with pytest.raises(FileNotFoundError, match="s-00003.tar"):
        expand_urls([f"{tmp_path}/s-{{00000..00003}}.tar"])
    with pytest.raises(ValueError, match="more than once"):
        expand_urls([f"{tmp_path}/s-00000.tar", f"{tmp_path}/s-{{00000..00001}}.tar"])


def test_synthetic_shards_are_deterministic_and_learnable(tmp_path):
    a = write_image_shards(tmp_path / "a", n_shards=2, per_shard=12, seed=4)
    b = write_image_shards(tmp_path / "b", n_shards=2, per_shard=12, seed=4)
    assert [Path(p).name for p in a] == ["shard-00000.tar", "shard-00001.tar"]
    assert [_sha(p) for p in a] == [_sha(p) for p in b]
    keys, hits = [], 0
    for p in a:
        samples, report = _read(p)
        assert not report.truncated and len(samples) == 12
        for raw in samples:
            s = parse_sample(raw, max_pixels=MAX_PIXELS)
            keys.append(s.key)
            assert s.image.size == (48, 40) and s.caption.startswith("a ") and s.label in (0, 1, 2)
            assert ("red", "green", "blue")[s.label] in s.caption
            hits += int(np.asarray(s.image, np.float32).mean(axis=(0, 1)).argmax() == s.label)
    assert len(set(keys)) == 24
    assert hits >= 22  # the dominant colour tells the class


@pytest.mark.parametrize("ext", ["png", "webp"])
def test_synthetic_shard_formats_and_options(tmp_path, ext):
    [p] = write_image_shards(tmp_path, n_shards=1, per_shard=3, ext=ext, captions=False, labels=False, prefix="x",
                             size=(20, 10))
    samples, _ = _read(p)
    assert Path(p).name == "x-00000.tar" and all(set(s.members) == {ext} for s in samples)
    assert parse_sample(samples[0], max_pixels=MAX_PIXELS).image.size == (20, 10)
