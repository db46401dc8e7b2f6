"""One bad sample is one reject, never a dead build: odd tar members, non-UTF-8 names, captions the cache cannot
hold (NUL, lone surrogates, megabytes), labels outside int32 or the vocabulary, extreme aspect ratios, and the caption
and vocabulary files around them. Every key ends as a row or a reject, and build and verify agree."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import CLASSES, build_cache
from PIL import Image
from webdataset.tariterators import base_plus_ext

from kdcache.cache.captions import CaptionRow, iter_caption_records
from kdcache.cache.reader import open_cache
from kdcache.cache.verify import verify
from kdcache.cli.main import cli
from kdcache.shards import RawSample, RejectError, ShardReport, iter_shard, parse_sample
from kdcache.shards.decode import MAX_CAPTION_CHARS
from kdcache.synth import write_tar


def _jpg(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _odd_tar(path: Path, members: list[tuple]) -> str:
    """A GNU tar of (name, bytes) regular files and (name, tarfile type, link target) other members; names may hold
    surrogate-escaped non-UTF-8 bytes."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, *rest in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 0, 0o644
            if len(rest) == 1:
                info.size = len(rest[0])
                tf.addfile(info, io.BytesIO(rest[0]))
            else:
                info.type, info.linkname = rest
                tf.addfile(info)
    return str(path)


def _keys_in(path: str) -> list[str]:
    """Sample keys as webdataset groups them (consecutive members, extension present, no __meta__, no
    directories), computed independently of kdcache's reader."""
    keys: list[str] = []
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tf:
        for m in tf.getmembers():
            k, _ = base_plus_ext(m.name)
            if m.isdir() or k is None or re.match(r"__[^/]*__($|/)", m.name):
                continue
            if not keys or keys[-1] != k:
                keys.append(k)
    return keys


def _status(out: Path) -> tuple[dict, dict]:
    c = open_cache(str(out))
    unit = c.units("images")[0]
    return c.status(unit), c.read(unit)


# ------------------------------------------------------------------------------------------- odd members and names

def test_every_key_of_a_tar_full_of_odd_members_is_a_row_or_a_reject(tmp_path, teacher_spec):
    shard = _odd_tar(tmp_path / "odd.tar", [
        ("good.jpg", _jpg()), ("good.cls", b"1"),
        ("hard.jpg", tarfile.LNKTYPE, "good.jpg"),            # hard link to an earlier image
        ("soft.jpg", tarfile.SYMTYPE, "good.jpg"),            # symbolic link
        ("chr.jpg", tarfile.CHRTYPE, ""),                     # character device
        ("blk.png", tarfile.BLKTYPE, ""),                     # block device
        ("fifo.jpg", tarfile.FIFOTYPE, ""),                   # fifo only
        ("adir", tarfile.DIRTYPE, ""),                        # a directory: not a sample
        ("README", b"no extension: not a sample member"),
        ("__index__", b"{}"),                                 # describes the tar, not a sample
        ("capl.jpg", _jpg()), ("capl.txt", tarfile.SYMTYPE, "other.txt"),  # the caption is a link
        ("extra.jpg", _jpg()), ("extra.xyz", tarfile.CHRTYPE, ""),         # an unused member is a device
        ("b\udcff\udcfe.jpg", _jpg()),                        # key bytes not UTF-8
        ("ext.jp\udcffg", _jpg()),                            # extension bytes not UTF-8: no usable image
        ("last.jpg", _jpg()),
    ])
    keys = _keys_in(shard)
    assert len(keys) == 11
    out = tmp_path / "odd.zarr"
    res = build_cache(out, teacher=teacher_spec, images=(shard,))
    assert res.ok, res.summary
    st, d = _status(out)
    assert st["rows"] == len(keys) and st["valid"] + sum(st["rejected"].values()) == st["rows"]
    by_key = {r["key"]: r for r in st["rejects"]}
    assert {k: r["reason"] for k, r in by_key.items()} == {
        "hard": "link_member", "soft": "link_member", "chr": "special_member", "blk": "special_member",
        "fifo": "special_member", "capl": "link_member", "b\\xff\\xfe": "bad_key", "ext": "no_image"}
    assert "hard link to 'good.jpg'" in by_key["hard"]["detail"] and "--hard-dereference" in by_key["hard"]["detail"]
    assert "character device" in by_key["chr"]["detail"]
    assert d["key"].tolist() == ["good", "hard", "soft", "chr", "blk", "fifo", "capl", "extra", "b\\xff\\xfe", "ext",
                                 "last"]
    assert d["valid"].tolist() == [k in ("good", "extra", "last") for k in d["key"].tolist()]
    assert verify(str(out), progress=False).ok


def test_the_reader_escapes_non_utf8_names_the_same_way_every_time(tmp_path):
    shard = _odd_tar(tmp_path / "names.tar", [("x\udc80.jpg", _jpg()), ("x\udc80.txt", b"a cap")])
    reads = []
    for _ in range(2):
        rep = ShardReport(url=shard)
        reads.append([(s.key, sorted(s.members), s.bad_key) for s in iter_shard(shard, rep)])
        assert not rep.truncated
    assert reads[0] == reads[1] == [("x\\x80", ["jpg", "txt"], True)]
    with pytest.raises(RejectError, match="bad_key"):
        parse_sample(next(iter_shard(shard, ShardReport(url=shard))), max_pixels=10**6)


# ----------------------------------------------------------------------------------------------- captions, labels

def _sample(members: dict[str, bytes]):
    return parse_sample(RawSample("k", 0, members), max_pixels=10**6)


@pytest.mark.parametrize("members, reason", [
    ({"json": json.dumps({"caption": "x\ud800y"}).encode()}, "lone surrogate \\ud800"),
    ({"json": b'{"caption": "tail \\udcff"}'}, "lone surrogate \\udcff"),
    ({"txt": b"tail\0"}, "NUL"),
    ({"txt": b"\0\0"}, "NUL"),
    ({"json": json.dumps({"caption": "a\u0000b"}).encode()}, "NUL"),
])
def test_captions_the_cache_cannot_hold_faithfully_are_rejected(members, reason):
    with pytest.raises(RejectError, match=re.escape(reason)) as e:
        _sample({"jpg": _jpg(), **members})
    assert e.value.reason == "bad_caption"


def test_a_surrogate_pair_in_json_is_one_character_not_a_reject():
    assert _sample({"jpg": _jpg(), "json": b'{"caption": "smile \\ud83d\\ude00"}'}).caption == "smile \U0001f600"


@pytest.mark.parametrize("cls", [b"2147483648", b"9" * 5000, b"3_0", b"\xd9\xa3", b"-1"])
def test_labels_outside_int32_or_not_plain_integers_are_rejected(cls):
    with pytest.raises(RejectError) as e:
        _sample({"jpg": _jpg(), "cls": cls})
    assert e.value.reason == "bad_label"


def test_largest_int32_label_and_padded_labels_are_accepted():
    assert _sample({"jpg": _jpg(), "cls": b"2147483647"}).label == 2**31 - 1
    assert _sample({"jpg": _jpg(), "cls": b" +7\n"}).label == 7


def test_long_captions_are_cut_and_flagged():
    s = _sample({"jpg": _jpg(), "txt": b"word " * 2000})
    assert s.caption_truncated and len(s.caption) <= MAX_CAPTION_CHARS and s.caption.startswith("word word")
    s = _sample({"jpg": _jpg(), "txt": b"short"})
    assert not s.caption_truncated and s.caption == "short"


def test_bad_samples_in_a_build_are_rejects_and_build_and_verify_agree(tmp_path, teacher_spec, classes_file):
    long = "a long caption " * 70_000  # ~1 MB
    shard = write_tar(tmp_path / "captions.tar", [
        ("s0.jpg", _jpg()), ("s0.txt", b"fine"), ("s0.cls", b"0"),
        ("s1.jpg", _jpg()), ("s1.json", json.dumps({"caption": "x\ud800"}).encode()),
        ("s2.jpg", _jpg()), ("s2.txt", b"tail\0"),
        ("s3.jpg", _jpg()), ("s3.txt", b"\0\0"),
        ("s4.jpg", _jpg()), ("s4.cls", b"2147483648"),
        ("s5.jpg", _jpg()), ("s5.cls", b"7"),                  # outside the 3-class vocabulary
        ("s6.jpg", _jpg()), ("s6.txt", long.encode()), ("s6.cls", b"2"),
        ("s7.png", _png((3_000_000, 1))),                      # a few KB; 672M x 224 after the eval resize
        ("s8.jpg", _jpg()), ("s8.cls", b"2"),
    ])
    out = tmp_path / "caps.zarr"
    r = CliRunner().invoke(cli, ["build", "--teacher", teacher_spec, "--out", str(out), "--images", shard,
                                 "--classes", classes_file, "--templates", "photo", "--views", "3", "--batch-size",
                                 "4", "--threads", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "captions truncated: 1" in r.output and "extreme_aspect=1" in r.output
    st, d = _status(out)
    assert {x["key"]: x["reason"] for x in st["rejects"]} == {
        "s1": "bad_caption", "s2": "bad_caption", "s3": "bad_caption", "s4": "bad_label", "s5": "label_out_of_range",
        "s7": "extreme_aspect"}
    assert st["rows"] == 9 and st["valid"] == 3 and st["captions_truncated"] == 1
    assert d["valid"].tolist() == [True, False, False, False, False, False, True, False, True]
    assert d["label"].tolist() == [0, -1, -1, -1, -1, -1, 2, -1, 2]
    emb = d["emb"].astype(np.float32)
    assert np.isnan(emb[~d["valid"]]).all() and np.isfinite(emb[d["valid"]]).all()
    assert len(d["caption"][6]) <= MAX_CAPTION_CHARS and long.startswith(str(d["caption"][6]))
    assert np.isnan(d["topk_val"][5].astype(np.float32)).all() or (d["topk_val"][5] == 0).all()
    c = open_cache(str(out))
    assert c.attrs["summary"]["captions_truncated"] == 1
    assert c.attrs["summary"]["rejected"]["label_out_of_range"] == 1
    assert verify(str(out), progress=False).ok
    from kdcache.train.loop import check_requirements
    from kdcache.train.losses import WeightedLoss

    check_requirements(c, "image", WeightedLoss({"ce": 1.0}, "image"))  # the 7 became a reject: ce can train
    # --resume of the complete cache meets no sample it cannot handle
    r = CliRunner().invoke(cli, ["build", "--teacher", teacher_spec, "--out", str(out), "--images", shard,
                                 "--classes", classes_file, "--templates", "photo", "--views", "3", "--batch-size",
                                 "4", "--threads", "1", "--no-progress", "--resume"])
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------------------------------- caption corpora

def test_corpus_captions_with_nul_or_lone_surrogates_are_rejected_and_long_ones_cut(tmp_path):
    lines = [json.dumps({"caption": "fine"}), json.dumps({"caption": "x\udcff"}), json.dumps({"caption": "a\u0000"}),
             json.dumps({"caption": "y" * (MAX_CAPTION_CHARS + 10)})]
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = list(iter_caption_records("jsonl", str(p), start=0, stop=4))
    assert out[0] == CaptionRow(0, "fine", "")
    assert [o.reason for o in out[1:3]] == ["bad_caption", "bad_caption"]
    assert "\\udcff" in out[1].detail and "NUL" in out[2].detail
    assert out[3].truncated and len(out[3].text) == MAX_CAPTION_CHARS
    t = tmp_path / "c.txt"
    t.write_bytes(b"ok\nnul\0inside\n")
    assert [type(o).__name__ for o in iter_caption_records("txt", str(t), start=0, stop=2)] == ["CaptionRow", "Reject"]


def _coco(captions: list) -> dict:
    return {"annotations": [{"image_id": i, "caption": c} for i, c in enumerate(captions)]}


def test_coco_with_a_byte_order_mark_is_accepted_and_its_bad_captions_rejected(tmp_path):
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(_coco(["a dog", "x\ud800", "b\u0000"])).encode())
    out = list(iter_caption_records("coco", str(p), start=0, stop=3))
    assert out[0] == CaptionRow(0, "a dog", "0")
    assert [o.reason for o in out[1:]] == ["bad_caption", "bad_caption"]
    bad_id = tmp_path / "id.json"
    bad_id.write_text(json.dumps({"annotations": [{"image_id": "i\ud800", "caption": "c"}]}))
    assert next(iter_caption_records("coco", str(bad_id), start=0, stop=1)).reason == "bad_caption"


def test_coco_that_is_not_utf8_names_the_file_and_line(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes(b'{"annotations": [\n{"image_id": 1, "caption": "caf\xe9"}]}')
    with pytest.raises(ValueError, match=r"latin1\.json:2: not UTF-8"):
        list(iter_caption_records("coco", str(p), start=0, stop=1))


def test_build_with_a_bom_coco_corpus(tmp_path, teacher_spec):
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(_coco(["a dog", "a cat " * 1000])).encode())
    out = tmp_path / "coco.zarr"
    res = build_cache(out, teacher=teacher_spec, captions=(f"coco:{p}",))
    assert res.ok and res.summary["captions"] == 2 and res.summary["captions_truncated"] == 1


# ------------------------------------------------------------------------------------------------------ vocabulary

def test_a_classes_file_that_is_not_utf8_is_named(tmp_path, teacher_spec, shards):
    p = tmp_path / "classes.txt"
    p.write_bytes(b"red\ngr\xfcn\nblue\n")
    r = CliRunner().invoke(cli, ["build", "--teacher", teacher_spec, "--out", str(tmp_path / "v.zarr"),
                                 "--images", shards[0], "--classes", str(p), "--no-progress"])
    assert r.exit_code != 0
    assert f"--classes file {p}:2: not UTF-8" in r.output and "Traceback" not in r.output


def test_a_classes_file_with_a_byte_order_mark_keeps_its_first_name(tmp_path):
    from kdcache.vocab import load_classes, load_templates

    p = tmp_path / "classes.txt"
    p.write_bytes(b"\xef\xbb\xbfred\ngreen\n")
    assert load_classes(str(p))[0] == ["red", "green"]
    t = tmp_path / "templates.txt"
    t.write_bytes(b"a {}\n\xff\n")
    with pytest.raises(ValueError, match=r"--templates file .*templates\.txt:2: not UTF-8"):
        load_templates(str(t))


# ----------------------------------------------------------------------------------------------------------- views

@pytest.mark.parametrize("mode, size", [("shortest", 24), ("shortest", (24, 32)), ("longest", 24), ("squash", 24)])
@pytest.mark.parametrize("wh", [(300, 7), (7, 300), (50, 50), (31, 90)])
def test_eval_resize_predicts_open_clips_resize(mode, size, wh):
    from kdcache.views import eval_resize, eval_transform

    pre = {"size": size, "mode": "RGB", "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
           "resize_mode": mode, "fill_color": 0}
    resize = eval_transform(pre).transforms[0]  # open_clip's resize step, before its crop or pad
    assert resize(Image.new("RGB", wh)).size == eval_resize(*wh, pre)


def test_extreme_aspect_ratios_are_refused_for_the_eval_view_but_random_views_stay_bounded():
    from kdcache.augment import parse_policy, render, sample_view
    from kdcache.views import eval_view_problem

    pre = {"size": 224, "resize_mode": "shortest"}
    why = eval_view_problem(3_000_000, 1, pre, max_pixels=89_478_485)
    assert why and "672000000x224" in why
    assert eval_view_problem(1, 3_000_000, {"size": 224, "resize_mode": "longest"}, max_pixels=10**9)
    assert eval_view_problem(640, 480, pre, max_pixels=89_478_485) is None
    img = Image.new("RGB", (3_000_000, 1), (9, 9, 9))
    policy = parse_policy("randaugment=2x9,erase=0.5")
    for v in range(1, 4):
        rec = sample_view(policy, width=3_000_000, height=1, seed=0, shard=0, position=0, view=v)
        x = render(img, rec, size=(32, 32), interpolation="bicubic", fill=(0, 0, 0))
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8


def test_a_view_box_outside_the_image_is_refused():
    from kdcache.views import crop_view

    img = Image.new("RGB", (40, 30))
    assert crop_view(img, (0, 0, 40, 30), False).size == (40, 30)
    for box in [(0, 0, 10**6, 10**6), (-1, 0, 10, 10), (35, 0, 10, 10), (0, 0, 0, 5)]:
        with pytest.raises(ValueError, match="not inside"):
            crop_view(img, box, False)


# ------------------------------------------------------------------------------------------------------------ train

class _FakeCache:
    """What check_label_range reads: a vocabulary, image units with statuses, and their label arrays."""

    def __init__(self, labels: list[list[int]], valid: list[list[bool]]):
        from kdcache.cache.schema import IMAGES, Unit

        self.capabilities = ["images", "logits", "labels"]
        self._units = [Unit(IMAGES, i, f"s{i}.tar") for i in range(len(labels))]
        self._data = {u.name: {"key": np.array([f"k{j}" for j in range(len(lab))]),
                               "label": np.array(lab, np.int32), "valid": np.array(val)}
                      for u, lab, val in zip(self._units, labels, valid, strict=True)}

    def vocab(self):
        return list(CLASSES), ["{}"], np.eye(3, dtype=np.float32)

    def units(self, kind=None):
        return self._units

    def status(self, unit):
        return {"rows": len(self._data[unit.name]["label"])}

    def read(self, unit, names=None):
        return {n: self._data[unit.name][n] for n in names}


def test_train_refuses_labels_outside_the_vocabulary_before_step_1():
    from kdcache.train.config import TrainError
    from kdcache.train.loop import check_requirements
    from kdcache.train.losses import WeightedLoss

    ce = WeightedLoss({"ce": 1.0}, "image")
    ok = _FakeCache([[0, 2, -1], [1, 7]], [[True, True, False], [True, False]])  # the 7 is on a rejected row
    check_requirements(ok, "image", ce)
    bad = _FakeCache([[0, 2, -1], [1, 7]], [[True, True, False], [True, True]])
    with pytest.raises(TrainError, match=r"images-00001 .*row 1 \(key 'k1'\) has label 7.*3 classes"):
        check_requirements(bad, "image", ce)
    check_requirements(bad, "image", WeightedLoss({"cosine": 1.0}, "image"))  # no labels loss: not checked
