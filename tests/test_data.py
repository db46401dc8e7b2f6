"""Student training data: exact view replay, order independent of workers, fixed splits, loud shard mismatches."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import CLASSES, build_cache
from PIL import Image

from kdcache.cache.reader import open_cache
from kdcache.synth import write_captions, write_image_shards, write_tar
from kdcache.train.data import TrainStream, count_rows
from kdcache.train.dataspec import DataError, DataSpec
from kdcache.train.loader import EpochLoader, PackedBatch, make_loader, pack_batch, unpack_batch
from kdcache.train.order import split_of
from kdcache.views import crop_view

CTX = 16  # the tiny teacher's text context


def _jpeg(seed: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar_samples(path: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, members) in tar order with plain tarfile: the reference side never uses kdcache's readers."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, teacher_spec, classes_file):
    """3 synthetic shards + one hand-written shard with an undecodable sample, 3 views, and two caption corpora."""
    d = tmp_path_factory.mktemp("data")
    shards = write_image_shards(d / "shards", n_shards=3, per_shard=10, size=(64, 48), classes=CLASSES, seed=3)
    odd = write_tar(d / "shards" / "odd-00000.tar", [
        ("odd0.jpg", _jpeg(0)), ("odd0.cls", b"1"),                          # no caption
        ("odd1.jpg", b"not a jpeg"), ("odd1.txt", b"rejected at build"),     # valid=False
        ("odd2.jpg", _jpeg(2, (30, 50))), ("odd2.txt", b"a tall picture"),   # no label
    ])
    corpora = (write_captions(d / "a.txt", "txt", n=60, seed=1), write_captions(d / "b.jsonl", "jsonl", n=40, seed=2))
    out = d / "cache.zarr"
    res = build_cache(out, teacher=teacher_spec, images=(*shards, odd), views=3, captions=corpora,
                      classes=classes_file, batch_size=16)
    assert res.ok and res.summary["rejected"] == {"undecodable": 1}, res.summary
    return {"cache": str(out), "shards": [*shards, odd], "dir": d}


def _spec(data, **kw) -> DataSpec:
    kw.setdefault("tower", "image")
    kw.setdefault("batch_size", 4)
    kw.setdefault("buffer", 8)
    return DataSpec(cache=data["cache"], **kw)


def _arrays(data) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    c = open_cache(data["cache"])
    return {(u.kind, u.index if u.kind == "images" else (u.index, u.block)): c.read(u) for u in c.units()}


def _ids(loader, *fields) -> list[tuple]:
    return [tuple(zip(*(b[f].tolist() for f in fields), strict=True)) for b in loader]


def test_replayed_crop_equals_build_crop_pixel_for_pixel(data):
    """The train path's decoded image, cropped with the cached record, is the build's crop, pixel for pixel; the
    reference decodes with plain PIL and crops with numpy slicing."""
    stream = TrainStream(_spec(data, val_fraction=0.0), split="train", epoch=0)
    arrays = _arrays(data)
    samples = {i: _tar_samples(s) for i, s in enumerate(data["shards"])}
    compared, flips = 0, set()
    for row in stream.order():
        a = arrays[("images", row.shard)]
        assert row.box == tuple(a["view_box"][row.position, row.view]) and row.flip == a["view_flip"][row.position,
                                                                                                       row.view]
        img = stream.decode_image(row)
        key, members = samples[row.shard][row.position]
        assert key == row.key
        ref = np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB"))
        for v in range(1, 3):
            left, top, w, h = a["view_box"][row.position, v].tolist()
            want = ref[top:top + h, left:left + w]
            if a["view_flip"][row.position, v]:
                want = want[:, ::-1]
            flips.add(bool(a["view_flip"][row.position, v]))
            got = np.asarray(crop_view(img, a["view_box"][row.position, v], a["view_flip"][row.position, v]))
            assert got.shape == want.shape and (got == want).all(), (row.shard, row.position, v)
            compared += 1
    assert compared == 2 * 32 and flips == {True, False}


def test_student_with_teachers_preprocess_reproduces_the_cached_embedding(data, teacher_spec):
    """Pixels replayed for a student whose preprocessing is the teacher's give the teacher's cached embedding back:
    the replayed view is the very view the teacher saw (views 0 and >= 1 alike)."""
    model, _, _ = open_clip.create_model_and_transforms(teacher_spec)
    model.eval()
    pp = open_cache(data["cache"]).attrs["preprocess"]
    mean, std = (torch.tensor(pp[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    seen_views = set()
    for split, epoch in (("train", 0), ("train", 1), ("val", 0)):
        for b in make_loader(_spec(data, val_fraction=0.3, batch_size=8), split=split, epoch=epoch,
                             student_preprocess=pp):
            with torch.no_grad():
                emb = model.encode_image((b["pixels"].float() / 255 - mean) / std, normalize=True)
            cos = torch.nn.functional.cosine_similarity(emb, b["teacher"], dim=-1)
            assert cos.min() >= 0.999, (split, b["shard"], b["position"], b["view"], cos)
            seen_views |= set(b["view"].tolist())
            if split == "val":
                assert (b["view"] == 0).all()
    assert seen_views == {0, 1, 2}


def test_image_batches_carry_the_rows_cached_values_at_the_students_size(data):
    student = {"size": 24, "mean": [0.4] * 3, "std": [0.3] * 3, "interpolation": "bilinear", "resize_mode": "shortest"}
    arrays = _arrays(data)
    n = 0
    for b in make_loader(_spec(data, batch_size=5, val_fraction=0.0), split="train", epoch=0,
                         student_preprocess=student):
        assert b["pixels"].shape == (5, 3, 24, 24) and b["pixels"].dtype == torch.uint8
        for i, (s, p, v) in enumerate(zip(b["shard"].tolist(), b["position"].tolist(), b["view"].tolist(),
                                          strict=True)):
            a = arrays[("images", s)]
            assert (b["teacher"][i].numpy() == a["emb"][p, v].astype(np.float32)).all()
            assert b["labels"][i] == a["label"][p]
            assert bool(b["has_other"][i]) == (a["caption"][p] != "")
            other = b["other"][i].numpy()
            if b["has_other"][i]:
                assert (other == a["caption_emb"][p].astype(np.float32)).all()
            else:
                assert np.isnan(other).all()
            n += 1
    assert n == 30  # 32 valid rows, batches of 5, last partial batch dropped in training


def test_order_is_a_function_of_seed_epoch_and_step_not_workers(data):
    spec = _spec(data, val_fraction=0.2)
    runs = {w: _ids(make_loader(spec, split="train", epoch=0, workers=w), "shard", "position", "view")
            for w in (0, 1, 2)}
    full = runs[0]
    assert runs[1] == full and runs[2] == full
    assert len(full) == count_rows(spec, "train") // 4 == len(make_loader(spec, split="train", epoch=0))
    rows = [r[:2] for batch in full for r in batch]
    assert len(set(rows)) == len(rows)
    # The buffer shuffles within shards too (the unit order alone would keep each shard's positions ascending).
    assert any(sorted(ps) != ps for ps in ([p for s, p in rows if s == shard] for shard in range(4)))
    epoch1 = _ids(make_loader(spec, split="train", epoch=1), "shard", "position", "view")
    assert epoch1 != full
    view0 = {r[:2]: r[2] for batch in full for r in batch}
    assert any(view0.get(r[:2], r[2]) != r[2] for batch in epoch1 for r in batch)  # the view is drawn per epoch
    seed1 = DataSpec(**{**spec.__dict__, "seed": 1})
    assert _ids(make_loader(seed1, split="train", epoch=0), "shard", "position", "view") != full
    resumed = make_loader(spec, split="train", epoch=0, start_step=3, workers=2)
    assert len(resumed) == len(full) - 3
    assert _ids(resumed, "shard", "position", "view") == full[3:]


def test_epoch_loader_keeps_its_workers_and_serves_every_pass_like_a_fresh_loader(data):
    """Training's loader forks its workers once; each pass (abandoned or not) gives what a fresh loader gives."""
    spec = _spec(data, val_fraction=0.2)

    def fresh(split, epoch, start=0):
        return _ids(make_loader(spec, split=split, epoch=epoch, start_step=start), "shard", "position", "view")

    data_loader = EpochLoader(spec, workers=2)
    passes = [("train", 0, 0), ("val", 0, 0), ("train", 1, 2), ("val", 0, 0), ("train", 2, 0)]
    pids = None
    try:
        for i, (split, epoch, start) in enumerate(passes):
            it = data_loader.start(split, epoch, start)
            if i == 2:  # abandon a pass after one batch, as max_steps does mid-epoch: the next pass is not disturbed
                next(it)
                continue
            assert _ids(it, "shard", "position", "view") == fresh(split, epoch, start), (split, epoch, start)
            now = [w.pid for w in data_loader.loader._iterator._workers]
            assert pids is None or now == pids  # the same worker processes for every pass
            pids = now
    finally:
        data_loader.close()
    assert fresh("train", 1, 0) != fresh("train", 2, 0)  # the passes differ, so equality above is not vacuous


def test_a_packed_batch_unpacks_to_the_same_tensors():
    """Workers send a batch as one tensor; every dtype, shape (empty and odd-sized included) and the non-tensor
    entries come back equal."""
    g = torch.Generator().manual_seed(0)
    batch = {"pixels": torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8, generator=g),
             "teacher": torch.randn(3, 5, generator=g), "other": torch.full((3, 5), float("nan")),
             "has_other": torch.tensor([True, False, True]), "labels": torch.tensor([-1, 2, 7]),
             "half": torch.randn(3, 3, generator=g).half(), "empty": torch.zeros(0, 4),
             "strided": torch.arange(12).reshape(3, 4).T, "texts": ["a", "", "c"]}
    batch["big"] = torch.randint(0, 256, (2**20 + 1,), dtype=torch.uint8, generator=g)  # image pixels: not copied
    packed = pack_batch(batch)
    assert isinstance(packed, PackedBatch) and packed.data.dtype == torch.uint8
    assert set(packed.rest) == {"texts", "big"} and packed.rest["big"] is batch["big"]
    out = unpack_batch(packed)
    assert list(out) == list(batch)
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            assert out[k].dtype == v.dtype and out[k].shape == v.shape
            torch.testing.assert_close(out[k], v, rtol=0, atol=0, equal_nan=True)
        else:
            assert out[k] == v
    assert unpack_batch(batch) is batch  # in-process batches pass through

    # The DataLoader's pin-memory thread (CUDA machines) reaches every tensor of a packed batch.
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t.data_ptr()) or t)
        again = unpack_batch(pin_memory(packed))
    assert set(pinned) == {packed.data.data_ptr(), batch["big"].data_ptr()}
    assert all(torch.equal(again[k], out[k]) for k in out if isinstance(out[k], torch.Tensor) and k != "other")


def test_splits_are_disjoint_cover_every_valid_row_and_are_stable(data):
    arrays = _arrays(data)
    valid = {(i, p) for (kind, i), a in arrays.items() if kind == "images" for p in np.flatnonzero(a["valid"])}
    assert len(valid) == 32 and (3, 1) not in valid  # the undecodable sample
    got = {}
    for split in ("train", "val"):
        spec = _spec(data, batch_size=1, val_fraction=0.25)
        got[split] = {r for batch in _ids(make_loader(spec, split=split, epoch=0), "shard", "position") for r in batch}
        assert len(got[split]) == count_rows(spec, split)
    assert got["train"] and got["val"] and not got["train"] & got["val"]
    assert got["train"] | got["val"] == valid

    # Text rows: 32 - 1 paired captions (odd0 has none) + 100 corpus records, keyed by image key / corpus address.
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=CTX)
    spec = _spec(data, tower="text", val_fraction=0.3)
    n_train, n_val = count_rows(spec, "train"), count_rows(spec, "val")
    assert n_train + n_val == 131 and 0.2 < n_val / 131 < 0.4
    again = [r for b in _ids(make_loader(spec, split="val", epoch=0, tokenizer=tok), "shard", "corpus", "position")
             for r in b]
    assert len(again) == n_val
    assert again == [r for b in _ids(make_loader(spec, split="val", epoch=3, tokenizer=tok), "shard", "corpus",
                                     "position") for r in b]  # validation does not change between epochs
    # The hash is part of the cache's contract with past runs: a change here silently moves rows between splits.
    assert [split_of(k, 0.5) for k in ("000000000", "cap:0:7", "b")] == ["val", "val", "train"]


def test_key_mismatch_names_the_shard_position_and_both_keys(data):
    d, shards = data["dir"], data["shards"]
    moved = [str(d / "moved" / Path(s).name) for s in shards]
    (d / "moved").mkdir(exist_ok=True)
    for s, m in zip(shards, moved, strict=True):
        shutil.copy(s, m)
    # Same structure, one sample renamed: what a re-written shard looks like.
    members = [(("000010099" if k == "000010003" else k) + "." + ext, b) for k, mem in _tar_samples(shards[1])
               for ext, b in mem.items()]
    write_tar(moved[1], members)
    spec = _spec(data, val_fraction=0.0, images=tuple(moved))
    with pytest.raises(DataError, match=r"shard 1 .*position 3: the tar has key '000010099' where the cache has "
                                        r"'000010003'"):
        list(make_loader(spec, split="train", epoch=0))

    # A shard with samples after the cached ones was rewritten (a `--limit` build would have said so).
    extra = [(f"{k}.{ext}", b) for k, mem in _tar_samples(shards[1]) for ext, b in mem.items()]
    write_tar(moved[1], [*extra, ("zzz.jpg", _jpeg(9))])
    with pytest.raises(DataError, match=r"shard 1 .*more samples than the 10 rows.*'zzz'"):
        list(make_loader(spec, split="train", epoch=0))

    # A shard cut short (whole samples missing at the end) is caught too.
    write_tar(moved[1], [(f"{k}.{ext}", b) for k, mem in _tar_samples(shards[1])[:6] for ext, b in mem.items()])
    with pytest.raises(DataError, match=r"shard 1 .*yielded 6 samples but the cache has 10 rows"):
        list(make_loader(spec, split="train", epoch=0))

    # Moved but intact (given as a brace pattern): the same batches as from the recorded locations.
    shutil.copy(shards[1], moved[1])
    pattern = str(d / "moved" / "shard-{00000..00002}.tar")
    ok = _spec(data, images=(pattern, moved[3]))
    assert (_ids(make_loader(ok, split="train", epoch=0), "shard", "position", "view")
            == _ids(make_loader(_spec(data), split="train", epoch=0), "shard", "position", "view"))

    with pytest.raises(DataError, match="names 2 shard.*built from 4"):
        TrainStream(_spec(data, images=tuple(moved[:2])), split="train", epoch=0)


def test_text_tower_serves_paired_and_corpus_captions_once_per_epoch(data):
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=CTX)
    arrays = _arrays(data)
    expected = {}
    for (kind, idx), a in arrays.items():
        if kind == "images":
            for p in np.flatnonzero(a["valid"] & (a["caption"] != "")):
                expected[(idx, -1, int(p))] = (a["caption"][p], a["caption_emb"][p], a["emb"][p, 0], a["label"][p])
        else:
            for r in np.flatnonzero(a["valid"]):
                expected[(-1, idx[0], int(a["index"][r]))] = (a["text"][r], a["emb"][r], None, -1)
    assert len(expected) == 131
    spec = _spec(data, tower="text", batch_size=6, val_fraction=0.0)
    runs = {w: list(make_loader(spec, split="train", epoch=0, workers=w, tokenizer=tok)) for w in (0, 2)}
    seen = []
    for b0, b2 in zip(runs[0], runs[2], strict=True):
        assert b0.keys() == b2.keys()
        for k in b0:
            torch.testing.assert_close(b0[k], b2[k], rtol=0, atol=0, equal_nan=True)
        assert b0["tokens"].shape == (6, CTX) and b0["tokens"].dtype == torch.int64
        for i, ident in enumerate(zip(b0["shard"].tolist(), b0["corpus"].tolist(), b0["position"].tolist(),
                                      strict=True)):
            text, teacher, other, label = expected[ident]
            assert (b0["tokens"][i] == tok([text])[0]).all()
            assert (b0["teacher"][i].numpy() == teacher.astype(np.float32)).all()
            assert bool(b0["has_other"][i]) == (other is not None) and b0["labels"][i] == label
            if other is None:
                assert b0["other"][i].isnan().all()
            else:
                assert (b0["other"][i].numpy() == other.astype(np.float32)).all()
            seen.append(ident)
    assert len(seen) == len(set(seen)) == 131 // 6 * 6
    kinds = {(s >= 0, c >= 0) for s, c, _ in seen}
    assert kinds == {(True, False), (False, True)}


def test_spec_errors_are_named(data):
    with pytest.raises(DataError, match="tokenizer"):
        TrainStream(_spec(data, tower="text"), split="train", epoch=0)
    with pytest.raises(DataError, match="tower"):
        _spec(data, tower="audio")
    with pytest.raises(DataError, match="split"):
        TrainStream(_spec(data), split="test", epoch=0)


def test_the_data_path_never_imports_the_teacher():
    code = ("import sys, kdcache.train.data; "
            "bad = [m for m in ('kdcache.teacher', 'kdcache.cache.build') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
