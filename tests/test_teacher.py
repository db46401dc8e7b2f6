"""The teacher is loaded through open_clip, identified by its checkpoint bytes, never silently random, and computes
exactly what stock open_clip computes."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from kdcache.quickstart import tiny_teacher_path
from kdcache.teacher import TeacherError, load_teacher
from kdcache.views import eval_transform_uint8

CKPT = "open_clip_model.safetensors"


def tiny_cfg() -> dict:
    return json.loads(Path(tiny_teacher_path()).read_text())


def save_weights(cfg: dict, path: Path, *, seed: int) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg["model_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def make_dir(path: Path, *, cfg: dict | None = None, weights: bool = True, seed: int = 0) -> Path:
    cfg = cfg or tiny_cfg()
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    if weights:
        save_weights(cfg, path / CKPT, seed=seed)
    return path


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(45, 29), (32, 32), (20, 50), (64, 40)]
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % 4][1], sizes[i % 4][0], 3), dtype=np.uint8))
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_dir(tmp_path_factory.mktemp("teacher") / "tiny")


def first_param(model: torch.nn.Module) -> torch.Tensor:
    return model.visual.conv1.weight.detach().cpu()


def test_local_dir_identity_preprocess_and_frozen(tiny_dir):
    t = load_teacher(f"local-dir:{tiny_dir}")
    assert t.identity["digest"] == sha256(tiny_dir / CKPT)
    assert t.identity["checkpoint"] == str(tiny_dir / CKPT)
    assert t.identity["random_init"] is False
    assert t.identity["model_cfg"] == tiny_cfg()["model_cfg"]
    json.dumps(t.identity), json.dumps(t.preprocess)  # both go into the cache's attributes
    pp = tiny_cfg()["preprocess_cfg"]
    assert t.preprocess["size"] == [32, 32]
    for k in ("mean", "std", "interpolation", "resize_mode"):
        assert t.preprocess[k] == pp[k], k
    assert "default" not in t.preprocess["source"] and "open_clip_config.json" in t.preprocess["source"]
    assert t.embed_dim == 32 and t.precision == "fp32" and t.device == torch.device("cpu")
    assert t.logit_scale == pytest.approx(float(t.model.logit_scale.exp()))
    assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())


def test_encode_images_matches_stock_open_clip(tiny_dir):
    spec = f"local-dir:{tiny_dir}"
    t = load_teacher(spec)
    model, _, val = open_clip.create_model_and_transforms(spec)
    model.eval()
    imgs = images(6)
    tf = eval_transform_uint8(t.preprocess)
    pixels = torch.stack([tf(im) for im in imgs])
    ref_input = torch.stack([val(im) for im in imgs])
    assert torch.equal(t.normalize_images(pixels), ref_input)  # the model sees bit-identical inputs
    with torch.no_grad():
        ref = model.encode_image(ref_input, normalize=True)  # same batch composition: CPU results depend on it
    got = t.encode_images(pixels)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (6, 32)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(6))


def test_encode_texts_and_zero_shot_head_match_open_clip(tiny_dir):
    spec = f"local-dir:{tiny_dir}"
    t = load_teacher(spec)
    model = open_clip.create_model(spec).eval()
    tok = open_clip.get_tokenizer(spec)
    texts = ["a photo of a cat.", "a dog", "a very long caption that is longer than the sixteen token context " * 3]
    with torch.no_grad():
        ref = model.encode_text(tok(texts), normalize=True)
    torch.testing.assert_close(t.encode_texts(texts), ref, atol=1e-6, rtol=0)
    assert t.encode_texts([]).shape == (0, 32)

    classes = [f"class {i}" for i in range(13)]  # more than open_clip's 10 classes per batch
    templates = ["a photo of a {}.", "a {} in a video game."]
    head = t.zero_shot_head(classes, templates)
    ref = open_clip.build_zero_shot_classifier(model, tok, classes, templates).T
    assert head.shape == (13, 32) and head.dtype == torch.float32
    torch.testing.assert_close(head, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(head.norm(dim=1), torch.ones(13))


def test_missing_weights_refused_unless_allowed(tmp_path, caplog):
    d = make_dir(tmp_path / "noweights", weights=False)
    with pytest.raises(TeacherError, match="allow-random-init"):
        load_teacher(f"local-dir:{d}")
    state = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="kdcache.teacher"):
        t = load_teacher(f"local-dir:{d}", allow_random_init=True)
    assert any("RANDOM" in r.getMessage() for r in caplog.records)
    assert t.identity["random_init"] is True and t.identity["digest"] is None and t.identity["checkpoint"] is None
    # Random weights come from a fixed seed in a forked RNG: reproducible, and the caller's RNG is untouched.
    assert torch.equal(torch.random.get_rng_state(), state)
    t2 = load_teacher(f"local-dir:{d}", allow_random_init=True)
    assert torch.equal(first_param(t.model), first_param(t2.model))


def test_allow_random_init_still_loads_weights_when_present(tiny_dir):
    t = load_teacher(f"local-dir:{tiny_dir}", allow_random_init=True)
    assert t.identity["random_init"] is False and t.identity["digest"] == sha256(tiny_dir / CKPT)


def test_nested_json_with_checkpoint(tiny_dir, tmp_path):
    cfg_file = tmp_path / "teacher.json"
    shutil.copy(tiny_teacher_path(), cfg_file)
    ckpt = save_weights(tiny_cfg(), tmp_path / "weights.safetensors", seed=3)
    t = load_teacher(str(cfg_file), pretrained=str(ckpt))
    assert t.identity["digest"] == sha256(ckpt) and t.identity["checkpoint"] == str(ckpt)
    assert t.identity["random_init"] is False and t.identity["spec"] == str(cfg_file)
    assert t.preprocess["mean"] == [0.5, 0.5, 0.5] and "default" not in t.preprocess["source"]
    from safetensors.torch import load_file

    assert torch.equal(first_param(t.model), load_file(str(ckpt))["visual.conv1.weight"])
    with pytest.raises(TeacherError, match="allow-random-init"):
        load_teacher(str(cfg_file))
    with pytest.raises(TeacherError, match="checkpoint file"):
        load_teacher(str(cfg_file), pretrained="openai")


def test_nested_json_with_pt_checkpoint(tmp_path):
    # open_clip's directory scan ignores *.pt; the temporary local-dir names it so that it is found.
    cfg_file = tmp_path / "teacher.json"
    shutil.copy(tiny_teacher_path(), cfg_file)
    torch.manual_seed(5)
    sd = open_clip.model.CLIP(**tiny_cfg()["model_cfg"]).state_dict()
    torch.save(sd, tmp_path / "w.pt")
    t = load_teacher(str(cfg_file), pretrained=str(tmp_path / "w.pt"))
    assert t.identity["digest"] == sha256(tmp_path / "w.pt")
    assert torch.equal(first_param(t.model), sd["visual.conv1.weight"])


def test_flat_json_uses_loud_default_preprocessing(tmp_path, caplog):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(tiny_cfg()["model_cfg"]))
    with caplog.at_level(logging.WARNING, logger="kdcache.teacher"):
        t = load_teacher(str(flat), allow_random_init=True)
    assert "default" in t.preprocess["source"]
    assert any("default" in r.getMessage() and "mean" in r.getMessage() for r in caplog.records)
    assert t.preprocess["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    assert t.preprocess["size"] == [32, 32]
    assert t.identity["random_init"] is True


def test_builtin_name_with_checkpoint_file_and_tag(tiny_dir, tmp_path, monkeypatch, caplog):
    # Register the tiny config as a built-in (monkeypatch undoes it) so no 100M-parameter model is built.
    cfg = tiny_cfg()
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "kdc-test-tiny", cfg["model_cfg"])
    ckpt = tiny_dir / CKPT
    with caplog.at_level(logging.WARNING, logger="kdcache.teacher"):
        t = load_teacher("kdc-test-tiny", pretrained=str(ckpt))
    assert t.identity["digest"] == sha256(ckpt) and t.identity["pretrained"] == str(ckpt)
    assert torch.equal(first_param(t.model), first_param(load_teacher(f"local-dir:{tiny_dir}").model))
    assert "default" in t.preprocess["source"], "a checkpoint file carries no preprocessing: say so"
    assert any("default" in r.getMessage() for r in caplog.records)

    tag = {"file": str(ckpt), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "interpolation": "bilinear",
           "resize_mode": "squash"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "kdc-test-tiny", {"kdctag": tag})
    t = load_teacher("kdc-test-tiny", pretrained="kdctag")
    assert t.identity["digest"] == sha256(ckpt)
    assert t.preprocess["mean"] == [0.1, 0.2, 0.3] and t.preprocess["resize_mode"] == "squash"
    assert "kdctag" in t.preprocess["source"] and "default" not in t.preprocess["source"]
    with pytest.raises(TeacherError, match="kdctag"):
        load_teacher("kdc-test-tiny", pretrained="no-such-tag")
    with pytest.raises(TeacherError, match="allow-random-init"):
        load_teacher("kdc-test-tiny")

    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "kdc-test-tiny", {"qg": {**tag, "quick_gelu": True}})
    with pytest.raises(TeacherError, match="quick_gelu"):
        load_teacher("kdc-test-tiny", pretrained="qg")


def test_hf_hub_through_open_clip_download_helper(tiny_dir, monkeypatch):
    calls = []

    def fake_download(model_id, filename=None, revision=None, cache_dir=None):
        calls.append((model_id, filename))
        if model_id != "kdc/tiny":
            raise FileNotFoundError(f"no repo {model_id}")
        p = tiny_dir / (filename or CKPT)
        if not p.is_file():
            raise FileNotFoundError(str(p))
        return str(p)

    # factory imported the helper by name, so both references are replaced.
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", fake_download)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", fake_download)
    t = load_teacher("hf-hub:kdc/tiny")
    assert t.identity["digest"] == sha256(tiny_dir / CKPT)
    assert t.preprocess["mean"] == [0.5, 0.5, 0.5] and "hf-hub:kdc/tiny" in t.preprocess["source"]
    assert ("kdc/tiny", None) in calls and ("kdc/tiny", "open_clip_config.json") in calls
    with pytest.raises(TeacherError, match="open_clip_config.json"):
        load_teacher("hf-hub:kdc/missing")


def test_hf_hub_without_weights_refused(tiny_dir, monkeypatch):
    def config_only(model_id, filename=None, revision=None, cache_dir=None):
        if filename == "open_clip_config.json":
            return str(tiny_dir / filename)
        raise FileNotFoundError("no weights in repo")

    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", config_only)
    with pytest.raises(TeacherError, match="no weights in repo.*allow-random-init"):
        load_teacher("hf-hub:kdc/tiny")


def test_clear_errors(tiny_dir, monkeypatch, tmp_path):
    with pytest.raises(TeacherError, match=r"ViT-B-32"):  # a close match is suggested
        load_teacher("ViT-B-33")
    with pytest.raises(TeacherError, match="Tags of RN50: .*openai"):
        load_teacher("RN50", pretrained="not-a-tag")
    with pytest.raises(TeacherError, match="no such directory"):
        load_teacher(f"local-dir:{tmp_path / 'nope'}")
    with pytest.raises(TeacherError, match="no such file"):
        load_teacher(str(tmp_path / "nope.json"))
    with pytest.raises(TeacherError, match="--pretrained is not used"):
        load_teacher(f"local-dir:{tiny_dir}", pretrained="openai")
    with pytest.raises(TeacherError, match="precision"):
        load_teacher(f"local-dir:{tiny_dir}", precision="fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TeacherError, match="CUDA is not available"):
        load_teacher(f"local-dir:{tiny_dir}", device="cuda")


def test_low_precision_on_cpu_falls_back_loudly(tiny_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="kdcache.teacher"):
        t = load_teacher(f"local-dir:{tiny_dir}", precision="bf16")
    assert t.precision == "fp32"
    assert any("bf16" in r.getMessage() for r in caplog.records)
    assert next(t.model.parameters()).dtype == torch.float32


@pytest.mark.gpu
def test_cuda_autocast_close_to_cpu(tiny_dir):
    cpu = load_teacher(f"local-dir:{tiny_dir}")
    gpu = load_teacher(f"local-dir:{tiny_dir}", device="cuda", precision="fp16")
    assert gpu.precision == "fp16"
    pixels = torch.stack([eval_transform_uint8(cpu.preprocess)(im) for im in images(8)]).pin_memory()
    a, b = cpu.encode_images(pixels), gpu.encode_images(pixels)
    assert b.dtype == torch.float32 and b.device.type == "cpu"
    torch.testing.assert_close(b, a, atol=5e-3, rtol=0)
    torch.testing.assert_close(gpu.zero_shot_head(["a", "b"], ["{}"]), cpu.zero_shot_head(["a", "b"], ["{}"]),
                               atol=5e-3, rtol=0)
