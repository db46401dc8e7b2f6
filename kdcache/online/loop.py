"""Online distillation, the expensive baseline kdcache replaces: the teacher runs live on every training batch.

    kdcache train --cache cache.zarr --tower image --student kdc-tiny-image --out runs/online --max-steps 50 \\
        --online-teacher local-dir:teachers/kdc-cifar10-rn18

Same student, losses, data order, views and schedule as `kdcache train` from the cache: `run_online` loads the teacher
and hands `kdcache.train.loop.run` an `OnlineTargets`, which replaces the cached teacher outputs of each batch with
the live teacher's on the very view the student sees (the loader renders it a second time at the teacher's size and
interpolation: view 0 through the teacher's eval transform, views >= 1 from the recorded crop box and flip). The
cache still supplies the data index, labels, class vocabulary and view records; no cached teacher output is used
(the zero-shot head and logit scale come from the live teacher too).

Targets are computed under `torch.no_grad()`, not `torch.inference_mode()`: inference tensors cannot be saved for
backward, so a loss mixing them with the student's output would fail.

The only training code that builds a teacher; the offline path (kdcache/train) never imports this package.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from kdcache.cache.reader import Cache
from kdcache.cache.schema import CAP_LOGITS
from kdcache.hints import HintError, HintHooks
from kdcache.teacher import Teacher, load_teacher, teacher_mismatch
from kdcache.train.config import TrainConfig, TrainError, TrainResult
from kdcache.train.loop import LiveTeacher, run

log = logging.getLogger(__name__)

_PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode")


class OnlineTargets:
    """`kdcache.train.loop.Targets` from a live open_clip teacher (see the module docstring)."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher
        self.tower: str | None = None
        self.pairs = False
        self.device = teacher.device
        self.hooks: HintHooks | None = None

    def describe(self) -> dict:
        t = self.teacher
        ident = {k: t.identity.get(k) for k in ("spec", "pretrained", "digest", "random_init", "init_seed")}
        return {**ident, "embed_dim": t.embed_dim, "precision": t.precision,
                "preprocess": {k: t.preprocess.get(k) for k in _PREPROCESS_KEYS}}

    def prepare(self, cache: Cache, *, tower: str, needs: tuple[str, ...], device: torch.device,
                hints: tuple[str, ...] = (), hint_pool: str = "cls") -> LiveTeacher:
        if torch.device(device) != self.teacher.device:
            raise TrainError(f"the online teacher is on {self.teacher.device} but training runs on {device}")
        self.pairs = "pairs" in needs
        if tower == "text" and self.pairs:
            # The paired image's teacher embedding would need the image shards decoded inside the text loop.
            raise TrainError("online distillation of the text tower supports losses without pairs (l1, mse, cosine); "
                             "icl and affinity need the paired images' teacher embeddings, which the text loader "
                             "does not read")
        self.tower = tower
        cached = cache.attrs["teacher"]
        why = teacher_mismatch(cached, self.teacher.identity)
        if why:
            log.warning("the online teacher (%s) is not the teacher the cache was built with (%s; %s): the run is not "
                        "comparable with offline runs on this cache", self.teacher.identity["spec"], cached.get("spec"),
                        why)
        head = None
        if CAP_LOGITS in cache.capabilities:  # as offline: the head serves kl/ce and the validation agreement
            classes, templates, _ = cache.vocab()
            log.info("online teacher: zero-shot head for %d classes x %d templates", len(classes), len(templates))
            # zero_shot_head runs in inference mode; a clone made outside it is an ordinary tensor autograd can save.
            head = self.teacher.zero_shot_head(classes, templates).clone().to(device)
        loader: dict = {"return_texts": True} if tower == "text" or self.pairs else {}
        if tower == "image":
            loader["teacher_preprocess"] = self.teacher.preprocess
        hint_dims = {}
        if hints:  # the same pooled module outputs `kdcache build --hints` caches, from the live teacher
            try:
                self.hooks = HintHooks(self.teacher.model, hints, mode=hint_pool).__enter__()
            except HintError as e:
                raise TrainError(f"--hint-map: {e}") from None
            h, w = self.teacher.preprocess["size"]
            self.encode_images(torch.zeros(1, 3, h, w, dtype=torch.uint8))
            hint_dims = {n: int(f.shape[-1]) for n, f in self.hooks.take().items()}
        return LiveTeacher(embed_dim=self.teacher.embed_dim, logit_scale=self.teacher.logit_scale, head=head,
                           loader=loader, identity=dict(self.teacher.identity), hint_dims=hint_dims)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 [B, D] on the teacher's device from uint8 [B, 3, H, W] at the teacher's size."""
        with self.teacher.autocast():
            feats = self.teacher.model.encode_image(self.teacher.normalize_images(pixels))
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised float32 [B, D] on the teacher's device (the teacher's tokenizer truncates to its context)."""
        tokens = self.teacher.tokenizer(list(texts)).to(self.device)
        with self.teacher.autocast():
            feats = self.teacher.model.encode_text(tokens)
        return F.normalize(feats.float(), dim=-1)

    def __call__(self, batch: dict) -> dict:
        if self.tower is None:
            raise RuntimeError("OnlineTargets.prepare() must run before the first batch")
        batch = dict(batch)
        if self.tower == "image":
            if "teacher_pixels" not in batch:
                raise TrainError("image batches lack teacher_pixels: the loader was not given the teacher's "
                                 "preprocessing (teacher_preprocess)")
            batch["teacher"] = self.encode_images(batch.pop("teacher_pixels"))
            if self.hooks is not None:
                batch.update({f"hint:{n}": f for n, f in self.hooks.take().items()})
        else:
            batch["teacher"] = self.encode_texts(batch.pop("texts"))
        if self.pairs:  # image tower only (prepare refuses text + pairs): teacher text embedding of each caption
            has = batch["has_other"].to(torch.bool)
            texts = batch.pop("texts")
            other = torch.full_like(batch["teacher"], float("nan"))
            rows = has.nonzero().flatten().tolist()
            if rows:
                other[has.to(other.device)] = self.encode_texts([texts[i] for i in rows])
            batch["other"] = other
        else:  # no loss reads them: drop the cached ones so that no cached teacher output reaches the losses
            batch.pop("other", None)
            batch.pop("has_other", None)
            batch.pop("texts", None)
        return batch


def run_online(cfg: TrainConfig, *, teacher: str, pretrained: str | None = None,
               allow_random_init: bool = False) -> TrainResult:
    """`kdcache train --online-teacher TEACHER`: load the teacher (any `--teacher` form) on cfg.device and train with
    it live in the loop. Refuses a teacher whose weights did not load unless `allow_random_init`."""
    t = load_teacher(teacher, pretrained=pretrained, allow_random_init=allow_random_init, device=cfg.device,
                     precision=cfg.precision)
    return run(cfg, targets=OnlineTargets(t))
