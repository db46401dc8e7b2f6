"""Shared fixtures: a tiny teacher with real (seeded) weights in open_clip's local-dir format, tiny shards, and a
helper that builds a cache. Everything lives in tmp_path; no test touches the network or ../shared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from kdcache.cache import schema
from kdcache.quickstart import tiny_teacher_path

CLASSES = ("red", "green", "blue")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def make_teacher_dir(path: Path, *, seed: int = 0) -> Path:
    """A local-dir teacher: the embedded tiny config plus seeded random weights saved as safetensors."""
    import open_clip
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_teacher_path(), path / "open_clip_config.json")
    cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    return make_teacher_dir(tmp_path_factory.mktemp("teacher") / "kdc-test-teacher")


@pytest.fixture(scope="session")
def teacher_spec(teacher_dir) -> str:
    return f"local-dir:{teacher_dir}"


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> list[str]:
    from kdcache.synth import write_image_shards

    return write_image_shards(tmp_path_factory.mktemp("shards"), n_shards=3, per_shard=10, classes=CLASSES, seed=1)


@pytest.fixture(scope="session")
def classes_file(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("vocab") / "classes.txt"
    p.write_text("\n".join(CLASSES) + "\n")
    return str(p)


def build_cache(out: Path | str, *, teacher: str, **kw):
    from kdcache.cache.build import run
    from kdcache.cache.config import BuildConfig

    kw.setdefault("progress", False)
    kw.setdefault("threads", 1)
    return run(BuildConfig(out=str(out), teacher=teacher, **kw))


def cache_arrays(path) -> dict[str, np.ndarray]:
    """Every array of a cache by path, for identity comparisons."""
    root = zarr.open_group(str(path), mode="r")
    out = {}

    def walk(g, prefix=""):
        for name, arr in g.arrays():
            out[prefix + name] = arr[...]
        for name, sub in g.groups():
            walk(sub, prefix + name + "/")
    walk(root)
    return out


def cache_statuses(path) -> dict[str, dict]:
    root = zarr.open_group(str(path), mode="r")
    out = {}
    if schema.STATUS in root:
        for name, g in root[schema.STATUS].groups():
            out[name] = {k: v for k, v in dict(g.attrs).items() if k not in schema.STATUS_NONDETERMINISTIC_KEYS}
    return out


def assert_identical_caches(a, b) -> None:
    """'Identical cache' = equal array bytes, equal deterministic root attributes, equal unit statuses."""
    from kdcache.cache.reader import deterministic_attrs

    xa, xb = cache_arrays(a), cache_arrays(b)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        va, vb = xa[k], xb[k]
        assert va.shape == vb.shape, k
        if va.dtype.kind == "f":
            assert va.tobytes() == vb.tobytes(), f"array {k} differs"
        else:
            assert (va == vb).all(), f"array {k} differs"
    ra = deterministic_attrs(dict(zarr.open_group(str(a), mode="r").attrs)[schema.ROOT_ATTR])
    rb = deterministic_attrs(dict(zarr.open_group(str(b), mode="r").attrs)[schema.ROOT_ATTR])
    assert ra == rb
    assert cache_statuses(a) == cache_statuses(b)
