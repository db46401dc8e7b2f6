"""The frozen teacher: an open_clip model loaded through open_clip's own factory, with the identity and preprocessing a
cache records.

    teacher = load_teacher("local-dir:teachers/kdc-cifar10-rn18")            # or "ViT-B-32", pretrained="openai"
    emb = teacher.encode_images(uint8_batch)                                  # [B, D] float32, L2-normalised, CPU

Accepted specs (what `kdcache build --teacher` takes): a built-in open_clip name with `pretrained` (a tag or a local
.pt/.pth/.bin/.safetensors file), `hf-hub:org/repo`, `local-dir:PATH`, or a JSON file holding a flat open_clip model
config or the nested `{model_cfg, preprocess_cfg}` form (`pretrained` may then be a local checkpoint file).

The checkpoint file is resolved first with open_clip's helpers and hashed, then the model is built by
`open_clip.create_model(..., require_pretrained=True)`, so a teacher cannot silently come back with random weights.
Who may import it (ARCHITECTURE.md; tests/test_architecture.py enforces it): the build (stage 1), kdcache/online,
eval and export. Never the offline trainer (kdcache/train) nor the shared modules it uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip import factory as oc_factory
from open_clip import pretrained as oc_pretrained
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from kdcache.modelcfg import ConfigError, jsonable, load_config_file, write_local_dir
from kdcache.precision import autocast, resolve_device
from kdcache.shards import file_sha256
from kdcache.views import size_hw

logger = logging.getLogger(__name__)

# Module initialisation draws from the torch RNG; a fixed seed in a forked RNG makes a random-init teacher the same in
# every run (two builds of the quickstart cache are identical) and leaves the caller's RNG untouched.
INIT_SEED = 0
# Preprocessing fields open_clip fills with its OpenAI defaults when the teacher does not give them.
_DEFAULTABLE = ("mean", "std", "interpolation", "resize_mode")
_RANDOM_HINT = ("Pass --allow-random-init (`kdcache train --online-teacher`: --online-allow-random-init; Python: "
                "allow_random_init=True) to use a randomly initialised teacher anyway (tests, benchmarks: its outputs "
                "are meaningless).")


class TeacherError(ValueError):
    """The teacher spec cannot be turned into a trustworthy frozen teacher."""


# open_clip.create_model's two warnings (root logger) when it loads no weights; group 1: the model, as it spells it.
_NO_WEIGHTS = (re.compile(r"Local config loaded, but no CLIP weights found in (.+)"),
               re.compile(r"No pretrained weights loaded for model '(.+)'\. Model initialized randomly\."))


def _oc_model_name(name: str) -> str:
    """A model name as open_clip's warnings spell it: local-dir paths as `Path` prints them, with the prefix."""
    schema, ident = oc_factory.parse_model_name(name)
    return f"{oc_factory.LOCAL_DIR_PREFIX}{Path(ident)}" if schema == "local-dir" else name


class _NoWeightsFilter(logging.Filter):
    """Drops open_clip's "no weights ... initialized randomly" warnings about the models `about` accepts; every other
    record passes."""

    def __init__(self, about: Callable[[str], bool]) -> None:
        super().__init__()
        self.about = about

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root" or record.levelno != logging.WARNING:
            return True
        msg = record.getMessage()
        for i, pattern in enumerate(_NO_WEIGHTS):
            m = pattern.fullmatch(msg)
            if m:
                name = f"{oc_factory.LOCAL_DIR_PREFIX}{m.group(1)}" if i == 0 else m.group(1)
                return not self.about(_oc_model_name(name))
        return True


@contextlib.contextmanager
def quiet_no_weights_warning(about: Callable[[str], bool]) -> Iterator[None]:
    """While the block runs, drop open_clip's "No pretrained weights loaded ... Model initialized randomly" (and "no
    CLIP weights found") warnings about the models `about` accepts (it gets open_clip's model name, local-dir paths
    normalised). For a model kdcache fills with weights itself right after building it, or whose random init kdcache
    announces in its own words: any other warning, and these warnings about any other model, still show."""
    f = _NoWeightsFilter(about)
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


@dataclass(eq=False)
class Teacher:
    """A frozen open_clip model plus everything a cache records about it."""

    model: torch.nn.Module
    tokenizer: Callable
    identity: dict
    preprocess: dict
    embed_dim: int
    logit_scale: float
    device: torch.device
    precision: str
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Kept on the device so that only uint8 crosses the host-device link.
        self._mean = torch.tensor(self.preprocess["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.preprocess["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> the model's float input on the device: x / 255, then (x - mean) / std with the
        teacher's statistics (the same float32 operations as open_clip's ToTensor + Normalize, so the result is
        bit-identical to its eval transform)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True).float().div_(255).sub_(self._mean).div_(self._std)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def encode_images(self, images: torch.Tensor, *, on_device: bool = False) -> torch.Tensor:
        """L2-normalised float32 image embeddings [B, D] from uint8 [B, 3, H, W] pixels, on the CPU (or left on the
        teacher's device with on_device=True, for further work there)."""
        with torch.inference_mode(), self.autocast():
            feats = F.normalize(self.model.encode_image(self.normalize_images(images)).float(), dim=-1)
            return feats if on_device else feats.cpu()

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings on the CPU, [B, D] (open_clip's tokenizer truncates to context)."""
        if len(texts) == 0:
            return torch.empty(0, self.embed_dim)
        return self.encode_tokens(self.tokenizer(list(texts)))

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """`encode_texts` from the tokenizer's output [B, context] (int64)."""
        with torch.inference_mode(), self.autocast():
            feats = self.model.encode_text(tokens.to(self.device))
            return F.normalize(feats.float(), dim=-1).cpu()

    def zero_shot_head(self, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """The zero-shot classifier [C, D] (classes x dim): open_clip's template-averaged, normalised class text
        embeddings, float32 on the CPU, rows re-normalised in float32 (they were averaged in autocast on CUDA)."""
        with torch.inference_mode(), self.autocast():
            w = open_clip.build_zero_shot_classifier(self.model, self.tokenizer, list(classes), list(templates),
                                                     device=self.device)
            return F.normalize(w.T.float(), dim=-1).cpu().contiguous()


@dataclass
class _Source:
    """A spec resolved to what open_clip will load, before the model is built."""

    name: str                       # what create_model / get_tokenizer get
    pretrained: str | None          # create_model's `pretrained` (built-in names only)
    checkpoint: str | None          # the file open_clip will load, None if none
    model_cfg: dict
    given_preprocess: dict          # preprocessing fields the teacher itself provides
    where: str                      # where given_preprocess comes from
    no_weights_reason: str = ""     # why checkpoint is None, for the refusal message
    recorded_checkpoint: str | None = None


def _resolve_local_dir(path: str) -> _Source:
    d = Path(path)
    cfg_path = d / "open_clip_config.json"
    if not d.is_dir():
        raise TeacherError(f"local-dir teacher {path!r}: no such directory")
    if not cfg_path.is_file():
        raise TeacherError(f"local-dir teacher {path!r} has no open_clip_config.json (open_clip's directory format: "
                           "open_clip_config.json with model_cfg and preprocess_cfg, plus open_clip_model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TeacherError(f"{cfg_path} is not valid JSON: {e}") from e
    if "model_cfg" not in cfg:
        raise TeacherError(f"{cfg_path} has no 'model_cfg'")
    ckpt = oc_factory._find_checkpoint_in_dir(d)
    return _Source(name=f"{oc_factory.LOCAL_DIR_PREFIX}{path}", pretrained=None, checkpoint=ckpt,
                   model_cfg=cfg["model_cfg"], given_preprocess=cfg.get("preprocess_cfg") or {},
                   where=f"preprocess_cfg of {cfg_path}",
                   no_weights_reason=f"no checkpoint (*.safetensors, *.bin, *.pth) in {d}",
                   recorded_checkpoint=None if ckpt is None else os.path.abspath(ckpt))


def _resolve_hf_hub(model_id: str) -> _Source:
    try:
        cfg = oc_factory._get_hf_config(model_id)
    except Exception as e:  # noqa: BLE001 - any Hub failure (offline, missing repo, missing file) is reported
        raise TeacherError(f"hf-hub:{model_id}: could not fetch open_clip_config.json: {e}") from e
    if "model_cfg" not in cfg:
        raise TeacherError(f"hf-hub:{model_id}: open_clip_config.json has no 'model_cfg'")
    ckpt, reason = None, ""
    try:
        # The same helper (and default file name) create_model uses for hf-hub, so both see the same cached file.
        ckpt = oc_factory.download_pretrained_from_hf(model_id)
    except Exception as e:  # noqa: BLE001
        reason = f"could not download weights from hf-hub:{model_id}: {e}"
    return _Source(name=f"{oc_factory.HF_HUB_PREFIX}{model_id}", pretrained=None, checkpoint=ckpt,
                   model_cfg=cfg["model_cfg"], given_preprocess=cfg.get("preprocess_cfg") or {},
                   where=f"preprocess_cfg of hf-hub:{model_id} open_clip_config.json", no_weights_reason=reason,
                   recorded_checkpoint=ckpt)


def _resolve_builtin(name: str, pretrained: str | None) -> _Source:
    cleaned = name.replace("/", "-")  # open_clip accepts 'ViT-B/32' for 'ViT-B-32'
    model_cfg = oc_factory.get_model_config(cleaned)
    if model_cfg is None:
        names = open_clip.list_models()
        close = get_close_matches(cleaned, names, n=5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise TeacherError(
            f"unknown teacher {name!r}: not a built-in open_clip model, an hf-hub:/local-dir: spec or a JSON file. "
            f"{hint}Built-ins include {', '.join(names[:6])}, ... ({len(names)} in open_clip.list_models()).")
    if pretrained is None:
        return _Source(name=cleaned, pretrained=None, checkpoint=None, model_cfg=model_cfg, given_preprocess={},
                       where=f"built-in {cleaned} without pretrained weights",
                       no_weights_reason=f"built-in model {cleaned} was given no --pretrained tag or checkpoint")
    tag_cfg = oc_pretrained.get_pretrained_cfg(cleaned, pretrained)
    if tag_cfg:
        if bool(tag_cfg.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
            # open_clip only warns here and builds a model whose activation differs from the weights' training.
            alt = f"{cleaned}-quickgelu"
            hint = f"use --teacher {alt}" if alt in open_clip.list_models() else "use a model config with quick_gelu"
            raise TeacherError(f"pretrained tag {pretrained!r} of {cleaned} was trained with quick_gelu="
                               f"{bool(tag_cfg.get('quick_gelu', False))} but the model config differs; {hint}")
        try:
            ckpt = oc_pretrained.download_pretrained(tag_cfg) or None
        except Exception as e:  # noqa: BLE001
            raise TeacherError(f"could not download weights for {cleaned} tag {pretrained!r}: {e}") from e
        return _Source(name=cleaned, pretrained=pretrained, checkpoint=ckpt, model_cfg=model_cfg,
                       given_preprocess=tag_cfg, where=f"open_clip pretrained cfg of {cleaned} tag {pretrained!r}",
                       no_weights_reason=f"tag {pretrained!r} of {cleaned} names no downloadable file",
                       recorded_checkpoint=ckpt)
    if os.path.isfile(pretrained):
        path = os.path.abspath(pretrained)
        return _Source(name=cleaned, pretrained=pretrained, checkpoint=path, model_cfg=model_cfg, given_preprocess={},
                       where=f"built-in {cleaned} with checkpoint file {path}", recorded_checkpoint=path)
    tags = oc_pretrained.list_pretrained_tags_by_model(cleaned)
    raise TeacherError(f"--pretrained {pretrained!r} is neither a pretrained tag of {cleaned} nor an existing file. "
                       f"Tags of {cleaned}: {', '.join(tags) if tags else '(none)'}")


def _resolve_json(path: str, pretrained: str | None, tmp: str) -> _Source:
    """Turn a JSON config (+ optional checkpoint) into a temporary local-dir, so there is one loading path."""
    try:
        cfg = load_config_file(path)
    except ConfigError as e:
        raise TeacherError(f"teacher {e}") from e
    if cfg["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name"):
        # open_clip would look for the tokenizer files in the (temporary) directory.
        raise TeacherError(f"teacher config {path} uses a Hugging Face tokenizer; save the teacher as a local-dir "
                           "with its tokenizer files, or use hf-hub:")
    if pretrained is not None and not Path(pretrained).is_file():
        raise TeacherError(f"--pretrained {pretrained!r}: with a JSON teacher config it must be a checkpoint file")
    try:
        write_local_dir(cfg, tmp, checkpoint=pretrained)
    except ConfigError as e:
        raise TeacherError(f"--pretrained {e}") from e
    src = _resolve_local_dir(tmp)
    src.recorded_checkpoint = None if pretrained is None else os.path.abspath(pretrained)
    nested = bool(cfg["preprocess_cfg"])
    src.where = f"preprocess_cfg of {path}" if nested else f"config {path} (it has no preprocess_cfg)"
    src.no_weights_reason = f"a JSON config holds no weights and no --pretrained checkpoint was given for {path}"
    return src


@contextlib.contextmanager
def _resolve(spec: str, pretrained: str | None) -> Iterator[_Source]:
    try:
        schema, ident = oc_factory.parse_model_name(spec)
    except ValueError as e:
        raise TeacherError(str(e)) from e
    if schema is not None and pretrained is not None:
        # open_clip would ignore it with a log line; a user who typed it expects it to matter.
        raise TeacherError(f"--pretrained is not used with a {schema}: teacher (the weights come from {spec})")
    if schema == "local-dir":
        yield _resolve_local_dir(ident)
    elif schema == "hf-hub":
        yield _resolve_hf_hub(ident)
    elif spec.lower().endswith(".json") or os.path.isfile(spec):
        with tempfile.TemporaryDirectory(prefix="kdcache-teacher-") as tmp:
            yield _resolve_json(spec, pretrained, tmp)
    else:
        yield _resolve_builtin(spec, pretrained)


def _check_device(device: str, precision: str) -> tuple[torch.device, str]:
    return resolve_device(device, precision, error=TeacherError, who="the teacher")


def _final_preprocess(model: torch.nn.Module, src: _Source) -> dict:
    pp = jsonable(dict(model.visual.preprocess_cfg))
    pp["size"] = list(size_hw(pp))
    for k in ("mean", "std"):
        if not isinstance(pp[k], list):
            pp[k] = [float(pp[k])] * 3  # a scalar statistic, as open_clip's image_transform broadcasts it
    missing = [k for k in _DEFAULTABLE if src.given_preprocess.get(k) is None]
    source = src.where
    if missing:
        # open_clip fills these from PreprocessCfg's defaults (OpenAI CLIP's statistics, bicubic, shortest) without
        # a word; a teacher trained with other statistics would then be fed the wrong inputs.
        source = (f"open_clip default (OpenAI CLIP: mean {list(OPENAI_DATASET_MEAN)}, std {list(OPENAI_DATASET_STD)}, "
                  f"bicubic, shortest) for {', '.join(missing)}: {src.where} does not give them")
        logger.warning("teacher preprocessing: %s. If the teacher was trained with other statistics, pass a config "
                       "that states them (local-dir/hf-hub preprocess_cfg or a nested JSON config).", source)
    pp["source"] = source
    return pp


def load_teacher(spec: str, *, pretrained: str | None = None, allow_random_init: bool = False,
                 device: str = "cpu", precision: str = "fp32") -> Teacher:
    """Build the frozen teacher for `spec` (see the module docstring) through open_clip, refusing random weights
    unless `allow_random_init`. `precision` fp16/bf16 means CUDA autocast; elsewhere the teacher runs in fp32."""
    dev, precision = _check_device(device, precision)
    with _resolve(spec, pretrained) as src:
        if src.checkpoint is None and not allow_random_init:
            raise TeacherError(f"teacher {spec!r} has no weights to load ({src.no_weights_reason}). {_RANDOM_HINT}")
        digest = file_sha256(src.checkpoint) if src.checkpoint else None
        random_init = src.checkpoint is None
        # A random teacher gets kdcache's own warning below, naming the spec the user gave; open_clip's would name the
        # temporary local-dir a JSON config goes through. A teacher with a checkpoint is never filtered.
        own = _oc_model_name(src.name)
        quiet = quiet_no_weights_warning(lambda name: name == own) if random_init else contextlib.nullcontext()
        try:
            with torch.random.fork_rng(devices=[]), quiet:
                torch.manual_seed(INIT_SEED)
                model = open_clip.create_model(
                    src.name, src.pretrained, device=dev, precision="fp32",  # autocast, not cast weights
                    require_pretrained=not allow_random_init,
                    pretrained_text=False, pretrained_image=False)  # no partial (tower-only) downloads
            tokenizer = open_clip.get_tokenizer(src.name)
        except (RuntimeError, ValueError, OSError, KeyError, TypeError) as e:
            raise TeacherError(f"open_clip could not build teacher {spec!r}: {e}") from e
        if random_init:
            logger.warning("teacher %r has RANDOM weights (--allow-random-init, seed %d): its outputs are meaningless",
                           spec, INIT_SEED)
        model.eval().requires_grad_(False)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        identity = {
            "spec": spec, "pretrained": pretrained, "checkpoint": src.recorded_checkpoint, "digest": digest,
            "random_init": random_init, "init_seed": INIT_SEED if random_init else None,
            "model_cfg": jsonable(src.model_cfg),
        }
        preprocess = _final_preprocess(model, src)
    with torch.no_grad():
        logit_scale = float(model.logit_scale.exp().item())
    return Teacher(model=model, tokenizer=tokenizer, identity=identity, preprocess=preprocess,
                   embed_dim=int(src.model_cfg["embed_dim"]), logit_scale=logit_scale, device=dev, precision=precision)


# ------------------------------------------------------------------------------------------------ teacher identity

def teacher_mismatch(a: dict | None, b: dict | None) -> str | None:
    """Why two teacher identities (`Teacher.identity`, as caches and runs record it) are not the same model, or None
    when they are. The one rule build `--resume`, online KD, eval and export share:

    - weights from a file: the same checkpoint digest (sha256 of its bytes), wherever the file now lives;
    - random init: both random, the same init seed and the same model config (there is no file to hash);
    - and, when both records hold one, the same model config (one checkpoint read under another config, e.g. with
      quick_gelu flipped, is another function).
    """
    if not a or not b:
        return "no teacher identity recorded"
    if a.get("model_cfg") is not None and b.get("model_cfg") is not None and a["model_cfg"] != b["model_cfg"]:
        return "model_cfg differs"
    if bool(a.get("random_init")) != bool(b.get("random_init")):
        return f"random_init: {bool(a.get('random_init'))} vs {bool(b.get('random_init'))}"
    if a.get("random_init"):
        if a.get("init_seed") != b.get("init_seed"):
            return f"init_seed: {a.get('init_seed')!r} vs {b.get('init_seed')!r}"
        if a.get("model_cfg") is None or b.get("model_cfg") is None:
            return "a random-init teacher is identified by its model config, and one side records none"
        return None
    if not a.get("digest") or not b.get("digest"):
        return "no weights digest recorded"
    if a["digest"] != b["digest"]:
        return f"digest: {a['digest']} vs {b['digest']}"
    return None


def same_teacher(a: dict | None, b: dict | None) -> bool:
    """Whether two recorded teacher identities are the same model (see `teacher_mismatch`)."""
    return teacher_mismatch(a, b) is None
