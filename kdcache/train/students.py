"""Students: a full open_clip CLIP of which one tower is trained, plus a learned projection into the teacher's space.

    student = build_student("kdc-tiny-image", tower="image", teacher_dim=512, seed=0)
    emb = student(student.normalize_pixels(uint8_batch))     # [B, 512], L2-normalised, comparable to the cache
    sd, cfg = student.folded_state_dict(), student.folded_config(512)   # stock open_clip CLIP with embed_dim 512

`spec` is a registered kdcache student (the JSON files in kdcache/configs/students, by file stem), an open_clip
built-in name (`ViT-B-32`, optionally with `pretrained` tag or checkpoint), `local-dir:PATH` / `hf-hub:org/repo`,
or a JSON config path (flat model config or nested `{model_cfg, preprocess_cfg}`; `pretrained` may then be a
checkpoint file). Both towers exist because export writes a full CLIP; the tower not trained is frozen and never run.

Never imports the teacher (kdcache.teacher): the trainer builds students only.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip import factory as oc_factory
from open_clip.hf_model import HFTextEncoder
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import nn

from kdcache.constants import TOWERS
from kdcache.modelcfg import (
    ConfigError,
    jsonable,
    load_config_file,
    open_clip_from_config,
    preprocess_of,
    tokenizer_from_config,
)

logger = logging.getLogger(__name__)



class StudentError(ValueError):
    """The student spec or its options cannot be turned into a student."""


def _discover() -> dict[str, str]:
    folder = resources.files("kdcache") / "configs" / "students"
    return {Path(f.name).stem: str(f) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".json")}


# Registered students: name -> nested open_clip JSON config. Adding a student is adding a JSON file (or calling
# register_student from a plugin or a test).
STUDENTS: dict[str, str] = _discover()


def register_student(name: str, path: str | os.PathLike) -> None:
    """Register a JSON config under `name` (later `build_student(name, ...)`)."""
    load_config_file(path)  # fail now, not at training time
    STUDENTS[name] = str(path)


def _unknown(spec: str) -> StudentError:
    return StudentError(f"unknown student {spec!r}: valid kdcache students are {', '.join(sorted(STUDENTS))}, "
                        "or any open_clip model name (open_clip.list_models()), local-dir:/hf-hub: spec, "
                        "or a config JSON path")


@dataclass(frozen=True)
class _OutProj:
    """Where a tower's final linear map to embed_dim lives in the CLIP state dict."""

    key: str    # "visual.proj" (matrix) or "visual.head.proj" (linear, keys key.weight / key.bias)
    kind: str   # "matrix": y = x @ P with P [in, out]; "linear": y = x @ W.T + b with W [out, in]


def _output_projection(model: nn.Module, tower: str) -> _OutProj:
    """The tower's final projection, when changing embed_dim changes nothing else in the tower (so a projection after
    it can be folded into it exactly); NotImplementedError naming the tower type otherwise."""
    if isinstance(model, open_clip.CoCa):
        raise NotImplementedError("folding a projection into a CoCa model (its multimodal decoder is sized by "
                                  "embed_dim) is not supported")
    if tower == "image":
        v = model.visual
        if isinstance(v, VisionTransformer):
            if v.attn_pool is not None:
                raise NotImplementedError("VisionTransformer with attentional pooling: its pooler and ln_post are "
                                          "sized by embed_dim, so a projection cannot be folded exactly")
            if isinstance(v.proj, nn.Parameter):
                return _OutProj("visual.proj", "matrix")
            if isinstance(v.proj, nn.Linear):
                return _OutProj("visual.proj", "linear")
            raise NotImplementedError("VisionTransformer without a final projection (proj is None)")
        if isinstance(v, ModifiedResNet):
            return _OutProj("visual.attnpool.c_proj", "linear")  # the attention pool's output projection
        if isinstance(v, TimmModel):
            if "proj" in v.head._modules and isinstance(v.head.proj, nn.Linear):
                return _OutProj("visual.head.proj", "linear")
            # timm_proj 'mlp' has a hidden layer of 2*embed_dim, 'none' / '' use the trunk's own head or features.
            raise NotImplementedError("timm image tower without timm_proj='linear' (its head depends on embed_dim "
                                      "beyond a final linear map)")
        raise NotImplementedError(f"image tower type {type(v).__name__}")
    if isinstance(model, open_clip.CLIP):
        key, proj = "text_projection", model.text_projection
    else:
        t = model.text
        if isinstance(t, TextTransformer):
            key, proj = "text.text_projection", t.text_projection
        elif isinstance(t, HFTextEncoder):
            if not isinstance(t.proj, nn.Linear):
                # Identity (d_model == embed_dim) or the 'mlp' projection, whose hidden width depends on embed_dim.
                raise NotImplementedError(f"HF text tower with projection {type(t.proj).__name__} (only "
                                          "hf_proj_type='linear' can be folded)")
            return _OutProj("text.proj", "linear")
        else:
            raise NotImplementedError(f"text tower type {type(t).__name__}")
    if isinstance(proj, nn.Parameter):
        return _OutProj(key, "matrix")
    if isinstance(proj, nn.Linear):
        return _OutProj(key, "linear")
    raise NotImplementedError("text tower without a final projection (proj_type 'none')")


def _fold(sd: dict[str, torch.Tensor], where: _OutProj, w: torch.Tensor) -> None:
    """Compose the projection at `where` with y -> y @ w.T ([d_t, d_s]), in float64, in place."""
    w64 = w.detach().double()
    if where.kind == "matrix":
        p = sd[where.key]
        sd[where.key] = (p.double() @ w64.T).to(p.dtype).contiguous()
        return
    weight = sd[f"{where.key}.weight"]
    sd[f"{where.key}.weight"] = (w64 @ weight.double()).to(weight.dtype).contiguous()
    bias = sd.get(f"{where.key}.bias")
    if bias is not None:
        sd[f"{where.key}.bias"] = (w64 @ bias.double()).to(bias.dtype).contiguous()


def _in_tower(model: nn.Module, name: str, tower: str) -> bool:
    """Whether parameter/state key `name` of the CLIP belongs to `tower` (logit_scale/bias belong to neither)."""
    if name.startswith("visual."):
        return tower == "image"
    if tower == "image":
        return False
    if isinstance(getattr(model, "text", None), nn.Module):
        return name.startswith("text.")  # CustomTextCLIP / CoCa: the text tower is one submodule
    return name.split(".")[0] not in ("logit_scale", "logit_bias")  # CLIP keeps its text modules at the top level


HINT_ADAPTERS = ("linear", "none")


class Student(nn.Module):
    """A full open_clip CLIP whose `tower` is trained; `proj` maps its embedding to the teacher's dim when they differ.

    forward: image tower takes normalised float [B, 3, H, W], text tower int64 tokens [B, ctx]; returns L2-normalised
    float32 [B, teacher_dim]."""

    def __init__(self, *, model: nn.Module, tower: str, teacher_dim: int, config: dict,
                 tokenizer: Callable | None = None, spec: str | None = None, seed: int | None = None) -> None:
        super().__init__()
        if tower not in TOWERS:
            raise StudentError(f"tower {tower!r}: expected one of {', '.join(TOWERS)}")
        self.tower = tower
        self.spec = spec  # what build_student was given, for run records
        self.seed = seed
        self.model = model
        self.config = config
        self.preprocess = preprocess_of(model)
        self.tokenizer = tokenizer if tower == "text" else None
        self.student_dim = int(config["model_cfg"]["embed_dim"])
        self.teacher_dim = int(teacher_dim)
        # Bias-free, so that it folds into the tower's own projection (a matrix without bias in the standard CLIP).
        self.proj = (nn.Linear(self.student_dim, self.teacher_dim, bias=False)
                     if self.student_dim != self.teacher_dim else None)
        # Training-only adapters of the `hint` loss (one per --hint-map pair, see add_hint_adapters); never exported.
        self.hint_adapters = nn.ModuleDict()
        for name, p in self.model.named_parameters():
            p.requires_grad_(_in_tower(self.model, name, tower))
        # Non-persistent: they follow .to(device) but are not part of checkpoints (they come from the config).
        self.register_buffer("pixel_mean", torch.tensor(self.preprocess["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.preprocess["std"]).view(1, -1, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"tower={self.tower!r}, student_dim={self.student_dim}, teacher_dim={self.teacher_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.encode_image(x) if self.tower == "image" else self.model.encode_text(x)
        if self.proj is not None:
            feats = self.proj(feats)
        # float32 whatever autocast did: losses compare against the float32 cached teacher embeddings.
        return F.normalize(feats.float(), dim=-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The trained tower's parameters, the projection and any hint adapters (everything else has requires_grad
        False)."""
        params = [p for n, p in self.model.named_parameters() if _in_tower(self.model, n, self.tower)]
        return params + (list(self.proj.parameters()) if self.proj is not None else []) + \
            list(self.hint_adapters.parameters())

    def add_hint_adapters(self, widths: list[tuple[int, int]], *, adapter: str) -> None:
        """One adapter per --hint-map pair (student width, teacher width), in pair order: a learned linear map
        (`linear`, the seeds' "hidden + adapter"), or none (`none`: the identity, widths must match)."""
        if adapter not in HINT_ADAPTERS:
            raise StudentError(f"--hint-adapter {adapter!r}: expected one of {', '.join(HINT_ADAPTERS)}")
        for i, (s, t) in enumerate(widths):
            if adapter == "none" and s != t:
                raise StudentError(f"--hint-adapter none needs equal widths, but hint pair {i} maps a student "
                                   f"feature of width {s} to a teacher hint of width {t}; use --hint-adapter linear")
            self.hint_adapters[str(i)] = nn.Linear(s, t) if adapter == "linear" else nn.Identity()

    def normalize_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float (x / 255 - mean) / std with the student's statistics, on the images' device."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        mean = self.pixel_mean.to(images.device)
        std = self.pixel_std.to(images.device)
        return images.float().div_(255).sub_(mean).div_(std)

    def folded_state_dict(self, *, tower_only: bool = False) -> dict[str, torch.Tensor]:
        """The CLIP state dict with `proj` folded into the towers' own projections, for a stock open_clip CLIP built
        from `folded_config(teacher_dim)`: same embeddings as this student, up to float rounding.

        The projection is folded into both towers (embed_dim changes for both); the untrained tower is meaningless
        anyway and is normally replaced at export. `tower_only` returns only the trained tower's keys."""
        sd = {k: v.detach() for k, v in self.model.state_dict().items()}
        if self.proj is not None:
            towers = (self.tower,) if tower_only else TOWERS
            for tower in towers:
                _fold(sd, _output_projection(self.model, tower), self.proj.weight)
        if tower_only:
            sd = {k: v for k, v in sd.items() if _in_tower(self.model, k, self.tower)}
        return sd

    def folded_config(self, teacher_dim: int) -> dict:
        """The student's nested config with embed_dim = teacher_dim (the architecture of `folded_state_dict`)."""
        if self.proj is None and teacher_dim != self.student_dim:
            raise ValueError(f"student embed_dim is {self.student_dim} and it has no projection; cannot fold to "
                             f"{teacher_dim}")
        if teacher_dim != self.teacher_dim:
            raise ValueError(f"this student projects to {self.teacher_dim}, not {teacher_dim}")
        cfg = copy.deepcopy(self.config)
        cfg["model_cfg"]["embed_dim"] = int(teacher_dim)
        return cfg


def _is_open_clip_spec(spec: str) -> bool:
    schema, ident = oc_factory.parse_model_name(spec)
    return schema is not None or oc_factory.get_model_config(ident.replace("/", "-")) is not None


def _check_quick_gelu(name: str, pretrained: str | None) -> None:
    # open_clip only warns when a tag was trained with another activation than the config builds, and the student
    # would then start from weights run with the wrong activation.
    if not pretrained:
        return
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    model_cfg = oc_factory.get_model_config(name) or {}
    if tag_cfg and bool(tag_cfg.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
        raise StudentError(f"pretrained tag {pretrained!r} of {name} was trained with quick_gelu="
                           f"{bool(tag_cfg.get('quick_gelu', False))} but the model config differs; use "
                           f"{name}-quickgelu or a config with the right quick_gelu")


class _RandomInitFilter(logging.Filter):
    """Drops open_clip's "no weights, initialized randomly" warnings (root logger): a student is random by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("no CLIP weights found" in msg or "initialized randomly" in msg)


@contextlib.contextmanager
def _quiet_random_init(active: bool):
    f = _RandomInitFilter()
    if active:
        logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


def build_student(spec: str, *, tower: str, teacher_dim: int, pretrained: str | None = None,
                  seed: int = 0) -> Student:
    """Build a student (see the module docstring for `spec`). Random init is seeded in a forked RNG, so two runs with
    the same seed start identical and the caller's RNG is untouched. `pretrained`: an open_clip tag or checkpoint
    path for built-in names, a checkpoint path for JSON configs; weights that do not load are an error."""
    if tower not in TOWERS:
        raise StudentError(f"tower {tower!r}: expected one of {', '.join(TOWERS)}")
    if spec in STUDENTS:
        config_path: str | None = STUDENTS[spec]
    elif spec.lower().endswith(".json") or os.path.isfile(spec):
        config_path = spec
    elif _is_open_clip_spec(spec):
        config_path = None
    else:
        raise _unknown(spec)
    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_init(pretrained is None):
            torch.manual_seed(seed)
            if config_path is not None:
                cfg = load_config_file(config_path)
                if not cfg["preprocess_cfg"]:
                    logger.warning("student config %s has no preprocess_cfg: open_clip's defaults (OpenAI CLIP "
                                   "statistics, bicubic, shortest) are used", config_path)
                if pretrained is not None and not os.path.isfile(pretrained):
                    raise StudentError(f"--student-pretrained {pretrained!r}: with a JSON student config it must be "
                                       "a checkpoint file")
                model = open_clip_from_config(cfg, checkpoint=pretrained, require_pretrained=pretrained is not None)
                tokenizer = tokenizer_from_config(cfg) if tower == "text" else None
                model_cfg = cfg["model_cfg"]
            else:
                schema = oc_factory.parse_model_name(spec)[0]
                name = spec if schema else spec.replace("/", "-")  # open_clip accepts 'ViT-B/32' for 'ViT-B-32'
                if schema is not None and pretrained is not None:
                    raise StudentError(f"--student-pretrained is not used with {spec} (the weights come from there)")
                _check_quick_gelu(name, pretrained)
                model = open_clip.create_model(name, pretrained, require_pretrained=pretrained is not None,
                                               pretrained_text=False, pretrained_image=False)
                tokenizer = open_clip.get_tokenizer(name) if tower == "text" else None
                model_cfg = oc_factory.get_model_config(name)
            # The resolved preprocessing (open_clip defaults filled in) is written out, so an export states it all.
            config = {"model_cfg": jsonable(model_cfg), "preprocess_cfg": preprocess_of(model)}
            return Student(model=model, tower=tower, teacher_dim=teacher_dim, config=config, tokenizer=tokenizer,
                           spec=spec, seed=seed)
    except ConfigError as e:
        raise StudentError(str(e)) from e
    except (RuntimeError, FileNotFoundError) as e:
        raise StudentError(f"open_clip could not build student {spec!r}: {e}") from e
