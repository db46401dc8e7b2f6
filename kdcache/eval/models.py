"""What `kdcache eval --model` accepts, turned into one evaluable interface.

    m = resolve_model("exported/")                       # or "local-dir:exported", "runs/img", "ViT-B-32" + pretrained
    emb = m.encode_images(uint8_batch)                   # [B, D] float32, L2-normalised, CPU, its own preprocessing
    head = m.zero_shot_head(classes, templates)          # [C, D]

A `--model` is one of
- a training run directory (`done.json` + `config.json`): its student tower (`load_run_student`). Only image-tower
  runs can be evaluated, zero-shot only: the class head is the one cached by the run's cache (which must hold the
  `--classes`, same names, same order); a run has no text tower to embed captions or prompts with, so retrieval (and
  any text-tower run) needs `kdcache export` first;
- an exported directory (`kdcache export`, open_clip's local-dir format), as `DIR` or `local-dir:DIR`;
- any `--teacher` form (`kdcache.teacher.load_teacher`): a built-in open_clip name with `pretrained`,
  `hf-hub:org/repo`, `local-dir:PATH`, or a JSON model config. Eval is one of the few places allowed to build a
  teacher: comparing against it is the point.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from kdcache.precision import autocast
from kdcache.train import rundir
from kdcache.train.config import TrainError
from kdcache.train.rundir import is_run_dir, load_run_student
from kdcache.views import eval_transform_uint8

KINDS = ("open_clip", "export", "run")
MB = 1e6  # reports give sizes in MB = 10^6 bytes
_EXPORT_CARD = "# kdcache export"  # first line of the README.md that `kdcache export` writes


class ModelError(ValueError):
    """A --model that cannot be evaluated as asked; the message names the model and what to do."""


@dataclass(eq=False)
class EvalModel:
    """One model under evaluation: how to embed images and texts, and what it costs."""

    label: str
    spec: str                      # as given on the command line
    kind: str                      # one of KINDS
    preprocess: dict               # its own eval preprocessing (size, mean, std, interpolation, resize_mode)
    embed_dim: int
    logit_scale: float
    image_params: int              # parameters of the image tower (what zero-shot runs per image)
    total_params: int              # parameters of everything the checkpoint holds
    size_mb: float                 # checkpoint file(s) on disk, or the state dict when there is no file
    size_source: str
    weights_files: list[str]
    digest: str | None             # weights digest (teachers and exports), for matching a cache's teacher
    distilled_from: dict | None    # the teacher identity a run was distilled from (runs only)
    device: torch.device
    precision: str
    image_forward: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)  # normalised float -> embedding
    normalize: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)      # uint8 -> normalised float on device
    text_encoder: Callable[[Sequence[str]], torch.Tensor] | None = field(default=None, repr=False)
    head_fn: Callable[[Sequence[str], Sequence[str]], torch.Tensor] | None = field(default=None, repr=False)
    provenance: dict = field(default_factory=dict)
    reload: dict = field(default_factory=dict)    # what resolve_model needs to load it again (compare --remeasure)
    is_teacher: bool = False
    _transform: Callable | None = field(default=None, init=False, repr=False)

    @property
    def can_embed_text(self) -> bool:
        return self.text_encoder is not None

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.preprocess["size"]
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def transform(self, image: Image.Image) -> torch.Tensor:
        """open_clip's eval transform of this model, stopping at uint8 [3, H, W]."""
        if self._transform is None:
            self._transform = eval_transform_uint8(self.preprocess)
        return self._transform(image)

    def encode_images(self, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised float32 embeddings on the CPU from uint8 [B, 3, H, W] already at this model's input size, or
        from PIL images (then this model's own eval transform is applied)."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.transform(im) for im in images])
        with torch.inference_mode(), self.autocast():
            return torch.nn.functional.normalize(self.image_forward(self.normalize(images)).float(), dim=-1).cpu()

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings on the CPU."""
        if self.text_encoder is None:
            raise ModelError(f"--model {self.label}: {self.kind} has no text tower to embed text with"
                             + (" (a training run holds one tower; `kdcache export` it with the teacher's other "
                                "tower and evaluate the export)" if self.kind == "run" else ""))
        return self.text_encoder(list(texts))

    def zero_shot_head(self, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """The [C, D] zero-shot classifier for these classes (template-averaged class text embeddings)."""
        if self.head_fn is None:
            raise ModelError(f"--model {self.label}: no way to build a zero-shot head")
        return self.head_fn(list(classes), list(templates))

    def describe(self) -> dict:
        """The JSON-able facts a report records about this model."""
        return {"label": self.label, "spec": self.spec, "kind": self.kind, "is_teacher": self.is_teacher,
                "embed_dim": self.embed_dim, "logit_scale": self.logit_scale, "preprocess": self.preprocess,
                "image_params": self.image_params, "total_params": self.total_params, "size_mb": self.size_mb,
                "size_source": self.size_source, "weights_files": self.weights_files, "digest": self.digest,
                "distilled_from": self.distilled_from, "can_embed_text": self.can_embed_text,
                "provenance": self.provenance, "reload": self.reload}


def _files_mb(paths: Sequence[str]) -> float:
    return sum(os.path.getsize(p) for p in paths) / MB


def _state_mb(module: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / MB


def _params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _local_dir_path(spec: str) -> Path | None:
    """The directory a spec names, with or without `local-dir:`, if it is one."""
    path = spec.removeprefix("local-dir:")
    return Path(path) if os.path.isdir(path) else None


def _is_export(d: Path) -> bool:
    readme = d / "README.md"
    try:
        return readme.is_file() and readme.read_text(encoding="utf-8").startswith(_EXPORT_CARD)
    except (OSError, UnicodeDecodeError):
        return False


def _from_open_clip(spec: str, *, label: str, kind: str, pretrained: str | None, allow_random_init: bool,
                    device: str, precision: str) -> EvalModel:
    from kdcache.teacher import TeacherError, load_teacher  # eval may build teachers; import only when asked

    load_spec = spec
    if kind == "export" and not spec.startswith("local-dir:"):
        load_spec = f"local-dir:{spec}"
    try:
        t = load_teacher(load_spec, pretrained=pretrained, allow_random_init=allow_random_init, device=device,
                         precision=precision)
    except TeacherError as e:
        raise ModelError(f"--model {spec}: {e}") from None
    ckpt = t.identity.get("checkpoint")
    if ckpt and os.path.isfile(ckpt):
        files, size, source = [ckpt], _files_mb([ckpt]), "checkpoint file on disk"
    else:
        files, size = [], _state_mb(t.model)
        source = "state dict in memory (no checkpoint file: random init)"
    # model_cfg stays: a random-init teacher has no digest, and is matched to a cache's teacher by config + seed.
    provenance = {"identity": dict(t.identity)}
    if kind == "export":
        provenance["model_card"] = str(Path(load_spec.removeprefix("local-dir:")) / "README.md")
    return EvalModel(
        label=label, spec=spec, kind=kind, preprocess=t.preprocess, embed_dim=t.embed_dim, logit_scale=t.logit_scale,
        image_params=_params(t.model.visual), total_params=_params(t.model), size_mb=size, size_source=source,
        weights_files=[os.path.abspath(f) for f in files], digest=t.identity.get("digest"), distilled_from=None,
        device=t.device, precision=t.precision, image_forward=t.model.encode_image, normalize=t.normalize_images,
        text_encoder=t.encode_texts, head_fn=t.zero_shot_head, provenance=provenance,
        reload={"spec": os.path.abspath(spec) if os.path.exists(spec) else spec, "pretrained": pretrained,
                "allow_random_init": allow_random_init})


def _run_head(run_dir: Path, conf: dict, cache_path: str | None) -> tuple[Callable, dict]:
    """The zero-shot head function of an image-tower run: the cache's head, for the cache's classes only."""
    from kdcache.cache.reader import CacheError, open_cache

    candidates = [p for p in (cache_path, conf["cache"]) if p]
    errors = []
    cache = None
    for path in candidates:
        try:
            c = open_cache(path)
        except CacheError as e:
            errors.append(str(e))
            continue
        if c.fingerprint() != conf["cache_fingerprint"]:
            errors.append(f"{path}: fingerprint {c.fingerprint()} is not the run's cache {conf['cache_fingerprint']}")
            continue
        cache = c
        break
    if cache is None:
        raise ModelError(f"--model {run_dir}: the run's cache, which holds its class head, cannot be used ("
                         + "; ".join(errors) + "); pass --cache with the cache it was trained on")
    if "logits" not in cache.capabilities:
        raise ModelError(f"--model {run_dir}: its cache {cache.path} has no class vocabulary (built without "
                         "--classes), so the run has no zero-shot head; export it with the teacher's text tower")
    cache_classes, cache_templates, head = cache.vocab()
    head_t = torch.from_numpy(head).float()

    def head_fn(classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        if list(classes) != list(cache_classes):
            diff = next((i for i, (a, b) in enumerate(zip(classes, cache_classes, strict=False)) if a != b),
                        min(len(classes), len(cache_classes)))
            raise ModelError(
                f"--model {run_dir}: --classes do not match the class head of the run's cache {cache.path} "
                f"({len(classes)} classes given, {len(cache_classes)} cached; first difference at index {diff}: "
                f"{_at(classes, diff)!r} vs {_at(cache_classes, diff)!r}). A run's head is the cache's: evaluate it "
                "with the cache's classes in the cache's order, or export it with the teacher's text tower.")
        return head_t

    return head_fn, {"cache": cache.path, "cache_classes": len(cache_classes), "cache_templates": cache_templates}


def _at(seq: Sequence[str], i: int) -> str | None:
    return seq[i] if i < len(seq) else None


def _from_run(run_dir: str, *, label: str, device: str, precision: str, cache_path: str | None) -> EvalModel:
    try:
        student, conf = load_run_student(run_dir, device=device)
    except TrainError as e:
        raise ModelError(f"--model {run_dir}: {e}") from None
    if conf["tower"] != "image":
        raise ModelError(f"--model {run_dir}: a {conf['tower']}-tower run has no image tower to evaluate; export it "
                         f"with the teacher's image tower (kdcache export --{conf['tower']} {run_dir} "
                         "--image-from-teacher TEACHER --out DIR) and evaluate DIR")
    student = student.to(device)
    provenance: dict = {}
    resolved: list[Callable] = []

    def head_fn(classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        # The cache is opened only when a head is asked for: timing a run (compare --remeasure) needs no cache.
        if not resolved:
            fn, info = _run_head(Path(run_dir), conf, cache_path)
            resolved.append(fn)
            provenance.update(info)
        return resolved[0](classes, templates)

    ckpt = str(rundir.final_weights(run_dir))
    done = rundir.read_done(run_dir)
    c = conf["config"]
    image_params = _params(student.model.visual) + _params(student.proj)
    provenance.update(run=os.path.abspath(run_dir), student=c["student"], losses=c["losses"],
                      loss_formula=c.get("loss_formula"), steps=done.get("steps"), val=done.get("val", {}),
                      cache_fingerprint=conf["cache_fingerprint"])
    return EvalModel(
        label=label, spec=run_dir, kind="run", preprocess=student.preprocess, embed_dim=int(conf["embed_dim"]),
        logit_scale=float(conf["logit_scale"]), image_params=image_params, total_params=_params(student),
        size_mb=_files_mb([ckpt]),
        size_source="run checkpoint on disk (the whole student CLIP, including the untrained text tower)",
        weights_files=[os.path.abspath(ckpt)], digest=None, distilled_from=conf.get("teacher"),
        device=torch.device(device), precision=precision if torch.device(device).type == "cuda" else "fp32",
        image_forward=student, normalize=lambda x: student.normalize_pixels(x.to(device, non_blocking=True)),
        text_encoder=None, head_fn=head_fn,
        provenance=provenance,
        reload={"spec": os.path.abspath(run_dir), "pretrained": None, "allow_random_init": False})


def accepts_pretrained(spec: str) -> bool:
    """Whether `--pretrained` applies to this --model: built-in open_clip names and JSON configs only (a directory,
    run, local-dir: or hf-hub: model carries its own weights)."""
    return not (spec.startswith(("local-dir:", "hf-hub:")) or os.path.isdir(spec))


def resolve_model(spec: str, *, label: str | None = None, pretrained: str | None = None,
                  allow_random_init: bool = False, device: str = "cpu", precision: str = "fp32",
                  cache: str | None = None) -> EvalModel:
    """Load one `--model` (see the module docstring). `pretrained` and `allow_random_init` apply to teacher forms;
    `cache` is where a run's cache is if it moved (used when its fingerprint is the run's)."""
    label = label or spec.rstrip("/")
    d = _local_dir_path(spec)
    if d is not None and not spec.startswith("local-dir:") and is_run_dir(d):
        if pretrained is not None:
            raise ModelError(f"--pretrained does not apply to training run {spec}")
        return _from_run(spec, label=label, device=device, precision=precision, cache_path=cache)
    if d is not None and (d / "open_clip_config.json").is_file():
        kind = "export" if _is_export(d) else "open_clip"
        return _from_open_clip(spec, label=label, kind=kind, pretrained=pretrained,
                               allow_random_init=allow_random_init, device=device, precision=precision)
    if d is not None:
        raise ModelError(f"--model {spec}: directory is neither a training run (config.json + done.json) nor an "
                         "exported/open_clip local-dir (open_clip_config.json)")
    looks_like_path = os.sep in spec or spec.startswith(".") or spec.lower().endswith(".json")
    if looks_like_path and not spec.startswith(("local-dir:", "hf-hub:")) and not os.path.exists(spec):
        raise ModelError(f"--model {spec}: no such file or directory (expected a training run dir, an exported dir, "
                         "or a --teacher form: open_clip name, hf-hub:org/repo, local-dir:PATH, model-config JSON)")
    return _from_open_clip(spec, label=label, kind="open_clip", pretrained=pretrained,
                           allow_random_init=allow_random_init, device=device, precision=precision)
