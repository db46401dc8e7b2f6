"""Students: tiny configs built offline; the folded export must be a stock open_clip CLIP with the same embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from kdcache.modelcfg import ConfigError, load_config_file, open_clip_from_config
from kdcache.train.students import STUDENTS, StudentError, build_student, register_student

TEACHER_DIM = 32  # the test teacher's embed_dim; the tiny students have 16, so the projection path is used
TINY = {"image": "kdc-tiny-image", "text": "kdc-tiny-text"}


def inputs(student, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if student.tower == "image":
        h, w = student.preprocess["size"]
        return student.normalize_pixels(torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g))
    return student.tokenizer(["a photo of a red square", "green", "a blue thing on a table"][:n])


def encode(model, tower: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_image(x, normalize=True) if tower == "image" else model.encode_text(x, normalize=True)


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("teacher_dim", [TEACHER_DIM, 16])
def test_forward_is_normalised_in_teacher_space(tower, teacher_dim):
    student = build_student(TINY[tower], tower=tower, teacher_dim=teacher_dim)
    assert (student.proj is not None) == (teacher_dim != 16)
    x = inputs(student)
    out = student(x)
    assert out.shape == (3, teacher_dim) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-6)
    if student.proj is None:
        assert torch.allclose(out, encode(student.model, tower, x), atol=1e-6)
    assert (student.tokenizer is not None) == (tower == "text")
    if tower == "text":
        assert x.shape == (3, 16) and x.dtype == torch.int64  # the student's own context length


def test_normalize_pixels_uses_the_students_statistics():
    student = build_student("kdc-tiny-image", tower="image", teacher_dim=TEACHER_DIM)
    u8 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    mean, std = torch.tensor(student.preprocess["mean"]), torch.tensor(student.preprocess["std"])
    expected = (torch.tensor([0, 128, 255]) / 255 - mean) / std
    assert torch.allclose(student.normalize_pixels(u8)[1, :, 2, 3], expected)
    with pytest.raises(ValueError, match="uint8"):
        student.normalize_pixels(u8.float())


@pytest.mark.parametrize("tower", ["image", "text"])
def test_only_the_tower_and_projection_train(tower):
    student = build_student(TINY[tower], tower=tower, teacher_dim=TEACHER_DIM)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in student.named_parameters() if any(p is q for q in
                                                                        student.trainable_parameters())}
    assert "proj.weight" in trainable and "model.logit_scale" not in trainable
    own = "model.visual." if tower == "image" else "model.token_embedding"
    assert any(n.startswith(own) for n in trainable)
    if tower == "image":
        assert all(n.startswith("model.visual.") or n == "proj.weight" for n in trainable)
    else:
        assert not any(n.startswith("model.visual.") for n in trainable)
    student(inputs(student)).sum().backward()
    assert all(p.grad is not None for p in student.trainable_parameters())


def test_seeded_init_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = build_student("kdc-tiny-image", tower="image", teacher_dim=TEACHER_DIM, seed=7)
    assert torch.equal(torch.rand(3), expected_draw)
    b = build_student("kdc-tiny-image", tower="image", teacher_dim=TEACHER_DIM, seed=7)
    c = build_student("kdc-tiny-image", tower="image", teacher_dim=TEACHER_DIM, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["proj.weight"], sc["proj.weight"])
    assert not torch.equal(sa["model.visual.proj"], sc["model.visual.proj"])


# Tower types with each kind of final projection: ViT / text matrices, a text Linear with bias, ResNet attention-pool
# Linear, and CustomTextCLIP's separate text module.
_VIT = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
FOLD_CASES = {
    "tiny-image": ("kdc-tiny-image", "image"),
    "tiny-text": ("kdc-tiny-text", "text"),
    "text-proj-bias": ({"embed_dim": 16, "vision_cfg": _VIT, "text_cfg": {**_TEXT, "proj_bias": True}}, "text"),
    "custom-text": ({"embed_dim": 16, "custom_text": True, "vision_cfg": _VIT, "text_cfg": _TEXT}, "text"),
    "resnet": ({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                "text_cfg": _TEXT}, "image"),
}


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_folded_export_loads_in_stock_open_clip(case, tmp_path):
    spec, tower = FOLD_CASES[case]
    if isinstance(spec, dict):
        path = tmp_path / "student.json"
        path.write_text(json.dumps(spec))  # a flat model config
        spec = str(path)
    student = build_student(spec, tower=tower, teacher_dim=TEACHER_DIM, seed=3).eval()
    # Give the projection and tower some non-trivial values, as training would.
    with torch.no_grad():
        student.proj.weight.normal_()
    x = inputs(student)
    with torch.no_grad():
        want = student(x)

    state, config = student.folded_state_dict(), student.folded_config(TEACHER_DIM)
    assert config["model_cfg"]["embed_dim"] == TEACHER_DIM
    via_helper = open_clip_from_config(config)
    via_helper.load_state_dict(state, strict=True)
    assert torch.allclose(encode(via_helper.eval(), tower, x), want, atol=1e-5)

    export = tmp_path / "export"
    export.mkdir()
    (export / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(export / "open_clip_model.safetensors"))
    stock, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    stock.eval()  # open_clip returns models in train mode (BatchNorm in ResNet towers would use batch statistics)
    assert torch.allclose(encode(stock, tower, x), want, atol=1e-5)
    assert list(stock.visual.preprocess_cfg["mean"]) == student.preprocess["mean"]

    own = student.folded_state_dict(tower_only=True)
    assert own and set(own) < set(state)
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_folding_refuses_what_it_cannot_do_exactly(tmp_path):
    path = tmp_path / "attnpool.json"
    path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {**_VIT, "attentional_pool": True,
                                                                "attn_pooler_queries": 4, "attn_pooler_heads": 2},
                                "text_cfg": _TEXT}))
    student = build_student(str(path), tower="image", teacher_dim=TEACHER_DIM)
    with pytest.raises(NotImplementedError, match="attentional pooling"):
        student.folded_state_dict()
    no_proj = build_student("kdc-tiny-image", tower="image", teacher_dim=16)
    assert no_proj.folded_state_dict().keys() == no_proj.model.state_dict().keys()
    with pytest.raises(ValueError, match="no projection"):
        no_proj.folded_config(TEACHER_DIM)


def test_pretrained_checkpoint_and_local_dir_specs(tmp_path):
    source = build_student("kdc-tiny-image", tower="image", teacher_dim=16, seed=5)
    ckpt = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(ckpt))
    loaded = build_student(STUDENTS["kdc-tiny-image"], tower="image", teacher_dim=16, pretrained=str(ckpt), seed=0)
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in source.model.state_dict().items())

    local = tmp_path / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps(source.config))
    (local / "open_clip_model.safetensors").symlink_to(ckpt)
    from_dir = build_student(f"local-dir:{local}", tower="text", teacher_dim=TEACHER_DIM)
    assert torch.equal(from_dir.model.visual.proj, source.model.visual.proj)
    assert from_dir.config["model_cfg"] == source.config["model_cfg"]
    assert from_dir.tokenizer(["x"]).shape == (1, 16)

    with pytest.raises(StudentError, match="checkpoint file"):
        build_student("kdc-tiny-image", tower="image", teacher_dim=16, pretrained="no-such-tag")
    bad = tmp_path / "bad.safetensors"
    save_file({"nope": torch.zeros(1)}, str(bad))
    with pytest.raises(StudentError, match="could not build"):
        build_student("kdc-tiny-image", tower="image", teacher_dim=16, pretrained=str(bad))


def test_unknown_student_lists_the_valid_ones(tmp_path):
    with pytest.raises(StudentError, match="kdc-seed-image-vit.*kdc-tiny-image.*open_clip model name.*JSON"):
        build_student("kdc-nope", tower="image", teacher_dim=32)
    with pytest.raises(StudentError, match="tower"):
        build_student("kdc-tiny-image", tower="audio", teacher_dim=32)
    with pytest.raises(StudentError, match="no such file"):
        build_student(str(tmp_path / "missing.json"), tower="image", teacher_dim=32)
    # Refused before any download: open_clip itself would only warn and build the wrong activation.
    with pytest.raises(StudentError, match="quick_gelu.*ViT-B-32-quickgelu"):
        build_student("ViT-B-32", tower="image", teacher_dim=512, pretrained="openai")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(load_config_file(STUDENTS["kdc-tiny-text"])))
    register_student("kdc-test-mine", path)
    try:
        assert build_student("kdc-test-mine", tower="text", teacher_dim=16).proj is None
    finally:
        del STUDENTS["kdc-test-mine"]


def test_config_helpers(tmp_path):
    flat = load_config_file(STUDENTS["kdc-tiny-text"])["model_cfg"]
    path = tmp_path / "flat.json"
    path.write_text(json.dumps(flat))
    assert load_config_file(path) == {"model_cfg": flat, "preprocess_cfg": {}}
    model = open_clip_from_config({"model_cfg": flat, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    assert list(model.visual.preprocess_cfg["mean"]) == [0.5] * 3
    assert tuple(model.visual.preprocess_cfg["size"]) == (32, 32)  # from the model, as open_clip does
    (tmp_path / "junk.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="neither an open_clip model config"):
        load_config_file(tmp_path / "junk.json")


def test_seed_students_build():
    image = build_student("kdc-seed-image-vit", tower="image", teacher_dim=512)
    n_image = sum(p.numel() for p in image.model.visual.parameters())
    # 6 blocks of 12 * 576^2 (+ biases, norms), the 32x32x3 patch embedding, 50 positions, the 576x512 projection.
    print(f"kdc-seed-image-vit image tower: {n_image:,} parameters")
    assert 25_000_000 < n_image < 27_000_000
    assert image.proj is None and image.preprocess["size"] == [224, 224]
    assert image(inputs(image, n=1)).shape == (1, 512)

    text = build_student("kdc-seed-text", tower="text", teacher_dim=768)
    n_text = sum(p.numel() for n, p in text.model.named_parameters() if not n.startswith("visual."))
    print(f"kdc-seed-text text tower: {n_text:,} parameters")
    assert 7_000_000 < n_text < 8_000_000  # 49408 x 128 token embedding + 6 blocks of 12 * 128^2 + projection
    tokens = text.tokenizer(["a photo of a cat"])
    assert tokens.shape == (1, 77) and text(tokens).shape == (1, 768)


def test_train_modules_never_import_the_teacher():
    code = ("import sys, kdcache.train.students, kdcache.train.losses, kdcache.modelcfg; "
            "assert 'kdcache.teacher' not in sys.modules, 'teacher imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
