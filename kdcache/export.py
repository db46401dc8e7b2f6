"""`kdcache export`: write a full CLIP in open_clip's directory format, so stock open_clip loads the student.

    kdcache export --image runs/img --text-from-teacher local-dir:teachers/kdc-cifar10-rn18 --out exported/
    python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:exported')"

A tower comes from a training run (its learned projection folded into the tower's own projection, so embed_dim is
the teacher's) or from a teacher (`--image-from-teacher`, `--text-from-teacher`: any --teacher form). The teacher is
loaded only here, only for the tower not trained, and must be the teacher the run's cache was built with.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdcache import __version__
from kdcache.modelcfg import open_clip_from_config
from kdcache.teacher import load_teacher, quiet_no_weights_warning, same_teacher, teacher_mismatch
from kdcache.train.rundir import load_run_student, read_done

log = logging.getLogger(__name__)

# Model-level settings that apply to both towers: mixing towers that disagree on them would change one tower.
_SHARED_KEYS = ("quick_gelu", "cast_dtype")
_TOWER_PREFIX = "visual."
# modelcfg.open_clip_from_config builds a config through a temporary local-dir named so (under the temp directory).
_CONFIG_DIR_PREFIX = "kdcache-model-"


class ExportError(ValueError):
    """The towers asked for cannot be combined into one loadable CLIP."""


@dataclass
class _Tower:
    """One side of the exported CLIP: full model config and state dict it comes from, plus provenance."""

    model_cfg: dict
    state: dict[str, torch.Tensor]
    preprocess: dict
    source: dict


def _from_run(run_dir: str, tower: str) -> tuple[_Tower, dict]:
    student, conf = load_run_student(run_dir)
    if conf["tower"] != tower:
        raise ExportError(f"{run_dir} trained the {conf['tower']} tower, not the {tower} tower")
    cfg = student.folded_config(conf["embed_dim"])
    done = read_done(run_dir)
    src = {"kind": "run", "run": str(run_dir), "student": conf["config"]["student"], "losses": conf["config"]["losses"],
           "loss_formula": conf["config"]["loss_formula"], "steps": done["steps"], "val": done.get("val", {}),
           "cache": conf["cache"], "cache_fingerprint": conf["cache_fingerprint"], "teacher": conf["teacher"]}
    return _Tower(cfg["model_cfg"], student.folded_state_dict(), cfg.get("preprocess_cfg", student.preprocess), src), \
        conf


def _from_teacher(spec: str, pretrained: str | None, allow_random_init: bool) -> _Tower:
    t = load_teacher(spec, pretrained=pretrained, allow_random_init=allow_random_init)
    state = {k: v.detach().cpu() for k, v in t.model.state_dict().items()}
    return _Tower(copy.deepcopy(t.identity["model_cfg"]), state, t.preprocess,
                  {"kind": "teacher", "spec": spec, "digest": t.identity["digest"], "identity": dict(t.identity)})


def _check_same_teacher(run_conf: dict, teacher: _Tower, side: str) -> None:
    why = teacher_mismatch(run_conf["teacher"], teacher.source["identity"])
    if why:
        raise ExportError(f"--{side}-from-teacher {teacher.source['spec']} is not the teacher the run was distilled "
                          f"from ({run_conf['teacher'].get('spec')}; {why}): the run's embeddings live in that "
                          "teacher's space, so the towers would not match")


def combine(image: _Tower, text: _Tower, embed_dim: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """One CLIP config and state dict: the image side's vision tower, the text side's text tower (and class)."""
    for k in _SHARED_KEYS:
        if image.model_cfg.get(k, False) != text.model_cfg.get(k, False):
            raise ExportError(f"the towers disagree on model-level setting {k!r} (image: {image.model_cfg.get(k)}, "
                              f"text: {text.model_cfg.get(k)}); open_clip applies it to both towers")
    cfg = copy.deepcopy(text.model_cfg)
    cfg["vision_cfg"] = copy.deepcopy(image.model_cfg["vision_cfg"])
    cfg["embed_dim"] = embed_dim
    state = {k: v for k, v in text.state.items() if not k.startswith(_TOWER_PREFIX)}
    state.update({k: v for k, v in image.state.items() if k.startswith(_TOWER_PREFIX)})
    return cfg, state


def export(*, out: str, image_run: str | None = None, text_run: str | None = None,
           image_from_teacher: str | None = None, text_from_teacher: str | None = None,
           pretrained: str | None = None, allow_random_init: bool = False) -> Path:
    """Write DIR/open_clip_config.json, DIR/open_clip_model.safetensors and DIR/README.md (a short model card)."""
    if bool(image_run) == bool(image_from_teacher) or bool(text_run) == bool(text_from_teacher):
        raise ExportError("give each tower exactly one source: --image RUN or --image-from-teacher TEACHER, and "
                          "--text RUN or --text-from-teacher TEACHER (a full CLIP needs both towers; the tower you did "
                          "not train comes from the teacher)")
    if image_from_teacher and text_from_teacher:
        raise ExportError("nothing trained to export: give --image RUN and/or --text RUN")
    runs = {}
    image = text = None
    if image_run:
        image, runs["image"] = _from_run(image_run, "image")
    if text_run:
        text, runs["text"] = _from_run(text_run, "text")
    dims = {c["embed_dim"] for c in runs.values()}
    if len(dims) > 1:
        raise ExportError(f"the runs were distilled into different embedding sizes {sorted(dims)}")
    if len(runs) == 2 and not same_teacher(runs["image"]["teacher"], runs["text"]["teacher"]):
        why = teacher_mismatch(runs["image"]["teacher"], runs["text"]["teacher"])
        raise ExportError(f"the image and text runs were distilled from different teachers ({why})")
    (embed_dim,) = dims
    run_conf = next(iter(runs.values()))
    if image is None:
        image = _from_teacher(image_from_teacher, pretrained, allow_random_init)
        _check_same_teacher(run_conf, image, "image")
    if text is None:
        text = _from_teacher(text_from_teacher, pretrained, allow_random_init)
        _check_same_teacher(run_conf, text, "text")
    model_cfg, state = combine(image, text, embed_dim)
    # The teacher's logit scale: the towers were distilled into its space (a text student's own is its random init).
    state["logit_scale"] = torch.tensor(math.log(run_conf["logit_scale"])).reshape(state["logit_scale"].shape)
    config = {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(image.preprocess)}

    # Prove it loads (strictly) before writing anything a user would trust. The model is built from the config alone
    # and filled just below, so open_clip's "no weights, initialized randomly" warning about it would be false.
    with quiet_no_weights_warning(_is_config_build):
        model = open_clip_from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"combined state dict does not fit the combined config: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "open_clip_model.safetensors"))
    (out_dir / "README.md").write_text(model_card(config, image.source, text.source))
    return out_dir


def _is_config_build(model_name: str) -> bool:
    """Whether open_clip's model name is open_clip_from_config's temporary local-dir."""
    path = Path(model_name.removeprefix("local-dir:"))
    return path.parent == Path(tempfile.gettempdir()) and path.name.startswith(_CONFIG_DIR_PREFIX)


def _preprocess_cfg(pp: dict) -> dict:
    keep = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
    out = {k: pp[k] for k in keep if k in pp}
    if isinstance(out.get("size"), (list, tuple)) and len(set(out["size"])) == 1:
        out["size"] = out["size"][0]
    return out


def model_card(config: dict, image_src: dict, text_src: dict) -> str:
    def describe(side: str, s: dict) -> str:
        if s["kind"] == "teacher":
            return f"- **{side} tower**: the teacher's own, `{s['spec']}` (weights {s['digest']})."
        val = ", ".join(f"{k} {v:.4f}" for k, v in s["val"].items() if isinstance(v, float))
        return (f"- **{side} tower**: student `{s['student']}` distilled by kdcache from teacher "
                f"`{s['teacher'].get('spec')}` ({s['teacher'].get('digest')}) on cache `{s['cache']}` "
                f"({s['cache_fingerprint']}), {s['steps']} steps, loss `{s['loss_formula']}`. Validation: {val}.")
    return "\n".join([
        "# kdcache export", "",
        "A full CLIP in open_clip's directory format. Load it with stock open_clip:", "",
        "```python", "import open_clip",
        "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:THIS_DIR')",
        "tokenizer = open_clip.get_tokenizer('local-dir:THIS_DIR')", "```", "",
        describe("Image", image_src), describe("Text", text_src), "",
        f"Embedding size {config['model_cfg']['embed_dim']} (the teacher's; any learned projection is folded into "
        "the tower's own projection).", f"Exported by kdcache {__version__}.", "",
    ])
