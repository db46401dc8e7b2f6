"""Hidden-layer hints: `kdcache build --hints` caches pooled teacher features per view that equal open_clip's own
module outputs pooled by hand; `kdcache layers` lists the names; `kdcache train --loss hint` learns through an
adapter (or none when widths match), online KD computes the same hints live, and the adapter is never exported."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from conftest import build_cache

from kdcache.cache import schema
from kdcache.cache.config import BuildError
from kdcache.cache.reader import open_cache
from kdcache.cache.verify import info, verify
from kdcache.cli.main import cli
from kdcache.hints import HintHooks, pool
from kdcache.shards import ShardReport, iter_shard, parse_sample
from kdcache.views import eval_transform

HINTS = ("visual.transformer.resblocks.0", "visual.conv1")


@pytest.fixture(scope="module")
def hint_cache(tmp_path_factory, teacher_spec, shards, classes_file):
    out = tmp_path_factory.mktemp("hints") / "cache.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards), views=2, classes=classes_file,
                       hints=HINTS).ok
    return out


def test_pool_rules():
    conv = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    assert torch.equal(pool(conv, mode="cls", batch=2), conv.mean(dim=(2, 3)))
    tokens = torch.randn(2, 5, 4)
    assert torch.equal(pool(tokens, mode="cls", batch=2), tokens[:, 0])
    assert torch.allclose(pool(tokens, mode="mean", batch=2), tokens[:, 1:].mean(1))
    assert torch.equal(pool(tokens.transpose(0, 1), mode="cls", batch=2), tokens[:, 0])  # sequence-first layout


def test_cached_hints_equal_open_clip_module_outputs(hint_cache, teacher_spec, shards):
    c = open_cache(str(hint_cache))
    assert schema.CAP_HINTS in c.capabilities
    layers = c.attrs["build"]["hints"]["layers"]
    assert [x["name"] for x in layers] == list(HINTS) and all(x["dim"] == 64 for x in layers)
    # Recompute view 0 of the first shard's samples with stock open_clip and hooks of our own.
    model, _, _ = open_clip.create_model_and_transforms(teacher_spec)
    model.eval()
    tf = eval_transform(c.attrs["preprocess"])
    imgs = [parse_sample(r, max_pixels=10**8).image for r in iter_shard(shards[0], ShardReport(url=shards[0]))]
    grabbed = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: grabbed.__setitem__(n, o)) for n in HINTS]
    with torch.no_grad():
        model.encode_image(torch.stack([tf(im) for im in imgs]))
    for h in handles:
        h.remove()
    a = c.read(c.units(schema.IMAGES)[0])
    want = {"visual.transformer.resblocks.0": grabbed[HINTS[0]][:, 0], "visual.conv1": grabbed[HINTS[1]].mean((2, 3))}
    for i, name in enumerate(HINTS):
        cached = torch.from_numpy(a[schema.hint_array(i)][:, 0].astype(np.float32))
        assert torch.allclose(cached, want[name], atol=2e-3, rtol=2e-3), name
    assert verify(str(hint_cache), progress=False).ok
    d = info(str(hint_cache))
    assert d["hints"]["bytes_on_disk"] > 0 and [x["name"] for x in d["hints"]["layers"]] == list(HINTS)


def test_verify_catches_a_damaged_hint(hint_cache, tmp_path):
    import shutil

    import zarr

    copy = tmp_path / "c.zarr"
    shutil.copytree(hint_cache, copy)
    g = zarr.open_group(str(copy), mode="r+")
    arr = g[f"{schema.IMAGES}/00000/{schema.hint_array(1)}"]
    x = arr[...]
    x[2, 1] = np.nan
    arr[...] = x
    rep = verify(str(copy), progress=False)
    assert any(schema.hint_array(1) in p and "not finite" in p for p in rep.problems), rep.problems


def test_unknown_hint_module_is_refused_naming_the_tool(tmp_path, teacher_spec, shards):
    with pytest.raises(BuildError, match="no module 'visual.nope'.*kdcache layers"):
        build_cache(tmp_path / "x.zarr", teacher=teacher_spec, images=tuple(shards[:1]), hints=("visual.nope",))


def test_layers_lists_teacher_and_student_modules(teacher_spec):
    r = CliRunner().invoke(cli, ["layers", "--teacher", teacher_spec])
    assert r.exit_code == 0, r.output
    assert "visual.transformer.resblocks.0 " in r.output and "visual.conv1 " in r.output
    r = CliRunner().invoke(cli, ["layers", "--student", "kdc-tiny-image"])
    assert r.exit_code == 0 and "visual.transformer.resblocks.1 " in r.output
    r = CliRunner().invoke(cli, ["layers"])
    assert r.exit_code != 0 and "--teacher SPEC or --student SPEC" in r.output


def test_hooks_keep_the_graph_for_the_student():
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    with HintHooks(m, ["0"]) as hooks:
        m(torch.randn(2, 4))
        f = hooks.take()["0"]
    f.sum().backward()
    assert m[0].weight.grad is not None
    json.dumps({"ok": True})


# ------------------------------------------------------------------------------------------------------- training

STUDENT_HINT = "visual.transformer.resblocks.1"   # kdc-tiny-image: width 32


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory, teacher_spec, shards, classes_file):
    # "visual" is the tiny teacher's image embedding before normalisation: width 32, like the student's blocks
    out = tmp_path_factory.mktemp("hint-train") / "cache.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards), views=2, classes=classes_file,
                       hints=("visual.transformer.resblocks.0", "visual")).ok
    return out


def _train(cache, out, **kw):
    from kdcache.train.config import TrainConfig
    from kdcache.train.loop import run

    kw.setdefault("losses", (("cosine", 1.0), ("hint", 1.0)))
    return run(TrainConfig(cache=str(cache), tower="image", student="kdc-tiny-image", out=str(out), batch_size=8,
                           max_steps=kw.pop("max_steps", 6), lr=3e-3, progress=False, **kw))


def test_hint_loss_trains_through_an_adapter_that_is_not_exported(train_cache, teacher_spec, tmp_path):
    from safetensors.torch import load_file

    from kdcache.export import export
    from kdcache.train import rundir

    run_dir = tmp_path / "run"
    res = _train(train_cache, run_dir, hint_map=((STUDENT_HINT, "visual.transformer.resblocks.0"),), max_steps=12)
    rows = rundir.read_metrics(run_dir)
    hint = [r["hint_loss"] for r in rows if r["kind"] == "train"]
    assert len(hint) == 12 and np.isfinite(hint).all() and np.mean(hint[-3:]) < np.mean(hint[:3])
    assert "val_hint_loss" in res.final_val
    weights = load_file(str(rundir.final_weights(run_dir)))
    assert weights["hint_adapters.0.weight"].shape == (64, 32)  # student width 32 -> teacher hint width 64
    out = export(out=str(tmp_path / "exp"), image_run=str(run_dir), text_from_teacher=teacher_spec)
    exported = load_file(str(out / "open_clip_model.safetensors"))
    assert not any("hint" in k for k in exported)
    open_clip.create_model_and_transforms(f"local-dir:{out}")  # stock open_clip loads it


def test_adapter_none_needs_equal_widths(train_cache, tmp_path):
    from kdcache.train.config import TrainError

    with pytest.raises(TrainError, match="width 32 to a teacher hint of width 64"):
        _train(train_cache, tmp_path / "a", hint_map=((STUDENT_HINT, "visual.transformer.resblocks.0"),),
               hint_adapter="none")
    res = _train(train_cache, tmp_path / "b", hint_map=((STUDENT_HINT, "visual"),), hint_adapter="none")
    assert res.steps == 6
    with pytest.raises(TrainError, match="go together"):
        _train(train_cache, tmp_path / "c")
    with pytest.raises(TrainError, match="does not provide"):
        _train(train_cache, tmp_path / "d", hint_map=((STUDENT_HINT, "visual.conv1"),))


def test_hint_run_resumes_to_the_same_weights(train_cache, tmp_path):
    """The adapters checkpoint and resume with the student: a run rewound to an earlier checkpoint (as after a
    kill) and resumed ends with the weights of an uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    from kdcache.train import rundir

    kw = {"hint_map": ((STUDENT_HINT, "visual.transformer.resblocks.0"),), "checkpoint_every": 3, "max_steps": 9}
    _train(train_cache, tmp_path / "full", **kw)
    part = tmp_path / "part"
    _train(train_cache, part, **kw)
    ckpts = sorted(p.name for p in (part / rundir.CHECKPOINTS).glob("step-*"))
    assert len(ckpts) >= 2 and ckpts[-1] == "step-00000009"
    (part / rundir.CHECKPOINTS / rundir.LATEST).write_text(ckpts[-2])  # back to an earlier step, as after a kill
    shutil.rmtree(part / rundir.CHECKPOINTS / ckpts[-1])
    (part / rundir.DONE).unlink()
    shutil.rmtree(part / rundir.FINAL)
    _train(train_cache, part, resume=True, **kw)
    a, b = (load_file(str(rundir.final_weights(tmp_path / d))) for d in ("full", "part"))
    assert any(k.startswith("hint_adapters.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_online_hints_equal_the_cached_ones(train_cache, teacher_spec):
    from kdcache.online import OnlineTargets
    from kdcache.teacher import load_teacher
    from kdcache.train.dataspec import DataSpec
    from kdcache.train.loader import make_loader

    c = open_cache(str(train_cache))
    targets = OnlineTargets(load_teacher(teacher_spec))
    names = ("visual.transformer.resblocks.0", "visual")
    live = targets.prepare(c, tower="image", needs=("hints",), device=torch.device("cpu"), hints=names)
    assert live.hint_dims == {"visual.transformer.resblocks.0": 64, "visual": 32}
    spec = DataSpec(cache=str(train_cache), tower="image", batch_size=8, hints=names)
    b = next(iter(make_loader(spec, split="train", epoch=0, **live.loader)))
    cached = {n: b[f"hint:{n}"].clone() for n in names}
    out = targets(b)
    for n in names:
        assert not torch.equal(out[f"hint:{n}"], cached[n])  # live, not copied
        assert torch.allclose(out[f"hint:{n}"], cached[n], atol=3e-3, rtol=3e-3), n
