"""Distillation losses: a registry of named terms and their weighted sum.

    loss = WeightedLoss(parse_loss_args(["l1=0.6", "ce=0.35", "kl=0.05"]), tower="image")
    print(loss.formula)                        # 0.6*l1 + 0.35*ce + 0.05*kl
    terms = loss(LossInputs(student=s, teacher=t, head=head, logit_scale=100.0, temperature=4.0, labels=y))
    terms["loss"].backward()                   # terms also holds l1_loss, ce_loss, kl_loss (unweighted) for logging

Every term takes the same `LossInputs` (named tensors in) and returns a scalar; `WeightedLoss` returns every term as
"<name>_loss" and the weighted total as "loss" (named losses out). Each term declares the towers it applies to and the
data it needs ("logits": the cached zero-shot head; "labels"; "pairs": teacher embeddings of the other modality), so a
run can refuse an impossible combination before step 1.

Under DDP (kdcache/train/ddp.py) each rank holds a slice of the global batch. Row-wise terms average over the slice and
DDP averages their gradients; the terms whose rows see each other (in-batch negatives: `icl`, `affinity`) first gather
every rank's rows through `LossInputs.gather` (the student's with their gradient, as open_clip does), so a run on N
ranks of B rows computes them exactly as one process with N*B rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

TOWERS = ("image", "text")
NEEDS = ("logits", "labels", "pairs", "hints")


@dataclass(frozen=True)
class LossInputs:
    """What one step gives the losses; rows of every [B, ...] tensor are the same samples."""

    student: torch.Tensor                    # [B, D] L2-normalised student embedding (after projection)
    teacher: torch.Tensor                    # [B, D] L2-normalised cached teacher embedding, same modality and view
    head: torch.Tensor | None = None         # [C, D] cached zero-shot head (classes x dim)
    logit_scale: float = 100.0               # cached teacher logit scale
    temperature: float = 1.0
    labels: torch.Tensor | None = None       # [B] int64, -1 = no label
    other: torch.Tensor | None = None        # [B, D] teacher embedding of the other modality, NaN rows where absent
    has_other: torch.Tensor | None = None    # [B] bool
    # (student feature through its adapter [B, C], teacher hint [B, C]) per --hint-map pair
    hints: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    # DDP training: [B, ...] -> every rank's rows in rank order, keeping the gradient (`ddp.Ranks.gather`); None when
    # this batch is the whole batch (one process, validation)
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None


class Loss:
    """A registered loss term: `__call__(LossInputs) -> scalar tensor`."""

    name: str = ""
    towers: tuple[str, ...] = TOWERS
    needs: tuple[str, ...] = ()

    def __call__(self, x: LossInputs) -> torch.Tensor:
        raise NotImplementedError

    def _need(self, x: LossInputs, field: str) -> torch.Tensor:
        value = getattr(x, field)
        if value is None:
            raise ValueError(f"loss {self.name!r} needs LossInputs.{field}")
        return value


LOSSES: dict[str, type[Loss]] = {}


def register_loss(name: str):
    """Class decorator: register a `Loss` subclass under `name`."""
    def deco(cls: type[Loss]) -> type[Loss]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        cls.name = name
        LOSSES[name] = cls
        return cls
    return deco


def _zero(x: LossInputs) -> torch.Tensor:
    # A zero that keeps the graph (and the device/dtype), so backward() and DDP see every parameter used.
    return x.student.sum() * 0


def _class_logits(x: LossInputs, emb: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    return x.logit_scale * emb.to(head.dtype) @ head.T


def _whole_batch(x: LossInputs, *fields: str) -> LossInputs:
    """`x` with `fields` (and has_other) holding the global batch's rows, for terms whose rows see each other; the
    other row tensors are dropped, as they no longer line up."""
    if x.gather is None:
        return x
    rows = {f: None if getattr(x, f) is None else x.gather(getattr(x, f)) for f in fields}
    has = None if x.has_other is None else x.gather(x.has_other.to(torch.uint8)).bool()
    return replace(x, labels=None, hints=None, **{"other": None, "teacher": None, **rows}, has_other=has,
                   gather=None)


def _paired(x: LossInputs, name: str) -> torch.Tensor:
    """Rows that have an other-modality embedding (has_other, and never a NaN row)."""
    if x.other is None:
        raise ValueError(f"loss {name!r} needs LossInputs.other (teacher embeddings of the other modality)")
    rows = ~torch.isnan(x.other).any(dim=-1)
    if x.has_other is not None:
        rows = rows & x.has_other.to(torch.bool)
    return rows


@register_loss("kl")
class KLLoss(Loss):
    """KL(teacher || student) over the class vocabulary at temperature T, times T^2 (Hinton et al.; the seeds'
    formulation). Both sides' logits are logit_scale * embedding @ head.T: the teacher's are the full logits
    recomputed from its cached embedding, exact at any T."""

    towers = ("image",)
    needs = ("logits",)

    def __call__(self, x: LossInputs) -> torch.Tensor:
        head = self._need(x, "head")
        t = x.temperature
        if not t > 0:
            raise ValueError(f"temperature must be positive, got {t}")
        s_logits = _class_logits(x, x.student, head)
        t_logits = _class_logits(x, x.teacher, head)
        return F.kl_div(F.log_softmax(s_logits / t, dim=-1), F.log_softmax(t_logits / t, dim=-1),
                        log_target=True, reduction="batchmean") * (t * t)


@register_loss("ce")
class CELoss(Loss):
    """Cross-entropy of the student's zero-shot logits against hard labels; rows labelled -1 are ignored."""

    towers = ("image",)
    needs = ("logits", "labels")

    def __call__(self, x: LossInputs) -> torch.Tensor:
        head = self._need(x, "head")
        labels = self._need(x, "labels").long()
        if not bool((labels >= 0).any()):
            return _zero(x)  # cross_entropy of an all-ignored batch is NaN
        return F.cross_entropy(_class_logits(x, x.student, head), labels, ignore_index=-1)


@register_loss("l1")
class L1Loss(Loss):
    """Mean absolute difference of the normalised embeddings."""

    def __call__(self, x: LossInputs) -> torch.Tensor:
        return F.l1_loss(x.student, x.teacher.to(x.student.dtype))


@register_loss("mse")
class MSELoss(Loss):
    """Mean squared difference of the normalised embeddings."""

    def __call__(self, x: LossInputs) -> torch.Tensor:
        return F.mse_loss(x.student, x.teacher.to(x.student.dtype))


@register_loss("cosine")
class CosineLoss(Loss):
    """Mean of 1 - cos(student, teacher)."""

    def __call__(self, x: LossInputs) -> torch.Tensor:
        return (1 - F.cosine_similarity(x.student, x.teacher.to(x.student.dtype), dim=-1)).mean()


@register_loss("icl")
class ICLLoss(Loss):
    """Contrastive: each paired student embedding must pick its own pair among the teacher's other-modality
    embeddings of the paired rows in the batch (logits = logit_scale * student @ other.T, targets the diagonal)."""

    needs = ("pairs",)

    def __call__(self, x: LossInputs) -> torch.Tensor:
        x = _whole_batch(x, "student", "other")
        rows = _paired(x, self.name)
        if not bool(rows.any()):
            return _zero(x)
        s, o = x.student[rows], x.other[rows].to(x.student.dtype)
        logits = x.logit_scale * s @ o.T
        return F.cross_entropy(logits, torch.arange(len(s), device=logits.device))


@register_loss("affinity")
class AffinityLoss(Loss):
    """KL(p_teacher || p_student) of the in-batch cross-modal similarity distributions over the paired rows:
    p = softmax(logit_scale * emb @ other.T / T), emb the teacher's or the student's embedding (TinyCLIP's affinity
    mimicking). Not scaled by T^2."""

    needs = ("pairs",)

    def __call__(self, x: LossInputs) -> torch.Tensor:
        x = _whole_batch(x, "student", "teacher", "other")
        rows = _paired(x, self.name)
        if not bool(rows.any()):
            return _zero(x)
        t = x.temperature
        if not t > 0:
            raise ValueError(f"temperature must be positive, got {t}")
        o = x.other[rows].to(x.student.dtype)
        s_logits = x.logit_scale * x.student[rows] @ o.T / t
        t_logits = x.logit_scale * x.teacher[rows].to(x.student.dtype) @ o.T / t
        return F.kl_div(F.log_softmax(s_logits, dim=-1), F.log_softmax(t_logits, dim=-1), log_target=True,
                        reduction="batchmean")


@register_loss("hint")
class HintLoss(Loss):
    """Hidden-layer hints (FitNets; the seeds' "hidden" and "hidden + adapter" KD): mean over the --hint-map pairs of
    1 - cos(adapter(student feature), teacher's cached pooled feature of the same view). Cosine, so the teacher's
    feature scale does not matter."""

    towers = ("image",)
    needs = ("hints",)

    def __call__(self, x: LossInputs) -> torch.Tensor:
        pairs = self._need(x, "hints")
        if not pairs:
            raise ValueError("loss 'hint' needs at least one --hint-map STUDENT_MODULE=TEACHER_HINT")
        terms = [(1 - F.cosine_similarity(s, t.to(s.dtype), dim=-1)).mean() for s, t in pairs]
        return torch.stack(terms).mean()


def valid_losses(tower: str) -> list[str]:
    """The registered losses that apply to `tower`."""
    return [n for n, cls in LOSSES.items() if tower in cls.towers]


class WeightedLoss:
    """sum_i w_i * loss_i; calling it returns every term unweighted as "<name>_loss" and the total as "loss"."""

    def __init__(self, weights: dict[str, float], tower: str) -> None:
        if tower not in TOWERS:
            raise ValueError(f"tower {tower!r}: expected one of {', '.join(TOWERS)}")
        if not weights:
            raise ValueError(f"no loss terms given; valid for the {tower} tower: {', '.join(valid_losses(tower))}")
        for name, w in weights.items():
            if name not in LOSSES:
                raise ValueError(f"unknown loss {name!r}; registered losses: {', '.join(LOSSES)}")
            if tower not in LOSSES[name].towers:
                raise ValueError(f"loss {name!r} applies to the {'/'.join(LOSSES[name].towers)} tower only, not "
                                 f"{tower}; valid for the {tower} tower: {', '.join(valid_losses(tower))}")
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"loss {name!r}: weight must be a finite number >= 0, got {w}")
        self.tower = tower
        self.weights = {n: float(w) for n, w in weights.items()}
        self.terms = {n: LOSSES[n]() for n in weights}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.terms)

    def needs_of(self, name: str) -> tuple[str, ...]:
        """What one term needs (a subset of NEEDS)."""
        return self.terms[name].needs

    @property
    def needs(self) -> tuple[str, ...]:
        """What the terms need together, in NEEDS order."""
        wanted = {need for term in self.terms.values() for need in term.needs}
        return tuple(n for n in NEEDS if n in wanted)

    @property
    def formula(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in self.weights.items())

    def check(self, available: Collection[str]) -> None:
        """Refuse (ValueError naming the term and the missing data) when a term needs what `available` lacks."""
        for name, term in self.terms.items():
            missing = [n for n in term.needs if n not in available]
            if missing:
                raise ValueError(f"loss {name!r} needs {', '.join(missing)}, which this data does not provide "
                                 f"(available: {', '.join(sorted(available)) or 'none'})")

    def __call__(self, x: LossInputs) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = None
        for name, term in self.terms.items():
            value = term(x)
            out[f"{name}_loss"] = value
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
        out["loss"] = total
        return out

    def __repr__(self) -> str:
        return f"WeightedLoss({self.formula}, tower={self.tower!r})"


# The seed project's weighting (image tower, needs labels and the zero-shot head).
PRESETS: dict[str, dict[str, float]] = {"seed001": {"l1": 0.6, "ce": 0.35, "kl": 0.05}}


def default_losses(tower: str, capabilities: Collection[str], has_labels: bool = False) -> dict[str, float]:
    """The label-free default for a tower: image `cosine + kl` when the head ("logits") is there, else `cosine`;
    text `cosine`. It never uses labels, so `has_labels` does not change it (kept so callers can pass what they
    know)."""
    del has_labels  # label-free by design: the same default works on every cache
    if tower not in TOWERS:
        raise ValueError(f"tower {tower!r}: expected one of {', '.join(TOWERS)}")
    if tower == "image" and "logits" in capabilities:
        return {"cosine": 1.0, "kl": 1.0}
    return {"cosine": 1.0}


_TERM = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*=\s*(\S+)\s*$")
_EXAMPLE = "e.g. --loss l1=0.6 --loss ce=0.35 --loss kl=0.05, or --loss seed001"


def parse_loss_args(values: Sequence[str]) -> dict[str, float]:
    """`--loss` values -> {name: weight}: each is NAME=WEIGHT (several may be comma-separated) or a preset name.
    A name given twice is an error. Empty -> {} (the caller picks `default_losses`)."""
    out: dict[str, float] = {}

    def add(name: str, weight: float, given: str) -> None:
        if name in out:
            raise ValueError(f"--loss: {name!r} is given twice (in {given!r}); {_EXAMPLE}")
        out[name] = weight

    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if part in PRESETS:
                for name, w in PRESETS[part].items():
                    add(name, w, part)
                continue
            m = _TERM.match(part)
            if not m:
                raise ValueError(f"--loss {part!r}: expected NAME=WEIGHT or a preset ({', '.join(PRESETS)}); "
                                 f"{_EXAMPLE}")
            name, raw = m.groups()
            if name not in LOSSES:
                raise ValueError(f"--loss {part!r}: unknown loss {name!r}; registered losses: {', '.join(LOSSES)}; "
                                 f"presets: {', '.join(PRESETS)}")
            try:
                weight = float(raw)
            except ValueError:
                raise ValueError(f"--loss {part!r}: weight {raw!r} is not a number; {_EXAMPLE}") from None
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"--loss {part!r}: weight must be a finite number >= 0; {_EXAMPLE}")
            add(name, weight, part)
    return out
