"""kdcache train and export: students learn from the cache alone, resume exactly, and stock open_clip loads them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from conftest import build_cache
from safetensors.torch import load_file

from kdcache.cli.main import cli
from kdcache.export import ExportError, export
from kdcache.train.config import TrainConfig, TrainError
from kdcache.train.loop import run
from kdcache.train.rundir import load_run_student


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_spec, classes_file):
    from kdcache.synth import write_captions, write_image_shards

    d = tmp_path_factory.mktemp("train")
    shards = write_image_shards(d / "shards", n_shards=4, per_shard=24, seed=3)
    caps = write_captions(d / "caps.jsonl", "jsonl", n=60, seed=3)
    out = d / "cache.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards), captions=(caps,), views=2,
                       classes=classes_file, templates="photo").ok
    return str(out)


def _cfg(cache, out, **kw) -> TrainConfig:
    base = {"tower": "image", "student": "kdc-tiny-image", "max_steps": 12, "batch_size": 8, "progress": False,
            "threads": 1, "checkpoint_every": 4}
    return TrainConfig(cache=cache, out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def image_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "img"
    res = run(_cfg(cache, out, losses=(("l1", 0.6), ("ce", 0.35), ("kl", 0.05)), temperature=4.0))
    assert res.steps == 12
    return out


@pytest.fixture(scope="module")
def text_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "txt"
    run(_cfg(cache, out, tower="text", student="kdc-tiny-text", losses=(("cosine", 1.0), ("icl", 0.5))))
    return out


def test_run_directory_describes_itself(image_run, cache):
    d = Path(image_run)
    conf = json.loads((d / "config.json").read_text())
    assert conf["config"]["loss_formula"] == "0.6*l1 + 0.35*ce + 0.05*kl"
    assert conf["cache_fingerprint"].startswith("sha256:") and conf["tower"] == "image"
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert {"l1_loss", "ce_loss", "kl_loss", "loss", "lr", "samples_per_s"} <= set(train_rows[0])
    val = [r for r in rows if r["kind"] == "val"][-1]
    assert 0 < val["val_rows"] and -1 <= val["val_cosine"] <= 1 and 0 <= val["val_top1_agreement"] <= 1
    assert (d / "metrics.csv").read_text().startswith("kind,step")
    done = json.loads((d / "done.json").read_text())
    assert done["steps"] == 12
    assert (d / "final" / "student.safetensors").exists()


def test_training_moves_the_student_toward_the_teacher(cache, tmp_path):
    """Not a quality claim: the loss must fall when the loop works at all (same data, 40 steps)."""
    res = run(_cfg(cache, tmp_path / "r", max_steps=40, lr=3e-3, losses=(("cosine", 1.0),), val_fraction=0.0))
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
    assert res.steps == 40


def test_workers_persist_across_epochs_and_validation_without_changing_the_run(cache, tmp_path):
    """Several epochs, each with a validation pass, from one pool of 2 workers: the same weights and metrics as
    in-process loading (workers that missed an epoch change would replay epoch 0's batches and views)."""
    runs = {}
    for w in (0, 2):
        res = run(_cfg(cache, tmp_path / f"w{w}", max_steps=None, epochs=3, workers=w, losses=(("cosine", 1.0),)))
        rows = [json.loads(x) for x in (tmp_path / f"w{w}" / "metrics.jsonl").read_text().splitlines()]
        runs[w] = (res, _final(tmp_path / f"w{w}"),
                   [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows])
    (r0, f0, m0), (r2, f2, m2) = runs[0], runs[2]
    assert r0.epochs_done == r2.epochs_done == 3 and sum(r["kind"] == "val" for r in m0) == 3
    assert m0 == m2
    assert all(torch.equal(f0[k], f2[k]) for k in f0)


def test_the_teacher_is_never_imported(cache, tmp_path):
    code = f"""
import sys
from kdcache.train.config import TrainConfig
from kdcache.train.loop import run
run(TrainConfig(cache={cache!r}, out={str(tmp_path / 'r')!r}, tower="image", student="kdc-tiny-image",
                max_steps=2, batch_size=8, progress=False, workers=1))
bad = [m for m in sys.modules
       if m in ("kdcache.teacher", "kdcache.cache.build") or m.startswith("kdcache.online")]
assert not bad, bad
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-2000:]


def _final(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "final" / "student.safetensors"))


def _train_args(cache, out, *extra):
    return ["train", "--cache", cache, "--tower", "image", "--student", "kdc-tiny-image", "--out", str(out),
            "--max-steps", "24", "--batch-size", "8", "--threads", "1", "--checkpoint-every", "3",
            "--loss", "cosine=1", "--loss", "kl=0.5", "--workers", "2", "--no-progress", *extra]


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_same_weights(cache, tmp_path):
    ref = tmp_path / "ref"
    r = CliRunner().invoke(cli, _train_args(cache, ref))
    assert r.exit_code == 0, r.output
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli.main", *_train_args(cache, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 180
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists() and not (out / "done.json").exists(), "the kill landed outside the run"
    r = CliRunner().invoke(cli, _train_args(cache, out, "--resume"))
    assert r.exit_code == 0, r.output
    a, b = _final(ref), _final(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(1, 25))  # rows logged after the checkpoint were replaced, not duplicated


def test_refusals_name_what_is_wrong(cache, tmp_path, teacher_spec, shards, image_run):
    with pytest.raises(TrainError, match="already exists"):
        run(_cfg(cache, image_run))
    with pytest.raises(TrainError, match="config changed.*lr"):
        run(_cfg(cache, image_run, losses=(("l1", 0.6), ("ce", 0.35), ("kl", 0.05)), temperature=4.0, lr=1e-3,
                 resume=True))
    with pytest.raises(ValueError, match="kl"):
        run(_cfg(cache, tmp_path / "t", tower="text", student="kdc-tiny-text", losses=(("kl", 1.0),)))
    no_logits = tmp_path / "nologits.zarr"
    assert build_cache(no_logits, teacher=teacher_spec, images=tuple(shards)).ok
    with pytest.raises(TrainError, match="loss 'kl' needs logits.*--classes"):
        run(_cfg(str(no_logits), tmp_path / "u", losses=(("kl", 1.0),)))
    with pytest.raises(TrainError, match="--tower text needs captions"):
        only_img = tmp_path / "onlyimg.zarr"
        from kdcache.synth import write_image_shards

        s = write_image_shards(tmp_path / "s", n_shards=1, per_shard=4, captions=False)
        assert build_cache(only_img, teacher=teacher_spec, images=tuple(s)).ok
        run(_cfg(str(only_img), tmp_path / "v", tower="text", student="kdc-tiny-text"))


def test_cli_train_prints_the_formula_and_rejects_bad_losses(cache, tmp_path):
    r = CliRunner().invoke(cli, _train_args(cache, tmp_path / "c")[:-5] + ["--loss", "seed001", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "0.6*l1 + 0.35*ce + 0.05*kl" in r.output
    r = CliRunner().invoke(cli, _train_args(cache, tmp_path / "d") + ["--loss", "nonsense=1"])
    assert r.exit_code == 2 and "nonsense" in r.output


# ---------------------------------------------------------------------------------------------------------- export

def _stock(dirpath):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{dirpath}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{dirpath}")


def test_export_image_run_loads_in_stock_open_clip(image_run, teacher_spec, tmp_path, classes_file):
    out = export(out=str(tmp_path / "exp"), image_run=str(image_run), text_from_teacher=teacher_spec)
    assert {p.name for p in out.iterdir()} >= {"open_clip_config.json", "open_clip_model.safetensors", "README.md"}
    model, preprocess, tok = _stock(out)
    student, conf = load_run_student(image_run)
    teacher, _, _ = open_clip.create_model_and_transforms(teacher_spec)
    teacher.eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        got = model.encode_image(x, normalize=True)
        want = student(x)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
        texts = tok(["a photo of a red.", "a photo of a blue."])
        np.testing.assert_allclose(model.encode_text(texts, normalize=True).numpy(),
                                   teacher.encode_text(texts, normalize=True).numpy(), atol=1e-5)
        assert torch.allclose(model.logit_scale.exp(), teacher.logit_scale.exp())
        # zero-shot with the export: classify with its own text tower
        head = open_clip.build_zero_shot_classifier(model, tok, ["red", "green", "blue"], ["a photo of a {}."])
        assert (got @ head).shape == (3, 3)
    card = (out / "README.md").read_text()
    assert "0.6*l1 + 0.35*ce + 0.05*kl" in card and "kdc-tiny-image" in card


def test_export_text_run_and_both_runs(image_run, text_run, teacher_spec, tmp_path):
    out = export(out=str(tmp_path / "t"), text_run=str(text_run), image_from_teacher=teacher_spec)
    model, _, tok = _stock(out)
    student, _ = load_run_student(text_run)
    tokens = tok(["a photo of a green."])
    with torch.no_grad():
        np.testing.assert_allclose(model.encode_text(tokens, normalize=True).numpy(), student(tokens).numpy(),
                                   atol=1e-5)
    both = export(out=str(tmp_path / "b"), image_run=str(image_run), text_run=str(text_run))
    model, _, _ = _stock(both)
    assert model.encode_image(torch.rand(1, 3, 32, 32)).shape[-1] == 32


def test_export_refusals(image_run, tmp_path, tmp_path_factory):
    from conftest import make_teacher_dir

    with pytest.raises(ExportError, match="exactly one source"):
        export(out=str(tmp_path / "x"), image_run=str(image_run))
    other = make_teacher_dir(tmp_path / "other-teacher", seed=7)
    with pytest.raises(ExportError, match="digest"):
        export(out=str(tmp_path / "y"), image_run=str(image_run), text_from_teacher=f"local-dir:{other}")
    r = CliRunner().invoke(cli, ["export", "--image", str(image_run), "--out", str(tmp_path / "z")])
    assert r.exit_code != 0 and "--text-from-teacher" in r.output
