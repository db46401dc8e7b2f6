"""open_clip models from JSON configs, through open_clip's own factory.

    cfg = load_config_file("kdcache/configs/students/kdc-tiny-image.json")    # {"model_cfg", "preprocess_cfg"}
    model = open_clip_from_config(cfg, checkpoint="run/student.safetensors")   # or no checkpoint: random init
    tokenizer = tokenizer_from_config(cfg)

A config (nested `{model_cfg, preprocess_cfg}` or a flat open_clip model config) is written to a temporary directory in
open_clip's local-dir format, with the checkpoint symlinked under a name open_clip looks for, and built with
`open_clip.create_model("local-dir:...")`. There is one loading path, so a config behaves exactly as the same model
exported with `kdcache export` and loaded by stock open_clip.

Neutral ground: shared by the teacher loader and the trainer (students); it imports neither.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip import factory as oc_factory

CONFIG_NAME = "open_clip_config.json"
# How a checkpoint is named inside the temporary local-dir, so that open_clip's _find_checkpoint_in_dir picks it
# (it only looks for *.safetensors, *.bin and *.pth).
CHECKPOINT_NAMES = {".safetensors": "open_clip_model.safetensors", ".bin": "open_clip_pytorch_model.bin",
                    ".pth": "open_clip_pytorch_model.pth", ".pt": "open_clip_pytorch_model.pth"}
_MODEL_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


class ConfigError(ValueError):
    """A model config or checkpoint that open_clip cannot be asked to build."""


def jsonable(obj: Any) -> Any:
    """Tuples -> lists and keys -> str, recursively (open_clip keeps tuples in its preprocess cfg)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def nested_config(cfg: dict, *, where: str = "config") -> dict:
    """The nested `{model_cfg, preprocess_cfg}` form of a nested or flat open_clip config (a deep copy)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    if "model_cfg" in cfg:
        model_cfg, preprocess_cfg = cfg["model_cfg"], cfg.get("preprocess_cfg") or {}
    elif all(k in cfg for k in _MODEL_KEYS):
        model_cfg, preprocess_cfg = cfg, {}
    else:
        raise ConfigError(f"{where} is neither an open_clip model config ({', '.join(_MODEL_KEYS)}) nor the nested "
                          "{model_cfg, preprocess_cfg} form")
    missing = [k for k in _MODEL_KEYS if k not in model_cfg]
    if missing:
        raise ConfigError(f"{where}: model_cfg lacks {missing}")
    return {"model_cfg": copy.deepcopy(model_cfg), "preprocess_cfg": copy.deepcopy(preprocess_cfg)}


def load_config_file(path: str | Path) -> dict:
    """Read a JSON config file (flat or nested) and return the nested form (flat -> preprocess_cfg {})."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model config {str(path)!r}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"model config {p} is not valid JSON: {e}") from e
    return nested_config(data, where=f"model config {p}")


def write_local_dir(cfg: dict, directory: str | Path, *, checkpoint: str | None = None) -> Path:
    """Write `cfg` into `directory` in open_clip's local-dir format; `checkpoint` (a .safetensors/.bin/.pth/.pt file)
    is symlinked under the name open_clip looks for, not copied."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_NAME).write_text(json.dumps(jsonable(nested_config(cfg)), indent=2), encoding="utf-8")
    if checkpoint is not None:
        ck = Path(checkpoint)
        if not ck.is_file():
            raise ConfigError(f"checkpoint {checkpoint!r}: no such file")
        if ck.suffix not in CHECKPOINT_NAMES:
            raise ConfigError(f"checkpoint {checkpoint!r}: expected one of {sorted(CHECKPOINT_NAMES)}")
        (d / CHECKPOINT_NAMES[ck.suffix]).symlink_to(ck.resolve())
    return d


def open_clip_from_config(cfg: dict, *, checkpoint: str | None = None, **create_kwargs: Any) -> torch.nn.Module:
    """Build the open_clip model `cfg` describes (nested or flat), loading `checkpoint` if given (strictly: open_clip
    loads a local-dir checkpoint with strict=True). `create_kwargs` go to `open_clip.create_model` (device, precision,
    require_pretrained, ...). Unless asked, no tower's default pretrained weights are downloaded: the model is what the
    config and checkpoint say. The result has `model.visual.preprocess_cfg` set (open_clip's defaults fill the fields
    the config leaves out)."""
    nested = nested_config(cfg)
    # create_model's pretrained_text defaults to True (downloads HF text weights); a config-built model stays offline.
    create_kwargs.setdefault("pretrained_text", False)
    create_kwargs.setdefault("pretrained_image", False)
    with tempfile.TemporaryDirectory(prefix="kdcache-model-") as tmp:
        write_local_dir(nested, tmp, checkpoint=checkpoint)
        return open_clip.create_model(f"{oc_factory.LOCAL_DIR_PREFIX}{tmp}", **create_kwargs)


def tokenizer_from_config(cfg: dict) -> Callable:
    """open_clip's tokenizer for this config's text tower (SimpleTokenizer with the config's context length, or the
    Hugging Face tokenizer it names)."""
    nested = nested_config(cfg)
    text_cfg = nested["model_cfg"].get("text_cfg", {})
    hf_name = text_cfg.get("hf_tokenizer_name")
    if hf_name:
        # open_clip would look for a local-dir model's HF tokenizer files inside the (temporary) directory; the config
        # names the tokenizer, so ask for it by name as open_clip does for built-in models.
        return open_clip.tokenizer.HFTokenizer(
            hf_name, context_length=text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH),
            tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))
    with tempfile.TemporaryDirectory(prefix="kdcache-tok-") as tmp:
        write_local_dir(nested, tmp)
        return open_clip.get_tokenizer(f"{oc_factory.LOCAL_DIR_PREFIX}{tmp}")


def preprocess_of(model: torch.nn.Module) -> dict:
    """The model's final preprocessing (`model.visual.preprocess_cfg`) as JSON: size [h, w], mean/std as 3-lists."""
    pp = jsonable(dict(model.visual.preprocess_cfg))
    size = pp["size"]
    pp["size"] = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    for k in ("mean", "std"):
        if not isinstance(pp[k], list):
            pp[k] = [float(pp[k])] * 3  # a scalar statistic, as open_clip's image_transform broadcasts it
    return pp
