"""kdcache build: the cache holds what open_clip itself computes, and rows are where the spec says."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
import zarr
from conftest import CLASSES, build_cache, cache_arrays
from PIL import Image

from kdcache.cache import schema
from kdcache.cache.config import BuildError
from kdcache.cache.reader import CacheError, open_cache


def _samples(shard: str) -> list[tuple[str, Image.Image, str | None, int | None]]:
    """Read a synthetic shard with plain tarfile + PIL: the reference side never uses kdcache's readers."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            groups.setdefault(key, {})[ext] = tf.extractfile(m).read()
    out = []
    for key, mem in groups.items():
        img = Image.open(io.BytesIO(mem["jpg"])).convert("RGB")
        out.append((key, img, mem.get("txt", b"").decode().strip() or None, int(mem["cls"]) if "cls" in mem else None))
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_spec, shards, classes_file):
    out = tmp_path_factory.mktemp("build") / "cache.zarr"
    res = build_cache(out, teacher=teacher_spec, images=tuple(shards), views=3, classes=classes_file,
                      templates="photo", batch_size=8)
    assert res.ok, res.summary
    return out


def test_cache_matches_open_clip_recomputed(cache, teacher_spec, shards):
    """Embeddings, top-k and log-sum-exp for every view equal open_clip's own outputs (cos ≥ 0.999 in fp16)."""
    model, _, preprocess = open_clip.create_model_and_transforms(teacher_spec)
    model.eval()
    tokenizer = open_clip.get_tokenizer(teacher_spec)
    with torch.no_grad():
        head = open_clip.build_zero_shot_classifier(model, tokenizer, list(CLASSES), ["a photo of a {}."]).T
    scale = model.logit_scale.exp().item()
    c = open_cache(str(cache), need=["logits", "images"])
    cls, _, cached_head = c.vocab()
    assert cls == list(CLASSES)
    np.testing.assert_allclose(cached_head, head.numpy(), atol=1e-5)
    pp = c.attrs["preprocess"]
    size = tuple(pp["size"])
    for shard_i in (0, 2):
        unit = c.units("images")[shard_i]
        data = c.read(unit)
        for pos, (key, img, caption, label) in enumerate(_samples(shards[shard_i])[:4]):
            assert data["key"][pos] == key and data["valid"][pos]
            assert data["label"][pos] == label
            assert data["caption"][pos] == caption
            assert tuple(data["src_size"][pos]) == img.size
            inputs = [preprocess(img)]
            for v in range(1, 3):
                left, top, w, h = data["view_box"][pos, v].tolist()
                view = TF.resized_crop(img, top, left, h, w, list(size),
                                       interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
                if data["view_flip"][pos, v]:
                    view = TF.hflip(view)
                inputs.append(TF.normalize(TF.to_tensor(view), pp["mean"], pp["std"]))
            with torch.no_grad():
                ref = model.encode_image(torch.stack(inputs), normalize=True)
                text_ref = model.encode_text(tokenizer([caption]), normalize=True)[0]
            got = torch.from_numpy(data["emb"][pos].astype(np.float32))
            cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
            assert cos.min() >= 0.999, (key, cos)
            logits = scale * ref @ head.T
            k = data["topk_idx"].shape[-1]
            top = logits.topk(k, dim=-1)
            assert (torch.from_numpy(data["topk_idx"][pos]) == top.indices).all()
            np.testing.assert_allclose(data["topk_val"][pos], top.values.numpy(), atol=2e-2 * scale)
            np.testing.assert_allclose(data["lse"][pos], torch.logsumexp(logits, -1).numpy(), atol=2e-2 * scale)
            cap = torch.from_numpy(data["caption_emb"][pos].astype(np.float32))
            assert torch.nn.functional.cosine_similarity(cap, text_ref, dim=0) >= 0.999


def test_recorded_preprocessing_is_the_teachers(cache, teacher_dir):
    cfg = json.loads((teacher_dir / "open_clip_config.json").read_text())["preprocess_cfg"]
    pp = open_cache(str(cache)).attrs["preprocess"]
    assert pp["mean"] == cfg["mean"] and pp["std"] == cfg["std"]
    assert pp["interpolation"] == cfg["interpolation"] and pp["resize_mode"] == cfg["resize_mode"]
    assert list(pp["size"]) == [cfg["size"], cfg["size"]]


def test_views_are_deterministic_and_view0_is_eval(cache):
    c = open_cache(str(cache))
    data = c.read(c.units("images")[0])
    assert not data["view_flip"][:, 0].any()          # view 0 = the eval transform
    boxes = data["view_box"]
    assert (boxes[:, 1] != boxes[:, 2]).any(axis=-1).all()  # views 1 and 2 differ
    w, h = data["src_size"][:, 0], data["src_size"][:, 1]
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 0] + boxes[..., 2] <= w[:, None]).all()
    assert (boxes[..., 1] >= 0).all() and (boxes[..., 1] + boxes[..., 3] <= h[:, None]).all()


def test_attributes_describe_the_cache(cache, teacher_dir):
    a = open_cache(str(cache)).attrs
    assert a["schema_version"] == schema.SCHEMA_VERSION and a["status"] == "complete"
    assert set(a["capabilities"]) >= {"images", "logits", "labels", "paired_captions"}
    import hashlib
    digest = hashlib.sha256((teacher_dir / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert a["teacher"]["digest"] == f"sha256:{digest}" and a["teacher"]["random_init"] is False
    assert a["build"]["batch_size"] == 8 and a["build"]["threads"] == 1 and a["build"]["views"] == 3
    assert {"torch", "open_clip", "zarr", "kdcache"} <= set(a["versions"])
    assert a["summary"]["images"] == 30 and a["summary"]["rejected"] == {}


def test_chunks_and_codecs_follow_the_schema(cache):
    root = zarr.open_group(str(cache), mode="r")
    emb = root["images/00000/emb"]
    assert emb.dtype == np.float16 and np.isnan(emb.fill_value)
    assert any(type(c).__name__ == "ZstdCodec" and c.checksum for c in emb.metadata.codecs)
    assert root["images/00000/key"].chunks == (10,)  # small per-row arrays: one chunk per shard


def test_existing_cache_needs_resume_or_overwrite(cache, teacher_spec, shards):
    with pytest.raises(BuildError, match="--resume"):
        build_cache(cache, teacher=teacher_spec, images=tuple(shards))


def test_resume_refuses_changed_config_naming_the_field(cache, teacher_spec, shards, classes_file):
    with pytest.raises(BuildError, match="views"):
        build_cache(cache, teacher=teacher_spec, images=tuple(shards), views=2, classes=classes_file,
                    templates="photo", batch_size=8, resume=True)
    with pytest.raises(BuildError, match="--images changed"):
        build_cache(cache, teacher=teacher_spec, images=tuple(shards[:1]) + tuple(shards[2:]), views=3,
                    classes=classes_file, templates="photo", batch_size=8, resume=True)


def test_captions_only_build(tmp_path, teacher_spec):
    from kdcache.synth import write_captions

    specs = [write_captions(tmp_path / f"c.{kind}", kind, n=7, seed=3) for kind in ("coco", "cc", "txt", "jsonl")]
    res = build_cache(tmp_path / "caps.zarr", teacher=teacher_spec, captions=tuple(specs))
    assert res.ok
    c = open_cache(str(tmp_path / "caps.zarr"), need=["captions"])
    assert len(c.units("captions")) == 4 and not c.units("images")
    model, _, _ = open_clip.create_model_and_transforms(teacher_spec)
    tok = open_clip.get_tokenizer(teacher_spec)
    for unit in c.units("captions"):
        d = c.read(unit)
        assert d["valid"].all() and (d["index"] == np.arange(len(d["index"]))).all()
        with torch.no_grad():
            ref = model.encode_text(tok(d["text"].tolist()), normalize=True)
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(d["emb"].astype(np.float32)), ref, dim=-1)
        assert cos.min() >= 0.999


def test_limit_takes_the_first_n_samples(tmp_path, teacher_spec, shards):
    res = build_cache(tmp_path / "lim.zarr", teacher=teacher_spec, images=tuple(shards), limit=13)
    assert res.ok and res.summary["images"] == 13
    c = open_cache(str(tmp_path / "lim.zarr"))
    rows = [c.status(u)["rows"] for u in c.units("images")]
    assert rows == [10, 3, 0]


def test_readers_refuse_incomplete_and_foreign_caches(tmp_path, cache):
    root = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    root.attrs["something"] = 1
    with pytest.raises(CacheError, match="not a kdcache cache"):
        open_cache(str(tmp_path / "other.zarr"))
    with pytest.raises(CacheError, match="capability"):
        open_cache(str(cache), need=["captions"])


def test_all_arrays_are_readable(cache):
    arrays = cache_arrays(cache)
    assert "vocab/head" in arrays and "images/00002/emb" in arrays
