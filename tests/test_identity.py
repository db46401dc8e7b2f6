"""One "same teacher?" rule (kdcache.teacher.teacher_mismatch) for build --resume, online KD, eval and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_cache, make_teacher_dir

from kdcache.cache.config import BuildError
from kdcache.export import ExportError, export
from kdcache.quickstart import tiny_teacher_path
from kdcache.teacher import load_teacher, same_teacher, teacher_mismatch
from kdcache.train.config import TrainConfig
from kdcache.train.loop import run as train

CFG = {"embed_dim": 8, "vision_cfg": {"width": 16}, "text_cfg": {"width": 16}}


def _ident(**kw) -> dict:
    base = {"spec": "x", "pretrained": None, "digest": "sha256:aa", "random_init": False, "init_seed": None,
            "model_cfg": CFG}
    return {**base, **kw}


def test_the_rule():
    # Loaded weights: the digest decides, wherever the checkpoint now lives.
    assert same_teacher(_ident(), _ident(spec="moved/elsewhere"))
    assert "digest" in teacher_mismatch(_ident(), _ident(digest="sha256:bb"))
    # One checkpoint read under another config is another function.
    assert "model_cfg" in teacher_mismatch(_ident(), _ident(model_cfg={**CFG, "quick_gelu": True}))
    # Random init: no file to hash; the config and the init seed decide.
    rnd = _ident(digest=None, random_init=True, init_seed=0)
    assert same_teacher(rnd, dict(rnd, spec="other/path.json"))
    assert "init_seed" in teacher_mismatch(rnd, dict(rnd, init_seed=1))
    assert "model_cfg" in teacher_mismatch(rnd, dict(rnd, model_cfg={**CFG, "embed_dim": 16}))
    assert "random_init" in teacher_mismatch(rnd, _ident())
    assert teacher_mismatch(rnd, {k: v for k, v in rnd.items() if k != "model_cfg"})
    # Nothing recorded is never "the same".
    assert not same_teacher(None, _ident())
    assert not same_teacher(_ident(digest=None), _ident(digest=None))


def test_load_teacher_identities_follow_the_rule(teacher_spec, tmp_path):
    a = load_teacher(teacher_spec).identity
    b = load_teacher(f"local-dir:{make_teacher_dir(tmp_path / 'other', seed=3)}").identity
    assert same_teacher(a, load_teacher(teacher_spec).identity)
    assert not same_teacher(a, b)
    r1 = load_teacher(tiny_teacher_path(), allow_random_init=True).identity
    wider = json.loads(Path(tiny_teacher_path()).read_text())
    wider["model_cfg"]["vision_cfg"]["width"] = 32
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    r2 = load_teacher(str(tmp_path / "wider.json"), allow_random_init=True).identity
    assert same_teacher(r1, load_teacher(tiny_teacher_path(), allow_random_init=True).identity)
    assert not same_teacher(r1, r2) and not same_teacher(r1, a)


@pytest.fixture(scope="module")
def random_init_run(tmp_path_factory, shards, classes_file):
    """An image run distilled from the embedded random-init tiny teacher (no weights file, so no digest)."""
    root = tmp_path_factory.mktemp("rnd")
    cache = root / "cache.zarr"
    assert build_cache(cache, teacher=tiny_teacher_path(), allow_random_init=True, images=tuple(shards),
                       classes=classes_file).ok
    out = root / "run"
    train(TrainConfig(cache=str(cache), tower="image", student="kdc-tiny-image", out=str(out), max_steps=2,
                      batch_size=8, progress=False))
    return out


def test_export_refuses_another_teacher_for_a_random_init_run(random_init_run, teacher_spec, tmp_path):
    # The bug this rule fixes: with no digest on the run's side, any teacher used to be accepted.
    with pytest.raises(ExportError, match="not the teacher the run was distilled from.*random_init"):
        export(out=str(tmp_path / "a"), image_run=str(random_init_run), text_from_teacher=teacher_spec)
    wider = json.loads(Path(tiny_teacher_path()).read_text())
    wider["model_cfg"]["text_cfg"]["width"] = 32
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    with pytest.raises(ExportError, match="model_cfg"):
        export(out=str(tmp_path / "b"), image_run=str(random_init_run), text_from_teacher=str(tmp_path / "wider.json"),
               allow_random_init=True)
    # The run's own random-init teacher is accepted, and the export loads.
    out = export(out=str(tmp_path / "c"), image_run=str(random_init_run), text_from_teacher=tiny_teacher_path(),
                 allow_random_init=True)
    assert (out / "open_clip_model.safetensors").is_file()


def test_resume_accepts_a_moved_checkpoint_and_refuses_other_weights(tmp_path, shards):
    first = make_teacher_dir(tmp_path / "t1", seed=0)
    out = tmp_path / "cache.zarr"
    assert build_cache(out, teacher=f"local-dir:{first}", images=tuple(shards[:1])).ok
    moved = tmp_path / "moved"
    first.rename(moved)
    assert build_cache(out, teacher=f"local-dir:{moved}", images=tuple(shards[:2]), resume=True).ok
    other = make_teacher_dir(tmp_path / "t2", seed=5)
    with pytest.raises(BuildError, match="teacher changed.*digest"):
        build_cache(out, teacher=f"local-dir:{other}", images=tuple(shards), resume=True)
