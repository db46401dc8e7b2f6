"""Eval tasks, chosen by `--task` from a registry: what each needs, measures and reports.

    task = get_task("zeroshot")            # an unknown name fails listing the valid ones
    task.metric_columns                    # (("top-1", "top1"), ...): report.md's and `kdcache compare`'s columns

A task owns everything that differs between tasks, so `kdcache.eval.run` (load, collect, agree, time, write) and
`kdcache.eval.compare` never test a task's name: its option checks, which samples it can use, its metrics (the pure
functions of `kdcache.eval.metrics`), its part of the cached teacher reference, its fields and sections of the
report, and what `kdcache compare` shows for it. Adding a task is a `@register_task` subclass here.
"""

from __future__ import annotations

import csv
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from kdcache.eval import metrics as M
from kdcache.eval.config import EvalConfig, EvalError
from kdcache.eval.models import EvalModel, ModelError
from kdcache.eval.plots import plot_confusion, plot_per_class
from kdcache.eval.report import fmt_number, md_table, model_name, short_name

if TYPE_CHECKING:
    from kdcache.cache.reader import Cache
    from kdcache.eval.data import Collected
    from kdcache.shards import Sample

CONFUSION_INLINE = 20    # confusion matrices with at most this many classes are printed in report.md
RETRIEVAL_KS = (1, 5, 10)

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available to --task under its `name`."""
    TASKS[cls.name] = cls
    return cls


def get_task(name: str, *, error: type[Exception] = ValueError) -> Task:
    """A fresh task for --task `name`; an unknown name raises `error` listing the valid ones."""
    if name not in TASKS:
        raise error(f"--task {name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]()


class Task(ABC):
    """One kind of evaluation. An instance serves one eval run, in this order: `check` (the options), `load` (what
    it reads besides the data), `prepare` (the models, before the data pass), `skip_reason` per sample, `evaluate`
    per model, `add_cache_reference` when agreement comes from a cache, `report_fields`. Rendering and `kdcache
    compare` use only the class attributes and the report dict, so a fresh instance serves them."""

    name: ClassVar[str]
    data_kind: ClassVar[str]                 # the shards it reads ("labelled"), for the --data error
    needs: ClassVar[str]                     # what a usable sample carries, for the "no usable samples" error
    embeds_text: ClassVar[bool] = False      # the data pass also embeds each sample's caption
    cache_arrays: ClassVar[tuple[str, ...]] = ()   # per-row cache arrays its part of the cached reference reads
    metrics_title: ClassVar[str]
    metric_columns: ClassVar[tuple[tuple[str, str], ...]]      # (header, metrics key), in %: report.md and compare
    agreement_columns: ClassVar[tuple[tuple[str, str], ...]] = ()   # agreement columns beyond the common ones
    delta_columns: ClassVar[tuple[tuple[str, str], ...]]       # compare: (header, metrics key) of Δ vs the teacher
    params_key: ClassVar[str]                # the parameter count that runs per image for this task
    params_what: ClassVar[str]               # compare's footnote: which parameters `params_key` counts
    params_note: ClassVar[str] = ""          # compare's footnote: why those
    headline_label: ClassVar[str]            # the axis label of `headline` in compare's plot

    def check(self, cfg: EvalConfig) -> None:
        """Refuse options this task needs but lacks, or does not use (EvalError naming the option)."""
        return None  # an optional hook: a task without options of its own accepts any config

    def load(self, cfg: EvalConfig) -> None:
        """Read what the task needs besides the shards; ValueError/FileNotFoundError for a bad option value."""
        return None  # an optional hook: most tasks need nothing but the shards

    def vocabulary(self) -> list[str] | None:
        """The class names that --labels names resolve against (after `load`); None: ids only."""
        return None

    def restrict_labels(self, ids: Sequence[int]) -> None:
        """--labels: only samples of these class ids are evaluated (the data pass drops the others); a task may also
        narrow what it scores among."""
        return None  # an optional hook: dropping the other samples is all most tasks need

    @abstractmethod
    def prepare(self, models: Sequence[EvalModel]) -> list[str]:
        """Everything that can fail on a model, done before the data pass; returns notes for the report."""

    @abstractmethod
    def skip_reason(self, sample: Sample, url: str) -> str | None:
        """Why this task cannot use `sample` (counted under that name in the report), or None to use it."""

    @abstractmethod
    def evaluate(self, model: EvalModel, col: Collected, *, index: int, out_dir: Path) -> tuple[dict, dict]:
        """(outputs, metrics) of one model: outputs are what agreement compares ("image_emb", "logits",
        "text_emb"); metrics go to the report as they are. `index` is the model's position, for file names."""

    @abstractmethod
    def add_cache_reference(self, ref: dict, cache: Cache, arrays: dict[str, list[np.ndarray]]) -> str:
        """Add this task's cached teacher outputs to `ref` (which holds "image_emb"), from `arrays` (each of
        `cache_arrays`, one entry per sample) and the cache itself; returns what is unavailable and why, or ""."""

    @abstractmethod
    def report_fields(self, col: Collected) -> dict:
        """The task's top-level fields of report.json."""

    @abstractmethod
    def summary_line(self, report: dict) -> str:
        """report.md's bullet on what the task evaluated against (vocabulary, captions)."""

    @abstractmethod
    def headline(self, metrics: dict) -> float:
        """The one number (a fraction) that stands for a model's quality in compare's accuracy vs latency plot."""

    @abstractmethod
    def score_text(self, metrics: dict) -> str:
        """A model's main scores in a few words, for the line `kdcache eval` prints per model."""

    def metrics_section(self, report: dict) -> list[str]:
        """report.md's main table: `metric_columns` of every model, in %."""
        rows = [[model_name(m), *(fmt_number(m["metrics"][key], pct=True) for _, key in self.metric_columns)]
                for m in report["models"]]
        return [f"## {self.metrics_title}", "", md_table(["model", *(h for h, _ in self.metric_columns)], rows)]

    def detail_sections(self, report: dict) -> list[str]:
        """report.md's sections after the efficiency table (none by default); each ends with a blank line."""
        return []


@register_task
class ZeroShot(Task):
    """Zero-shot classification: a class head from the class names and prompt templates; top-1/top-5, P/R/F1,
    confusion matrices. With --labels, only those classes' samples are scored, among those classes alone: the head
    is their rows of the full vocabulary's head, and labels are renumbered in that order (0..k-1), exactly as an eval
    of a test set holding only those samples with a --classes file of those names."""

    name = "zeroshot"
    data_kind = "labelled"
    needs = "labels (.cls)"
    metrics_title = "Accuracy (%)"
    metric_columns = (("top-1", "top1"), ("top-5", "top5"), ("macro P", "macro_precision"),
                      ("macro R", "macro_recall"), ("macro F1", "macro_f1"), ("weighted F1", "weighted_f1"))
    delta_columns = (("Δ top-1", "top1"), ("Δ macro-F1", "macro_f1"))
    # Zero-shot runs only the image tower per image (the class head is computed once).
    params_key = "image_params"
    params_what = "image-tower"
    params_note = " (zero-shot runs only the image tower per image; the class head is precomputed)"
    headline_label = "top-1 (%)"

    def __init__(self) -> None:
        self.classes: list[str] = []
        self.templates: list[str] = []
        self.classes_source = self.templates_source = ""
        self.heads: dict[str, torch.Tensor] = {}     # per model label: [C, D] class embeddings
        self.vocab: list[str] = []                   # all of --classes (.cls labels index it)
        self.class_ids: list[int] | None = None      # --labels: the vocabulary ids scored, in order; None: all

    def check(self, cfg: EvalConfig) -> None:
        if not cfg.classes:
            raise EvalError("--task zeroshot needs --classes (cifar10, cifar100, imagenet, or a file, one class a "
                            "line)")

    def load(self, cfg: EvalConfig) -> None:
        from kdcache.vocab import load_classes, load_templates  # imports open_clip: only when a vocabulary is needed

        self.classes, self.classes_source = load_classes(cfg.classes)
        self.vocab = list(self.classes)
        self.templates, self.templates_source = load_templates(cfg.templates, classes_spec=cfg.classes)

    def vocabulary(self) -> list[str] | None:
        return self.vocab

    def restrict_labels(self, ids: Sequence[int]) -> None:
        self.class_ids = list(ids)
        self.classes = [self.vocab[i] for i in ids]

    def _labels(self, col: Collected) -> list[int]:
        """The samples' labels as indices of the scored classes."""
        if self.class_ids is None:
            return list(col.labels)
        index = {c: i for i, c in enumerate(self.class_ids)}
        return [index[label] for label in col.labels]

    def prepare(self, models: Sequence[EvalModel]) -> list[str]:
        notes = []
        for m in models:
            # the full vocabulary's head (a run's head is its cache's, for that vocabulary only), narrowed by --labels
            head = m.zero_shot_head(self.vocab, self.templates)
            self.heads[m.label] = head if self.class_ids is None else head[self.class_ids]
            cached = m.provenance.get("cache_templates")
            if cached is not None and list(cached) != list(self.templates):
                notes.append(f"{m.label}: a run's class head is its cache's, built with the cache's "
                             f"{len(cached)} template(s), not the {len(self.templates)} --templates.")
        return notes

    def skip_reason(self, sample: Sample, url: str) -> str | None:
        if sample.label is None:
            return "no_label"
        if sample.label >= len(self.vocab):
            raise EvalError(f"sample {sample.key!r} of {url} has label {sample.label}, outside the {len(self.vocab)} "
                            "classes of --classes: the vocabulary does not fit these shards")
        return None

    def evaluate(self, model: EvalModel, col: Collected, *, index: int, out_dir: Path) -> tuple[dict, dict]:
        img = torch.cat(col.image_emb[model.label])
        labels = torch.tensor(self._labels(col), dtype=torch.int64)
        logits = M.class_logits(img, self.heads[model.label], logit_scale=model.logit_scale)
        n_classes = len(self.classes)
        rep = M.classification_report(logits.argmax(1), labels, num_classes=n_classes)
        cm = rep.pop("confusion")
        stem = f"{index}-{_slug(model.label)}"
        csv_name = f"confusion-{stem}.csv"
        _write_confusion(out_dir / csv_name, cm, self.classes)
        plots = {"confusion": f"confusion-{stem}.png", "per_class": f"per-class-{stem}.png"}
        title = short_name(model.describe())
        plot_confusion(cm, self.classes, out_dir / plots["confusion"], title=title)
        plot_per_class(rep["per_class"], self.classes, out_dir / plots["per_class"], title=title)
        metrics = {"top1": M.topk_accuracy(logits, labels, k=1),
                   "top5": M.topk_accuracy(logits, labels, k=5) if n_classes > 5 else None,
                   **rep, "confusion": cm.tolist() if n_classes <= CONFUSION_INLINE else None,
                   "confusion_csv": csv_name, "plots": plots,
                   # per-image top-1 class, in the report's sample order: for paired comparisons (compare --paired-ci)
                   "predictions": logits.argmax(1).tolist()}
        return {"image_emb": img, "logits": logits}, metrics

    def add_cache_reference(self, ref: dict, cache: Cache, arrays: dict[str, list[np.ndarray]]) -> str:
        if "logits" not in cache.capabilities:
            return "the cache has no class head (built without --classes): cosine only"
        cache_classes, _, head = cache.vocab()
        if list(cache_classes) != list(self.vocab):
            return "the cache's classes differ from --classes: class agreement and KL unavailable, cosine only"
        head = head if self.class_ids is None else head[self.class_ids]
        ref["logits"] = M.class_logits(ref["image_emb"], head, logit_scale=cache.logit_scale)
        return ""

    def report_fields(self, col: Collected) -> dict:
        return {"classes": {"names": self.classes, "source": self.classes_source,
                            **({"vocabulary_ids": self.class_ids} if self.class_ids is not None else {})},
                "templates": {"templates": self.templates, "source": self.templates_source},
                "samples": {"keys": list(col.keys), "labels": self._labels(col)}}

    def summary_line(self, report: dict) -> str:
        c, t = report["classes"], report["templates"]
        chosen = f", chosen by --labels (ids {c['vocabulary_ids']})" if "vocabulary_ids" in c else ""
        return (f"- classes: {len(c['names'])} ({c['source']}{chosen}); templates: {len(t['templates'])} "
                f"({t['source']})")

    def headline(self, metrics: dict) -> float:
        return metrics["top1"]

    def score_text(self, metrics: dict) -> str:
        return f"top-1 {100 * metrics['top1']:.2f}%"

    def detail_sections(self, report: dict) -> list[str]:
        names, models = report["classes"]["names"], report["models"]
        out = ["## Per class (%)", ""]
        for m in models:
            pc = m["metrics"]["per_class"]
            rows = [[n, str(pc["support"][i]), fmt_number(pc["precision"][i], pct=True),
                     fmt_number(pc["recall"][i], pct=True), fmt_number(pc["f1"][i], pct=True)]
                    for i, n in enumerate(names)]
            out += [f"### {m['label']}", "", md_table(["class", "support", "precision", "recall", "F1"], rows), ""]
            png = m["metrics"].get("plots", {}).get("per_class")
            if png:
                out += [f"![per-class precision, recall and F1: {m['label']}]({png})", ""]
        out += ["## Confusion matrices (rows: true class, columns: predicted)", ""]
        for m in models:
            cm = m["metrics"]["confusion"]
            out += [f"### {m['label']}", ""]
            if isinstance(cm, list):  # None: too many classes to print; the CSV has it
                rows = [[n, *map(str, r)] for n, r in zip(names, cm, strict=True)]
                out += [md_table(["true \\ pred", *names], rows), ""]
            png = m["metrics"].get("plots", {}).get("confusion")
            if png:
                out += [f"![confusion matrix: {m['label']}]({png})", ""]
            out += [f"CSV: `{m['metrics']['confusion_csv']}`", ""]
        return out


@register_task
class Retrieval(Task):
    """Image<->text retrieval on captioned samples: recall@k both ways, a hit decided by caption text."""

    name = "retrieval"
    data_kind = "captioned"
    needs = "captions (.txt or .json caption)"
    embeds_text = True
    cache_arrays = ("caption_emb",)
    metrics_title = "Retrieval recall (%)"
    metric_columns = tuple((f"{'I→T' if d == 'i2t' else 'T→I'} R@{k}", f"{d}_r{k}")
                           for d in ("i2t", "t2i") for k in RETRIEVAL_KS)
    agreement_columns = (("text cosine", "text_cosine"),)
    delta_columns = (("Δ I→T R@1", "i2t_r1"), ("Δ T→I R@1", "t2i_r1"))
    # Retrieval runs both towers.
    params_key = "total_params"
    params_what = "total (both towers)"
    headline_label = "mean R@1 (%)"

    def check(self, cfg: EvalConfig) -> None:
        if cfg.classes or cfg.templates:
            raise EvalError("--classes/--templates are for --task zeroshot, not retrieval")

    def prepare(self, models: Sequence[EvalModel]) -> list[str]:
        for m in models:
            if not m.can_embed_text:
                raise ModelError(f"--model {m.label}: --task retrieval needs a text tower; a training run has only "
                                 "its trained tower: `kdcache export` it (with the teacher's other tower) and "
                                 "evaluate the exported directory")
        return []

    def skip_reason(self, sample: Sample, url: str) -> str | None:
        return "no_caption" if sample.caption is None else None

    def evaluate(self, model: EvalModel, col: Collected, *, index: int, out_dir: Path) -> tuple[dict, dict]:
        img = torch.cat(col.image_emb[model.label])
        txt = torch.cat(col.text_emb[model.label])
        return {"image_emb": img, "text_emb": txt}, M.retrieval_recall(img, txt, col.captions, ks=RETRIEVAL_KS)

    def add_cache_reference(self, ref: dict, cache: Cache, arrays: dict[str, list[np.ndarray]]) -> str:
        t = np.stack(arrays["caption_emb"]).astype(np.float32)
        # A caption row the build never wrote reads back as NaN: text agreement would be NaN too.
        if not np.isfinite(t).all():
            return "some captions have no cached teacher text embedding: image cosine only"
        ref["text_emb"] = torch.from_numpy(t)
        return ""

    def report_fields(self, col: Collected) -> dict:
        return {"retrieval": {"unique_captions": len(set(col.captions)), "ks": list(RETRIEVAL_KS),
                              "hit_rule": "caption text equality"}}

    def summary_line(self, report: dict) -> str:
        return f"- captions: {report['retrieval']['unique_captions']} distinct texts among {report['data']['samples']}"

    def headline(self, metrics: dict) -> float:
        return (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2

    def score_text(self, metrics: dict) -> str:
        return f"R@1 I→T {100 * metrics['i2t_r1']:.2f}% T→I {100 * metrics['t2i_r1']:.2f}%"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:] or "model"


def _write_confusion(path: Path, cm: np.ndarray, names: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true\\pred", *names])
        for n, row in zip(names, cm.tolist(), strict=True):
            w.writerow([n, *row])
