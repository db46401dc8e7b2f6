"""Online KD (`kdcache train --online-teacher`): the same training with the teacher live in the loop.

Offline equals online on data: the live teacher, shown the very views the student sees, gives the cached targets back;
the two runs end with nearly the same weights; only this path imports the teacher."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import build_cache
from safetensors.torch import load_file

from kdcache.cache.reader import open_cache
from kdcache.cli.main import cli
from kdcache.online import OnlineTargets, run_online
from kdcache.teacher import load_teacher
from kdcache.train.config import TrainConfig, TrainError
from kdcache.train.dataspec import DataSpec
from kdcache.train.loader import make_loader
from kdcache.train.loop import run
from kdcache.train.losses import LossInputs, WeightedLoss
from kdcache.train.students import build_student

CPU = torch.device("cpu")
# The student's views at another size and interpolation than the teacher's (32 px bicubic): teacher_pixels must
# still be rendered at the teacher's.
STUDENT_PP = {"size": 24, "mean": [0.4] * 3, "std": [0.3] * 3, "interpolation": "bilinear", "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_spec, classes_file):
    from kdcache.synth import write_captions, write_image_shards

    d = tmp_path_factory.mktemp("online")
    shards = write_image_shards(d / "shards", n_shards=3, per_shard=16, size=(64, 48), seed=5)
    caps = write_captions(d / "caps.jsonl", "jsonl", n=40, seed=5)
    out = d / "cache.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards), captions=(caps,), views=3,
                       classes=classes_file, templates="photo", batch_size=16).ok
    return str(out)


@pytest.fixture(scope="module")
def targets(teacher_spec):
    return OnlineTargets(load_teacher(teacher_spec))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def test_online_targets_equal_the_cached_ones_for_the_same_views(cache, targets):
    """Offline equals online on data: for every training view (0, 1, 2) and the validation view, the live teacher's
    image embedding of the re-rendered view and its text embedding of the paired caption match the cache (fp16
    storage, so cosine >= 0.999 rather than equality); so do the zero-shot head and the logit scale."""
    c = open_cache(cache)
    live = targets.prepare(c, tower="image", needs=("logits", "pairs"), device=CPU)
    assert live.embed_dim == c.embed_dim and live.logit_scale == pytest.approx(c.logit_scale)
    assert _cos(live.head, torch.from_numpy(c.vocab()[2])).min() >= 0.999
    spec = DataSpec(cache=cache, tower="image", batch_size=8, buffer=16, val_fraction=0.2)
    views, paired = set(), 0
    for split, epoch in (("train", 0), ("train", 1), ("val", 0)):
        for b in make_loader(spec, split=split, epoch=epoch, student_preprocess=STUDENT_PP, **live.loader):
            assert b["pixels"].shape[-2:] == (24, 24) and b["teacher_pixels"].shape[-2:] == (32, 32)
            cached_t, cached_o, has = b["teacher"].clone(), b["other"].clone(), b["has_other"].clone()
            out = targets(b)
            assert "teacher_pixels" not in out and "texts" not in out
            assert _cos(out["teacher"], cached_t).min() >= 0.999, (split, b["view"])
            assert not torch.equal(out["teacher"], cached_t)  # live, not copied from the cache
            assert _cos(out["other"][has], cached_o[has]).min() >= 0.999
            assert torch.isnan(out["other"][~has]).all()
            views |= set(b["view"].tolist())
            paired += int(has.sum())
    assert views == {0, 1, 2} and paired > 0


def test_online_text_targets_equal_the_cached_ones(cache, targets, teacher_spec):
    live = targets.prepare(open_cache(cache), tower="text", needs=(), device=CPU)
    spec = DataSpec(cache=cache, tower="text", batch_size=8, buffer=16)
    n = 0
    for b in make_loader(spec, split="train", epoch=0, tokenizer=open_clip.get_tokenizer(teacher_spec),
                         **live.loader):
        cached = b["teacher"].clone()
        out = targets(b)
        assert _cos(out["teacher"], cached).min() >= 0.999
        assert "other" not in out  # no loss needs pairs: nothing cached reaches the losses
        n += len(cached)
    assert n > 40  # paired captions and the corpus alike


def test_online_targets_are_autograd_safe(cache, targets):
    """Targets made under no_grad enter a loss with the student and backpropagate. The same targets made under
    inference_mode (as Teacher.encode_images does) would fail: the check below shows that this test can fail."""
    c = open_cache(cache)
    live = targets.prepare(c, tower="image", needs=("logits", "pairs"), device=CPU)
    student = build_student("kdc-tiny-image", tower="image", teacher_dim=live.embed_dim)
    loss = WeightedLoss({"l1": 1.0, "kl": 1.0, "icl": 1.0}, "image")
    spec = DataSpec(cache=cache, tower="image", batch_size=8)
    b = targets(next(iter(make_loader(spec, split="train", epoch=0, student_preprocess=student.preprocess,
                                      **live.loader))))

    def step(teacher: torch.Tensor, other: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        s = student(student.normalize_pixels(b["pixels"]))
        total = loss(LossInputs(student=s, teacher=teacher, head=head, logit_scale=live.logit_scale,
                                temperature=2.0, other=other, has_other=b["has_other"]))["loss"]
        total.backward()
        return total

    assert not any(t.is_inference() for t in (b["teacher"], b["other"], live.head))
    assert torch.isfinite(step(b["teacher"], b["other"], live.head))
    assert all(p.grad is not None for p in student.trainable_parameters())
    with torch.inference_mode():
        frozen = b["teacher"].clone(), b["other"].clone(), live.head.clone()
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        step(*frozen)


def _cfg(cache, out, **kw) -> TrainConfig:
    base = {"tower": "image", "student": "kdc-tiny-image", "max_steps": 12, "batch_size": 8, "progress": False,
            "threads": 1, "checkpoint_every": 100, "lr": 3e-3, "temperature": 2.0,
            "losses": (("cosine", 1.0), ("kl", 0.5), ("icl", 0.5))}
    return TrainConfig(cache=cache, out=str(out), **{**base, **kw})


def test_online_and_offline_runs_end_with_nearly_identical_weights(cache, teacher_spec, tmp_path):
    """Same seed, student, losses, views and order: the runs differ only in where the targets come from. The cache
    stores them in fp16 (relative rounding ~5e-4), so the weights are not bit-equal; their difference is tiny next to
    how far training moved them (and 12 Adam steps at lr 3e-3 move them a lot)."""
    off, on = tmp_path / "off", tmp_path / "on"
    run(_cfg(cache, off))
    run_online(_cfg(cache, on), teacher=teacher_spec)
    init = build_student("kdc-tiny-image", tower="image", teacher_dim=32, seed=0).state_dict()
    a, b = (load_file(str(d / "final" / "student.safetensors")) for d in (off, on))
    assert a.keys() == b.keys()
    diff = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    moved = torch.sqrt(sum(((a[k] - init[k]) ** 2).sum() for k in a))
    assert moved > 1.0 and diff / moved < 0.02, (float(diff), float(moved))
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()
               if json.loads(x)["kind"] == "train"] for d in (off, on)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)

    conf = json.loads((on / "config.json").read_text())
    t = load_teacher(teacher_spec)
    assert conf["mode"] == "online" and conf["config"]["mode"] == "online"
    assert conf["config"]["online_teacher"]["spec"] == teacher_spec
    assert conf["config"]["online_teacher"]["digest"] == t.identity["digest"] == conf["teacher"]["digest"]
    assert conf["cache_teacher"]["digest"] == t.identity["digest"]
    assert json.loads((off / "config.json").read_text())["mode"] == "offline"
    # the online teacher is part of the --resume identity: an offline --resume of the online run is refused
    with pytest.raises(TrainError, match="config changed.*mode"):
        run(_cfg(cache, on, resume=True))


def test_text_tower_online_refuses_pair_losses(cache, targets):
    with pytest.raises(TrainError, match="icl and affinity"):
        targets.prepare(open_cache(cache), tower="text", needs=("pairs",), device=CPU)


def test_cli_online_teacher(cache, teacher_spec, tmp_path):
    args = ["train", "--cache", cache, "--tower", "image", "--student", "kdc-tiny-image", "--max-steps", "3",
            "--batch-size", "8", "--threads", "1", "--no-progress", "--loss", "cosine=1"]
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a"), "--online-teacher", teacher_spec])
    assert r.exit_code == 0, r.output
    conf = json.loads((tmp_path / "a" / "config.json").read_text())
    assert conf["mode"] == "online" and conf["config"]["online_teacher"]["spec"] == teacher_spec
    assert (tmp_path / "a" / "done.json").exists()
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b"), "--online-pretrained", "x"])
    assert r.exit_code == 2 and "need --online-teacher" in r.output
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "c"), "--online-teacher", "ViT-B-32"])
    assert r.exit_code == 1 and "no weights" in r.output  # refused before anything is built, no traceback


def test_the_teacher_is_imported_on_the_online_path_only(cache, teacher_spec, tmp_path):
    """The converse of test_train's test_the_teacher_is_never_imported, through the CLI in one fresh process."""
    code = f"""
import sys
from click.testing import CliRunner
from kdcache.cli.main import cli
args = ["train", "--cache", {cache!r}, "--tower", "image", "--student", "kdc-tiny-image", "--max-steps", "2",
        "--batch-size", "8", "--no-progress", "--workers", "1"]
teacher = ("kdcache.teacher", "kdcache.online")
r = CliRunner().invoke(cli, args + ["--out", {str(tmp_path / 'off')!r}])
assert r.exit_code == 0, r.output
assert not [m for m in teacher if m in sys.modules], "offline"
r = CliRunner().invoke(cli, args + ["--out", {str(tmp_path / 'on')!r}, "--online-teacher", {teacher_spec!r}])
assert r.exit_code == 0, r.output
assert all(m in sys.modules for m in teacher), "online"
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).parent)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-2000:]
