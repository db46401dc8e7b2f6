"""`kdcache eval`: teacher and students side by side on the same data — accuracy, agreement, size and speed.

    kdcache eval --model ViT-B-32 --pretrained openai --model exported/ --model runs/img \\
        --data 'shards/{00000..00009}.tar' --task zeroshot --classes cifar10 --out reports/cifar10
    kdcache eval --model local-dir:/tmp/qs/exported --model /tmp/qs/runs/image --data '/tmp/qs/data/*.tar' \\
        --task zeroshot --classes /tmp/qs/data/classes.txt --cache /tmp/qs/cache.zarr --out /tmp/qs/report  # tiny CPU

Every model sees the same samples, each through its own eval preprocessing. The report directory gets
`report.json` (everything, machine-readable), `report.md` (the tables) and one `confusion-*.csv` per model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kdcache import __version__
from kdcache.eval import latency as lat
from kdcache.eval import metrics as M
from kdcache.eval.models import EvalModel, ModelError, accepts_pretrained, resolve_model
from kdcache.precision import resolve_device
from kdcache.shards import (
    DEFAULT_MAX_PIXELS,
    RejectError,
    Sample,
    ShardReport,
    expand_urls,
    file_sha256,
    iter_shard,
    parse_sample,
)
from kdcache.teacher import same_teacher

log = logging.getLogger(__name__)

TASKS = ("zeroshot", "retrieval")
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CONFUSION_INLINE = 20    # confusion matrices with at most this many classes are printed in report.md
RETRIEVAL_KS = (1, 5, 10)

CONVENTIONS = [
    "Precision/recall/F1 of a class are 0 when undefined (never predicted / no true sample), as scikit-learn's "
    "zero_division=0. Macro averages run over the classes present in the labels or the predictions; weighted "
    "averages weight classes by support.",
    "Top-5 is omitted (–) when there are 5 classes or fewer: every sample would be a hit.",
    "Retrieval: a retrieved caption is a hit when its text equals the query image's caption, and a retrieved image is "
    "a hit when its caption text equals the query caption (captions repeat: templated captions, COCO "
    "near-duplicates); the gallery keeps every sample, ties count as hits.",
    "Agreement: top-1 agreement = fraction of samples whose predicted class equals the teacher's; cosine = mean "
    "cosine between the model's and the teacher's embedding of the same sample (same embedding space only); "
    "KL = mean KL(p_teacher ‖ p_model) of the class distributions at T=1, in nats.",
    "Sizes in MB = 10^6 bytes of the checkpoint file(s); latency is the image tower's forward pass on a random "
    "normalised tensor at the model's own input size (no decoding), median over repeats.",
]


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the option."""


@dataclass(frozen=True)
class EvalConfig:
    """What `kdcache eval` was asked (one field per option); see the CLI's --help for each."""

    models: tuple[str, ...]
    data: tuple[str, ...]
    task: str
    out: str
    classes: str | None = None
    templates: str | None = None              # None: the build's default ("simple")
    cache: str | None = None
    pretrained: str | None = None             # for the one --model that is a built-in name or JSON config
    allow_random_init: bool = False
    limit: int | None = None
    batch_size: int = 64
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    latency_batch: int = 32
    latency_repeats: int = 10
    latency_warmup: int = 2
    progress: bool = True


@dataclass
class _Collected:
    """Everything gathered from one pass over the data."""

    keys: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    image_emb: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    text_emb: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    rejected: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    shard_errors: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)   # sha256 of each shard read to its end


# ------------------------------------------------------------------------------------------------------ data pass

def iter_samples(urls: Sequence[str], stats: _Collected) -> Iterator[tuple[str, Sample]]:
    """(url, decoded sample) over the shards in order; rejected samples and damaged shards are counted, not fatal."""
    for url in urls:
        report = ShardReport(url)
        for raw in iter_shard(url, report):
            try:
                yield url, parse_sample(raw, max_pixels=DEFAULT_MAX_PIXELS)
            except RejectError as e:
                stats.rejected[e.reason] += 1
        if report.digest:  # the whole shard was read: its digest came for free
            stats.digests[url] = report.digest
        if report.truncated:
            stats.shard_errors.append(f"{url}: {report.error}")
            log.warning("shard %s: %s (samples before the damage were used)", url, report.error)


def _encode_batch(models: Sequence[EvalModel], batch: list[Sample], col: _Collected, task: str) -> None:
    # Models that share a preprocessing share the resized pixels: decode and resize once per distinct transform.
    pixels: dict[str, torch.Tensor] = {}
    for m in models:
        key = json.dumps(m.preprocess, sort_keys=True)
        if key not in pixels:
            pixels[key] = torch.stack([m.transform(s.image) for s in batch])
        col.image_emb[m.label].append(m.encode_images(pixels[key]))
        if task == "retrieval":
            col.text_emb[m.label].append(m.encode_texts([s.caption for s in batch]))


def collect(models: Sequence[EvalModel], urls: Sequence[str], *, task: str, num_classes: int | None,
            batch_size: int, limit: int | None, progress: bool) -> _Collected:
    """One pass over the shards: every model embeds every usable sample (and its caption, for retrieval)."""
    col = _Collected()
    for m in models:
        col.image_emb[m.label], col.text_emb[m.label] = [], []
    batch: list[Sample] = []
    bar = tqdm(total=limit, desc=f"eval {task}", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for url, s in iter_samples(urls, col):
            if task == "zeroshot":
                if s.label is None:
                    col.skipped["no_label"] += 1
                    continue
                if s.label >= num_classes:
                    raise EvalError(f"sample {s.key!r} of {url} has label {s.label}, outside the {num_classes} "
                                    "classes of --classes: the vocabulary does not fit these shards")
            elif s.caption is None:
                col.skipped["no_caption"] += 1
                continue
            col.keys.append(s.key)
            col.urls.append(url)
            col.positions.append(s.position)
            col.labels.append(-1 if s.label is None else s.label)
            col.captions.append(s.caption or "")
            batch.append(s)
            if len(batch) == batch_size:
                _encode_batch(models, batch, col, task)
                bar.update(len(batch))
                batch = []
            if limit is not None and len(col.keys) >= limit:
                break
        if batch:
            _encode_batch(models, batch, col, task)
            bar.update(len(batch))
    finally:
        bar.close()
    return col


# --------------------------------------------------------------------------------------------------- the teacher

def pick_teacher(models: Sequence[EvalModel], cache_teacher: dict | None) -> tuple[EvalModel | None, list[str]]:
    """The reference model: the teacher-form model (not an export, not a run) that the cache / the runs were distilled
    from, else the first teacher-form model. Returns it and notes for the report."""
    notes: list[str] = []
    candidates = [m for m in models if m.kind == "open_clip"]
    refs = [r for r in [cache_teacher, *(m.distilled_from for m in models if m.kind == "run")] if r]
    matched = [m for m in candidates if any(same_teacher(m.provenance.get("identity"), r) for r in refs)]
    teacher = matched[0] if matched else (candidates[0] if candidates else None)
    if teacher is None:
        return None, notes
    if refs and not matched:
        notes.append(f"{teacher.label} is used as the teacher, but it is not the teacher the cache/runs were "
                     "distilled from (different weights digest): agreement is measured against another model.")
    others = [m.label for m in candidates if m is not teacher]
    if others:
        notes.append(f"several teacher-form models; {teacher.label} is the reference, {', '.join(others)} "
                     "are evaluated as models.")
    teacher.is_teacher = True
    return teacher, notes


# ------------------------------------------------------------------------------------------------------ agreement

def cache_reference(cache_path: str, *, urls: Sequence[str], positions: Sequence[int], keys: Sequence[str],
                    task: str, classes: Sequence[str] | None,
                    digests: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """The cached teacher outputs (view 0: the teacher's eval transform) for exactly these samples, or (None, why
    not). A sample is found when its shard's bytes are a cache shard's (same sha256, whatever the path) and the row at
    its position holds its __key__: keys alone would match other shards that reuse the same names.
    Returns {"image_emb", "text_emb"?, "logits"?, "identity"} and a note on what is missing."""
    from kdcache.cache.reader import CacheError, open_cache

    try:
        cache = open_cache(cache_path)
    except CacheError as e:
        return None, str(e)
    if "images" not in cache.capabilities:
        return None, f"cache {cache_path} has no image rows"
    units = cache.units("images")
    by_digest = {}
    for u, unit in enumerate(units):
        d = (cache.status(unit) or {}).get("digest")
        if d:
            by_digest.setdefault(d, u)
    unit_of: dict[str, int] = {}
    for url in dict.fromkeys(urls):
        # The data pass hashed every shard it read to the end; only one it stopped in (--limit) is read again.
        digest = (digests or {}).get(url) or file_sha256(url)
        if digest not in by_digest:
            return None, (f"eval shard {url} is not one of cache {cache_path}'s shards (no cached shard has its "
                          "sha256), so the cache has no teacher outputs for it. Add the teacher as a --model to "
                          "measure agreement.")
        unit_of[url] = by_digest[digest]
    names = ["key", "valid", "emb"] + (["caption_emb"] if task == "retrieval" else [])
    rows = {u: cache.read(units[u], names) for u in sorted(set(unit_of.values()))}
    emb, text = [], []
    for url, pos, key in zip(urls, positions, keys, strict=True):
        r = rows[unit_of[url]]
        if pos >= len(r["key"]) or not r["valid"][pos] or r["key"][pos] != key:
            return None, f"sample {key!r} of {url} is not a valid row of cache {cache_path} (position {pos})"
        emb.append(r["emb"][pos, 0])
        if task == "retrieval":
            text.append(r["caption_emb"][pos])
    ref = {"identity": cache.attrs.get("teacher"), "image_emb": torch.from_numpy(np.stack(emb).astype(np.float32))}
    why = ""
    if task == "retrieval":
        t = np.stack(text).astype(np.float32)
        if np.isfinite(t).all():
            ref["text_emb"] = torch.from_numpy(t)
        else:
            why = "some captions have no cached teacher text embedding: image cosine only"
    elif "logits" not in cache.capabilities:
        why = "the cache has no class head (built without --classes): cosine only"
    else:
        cache_classes, _, head = cache.vocab()
        if list(cache_classes) != list(classes or []):
            why = "the cache's classes differ from --classes: class agreement and KL unavailable, cosine only"
        else:
            ref["logits"] = M.class_logits(ref["image_emb"], head, logit_scale=cache.logit_scale)
    return ref, why


def _agreement_for(m: EvalModel, ref: dict, outputs: dict) -> dict:
    out = outputs[m.label]
    res: dict = {}
    if "logits" in ref and "logits" in out:
        res.update(M.agreement(out["logits"], ref["logits"]))
    if ref["image_emb"].shape[1] == out["image_emb"].shape[1]:
        res["cosine"] = M.agreement(student_emb=out["image_emb"], teacher_emb=ref["image_emb"])["cosine"]
    else:
        res["cosine_unavailable"] = (f"embedding dims differ ({out['image_emb'].shape[1]} vs "
                                     f"{ref['image_emb'].shape[1]})")
    if "text_emb" in ref and "text_emb" in out and ref["text_emb"].shape == out["text_emb"].shape:
        res["text_cosine"] = M.agreement(student_emb=out["text_emb"], teacher_emb=ref["text_emb"])["cosine"]
    return res


# --------------------------------------------------------------------------------------------------------- report

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:] or "model"


def fmt_number(v, *, pct: bool = False, digits: int = 2, suffix: str = "") -> str:
    """A table cell: "–" for missing, percentages from fractions, thousands separators for ints, and scientific
    notation for small non-zero floats (a KL of 0.002 should not print as 0.00)."""
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.{digits}f}{suffix}"
    if isinstance(v, int):
        return f"{v:,}{suffix}"
    return (f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}") + suffix


def _fmt(v, pct: bool = False, digits: int = 2) -> str:
    return fmt_number(v, pct=pct, digits=digits)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` is one character per column (l, r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _model_name(m: dict) -> str:
    return f"**{m['label']}** (teacher)" if m["is_teacher"] else m["label"]


def render_markdown(report: dict) -> str:
    """report.md from report.json's dict."""
    task, models = report["task"], report["models"]
    d = report["data"]
    out = [f"# kdcache eval: {task}", ""]
    skipped = ", ".join(f"{k} {v}" for k, v in {**d["rejected"], **d["skipped"]}.items()) or "none"
    out.append(f"- data: {', '.join(d['patterns'])} — {d['shards']} shard(s), **{d['samples']} samples** "
               f"(rejected/skipped: {skipped}{'; --limit ' + str(d['limit']) if d['limit'] else ''})")
    if task == "zeroshot":
        out.append(f"- classes: {len(report['classes']['names'])} ({report['classes']['source']}); templates: "
                   f"{len(report['templates']['templates'])} ({report['templates']['source']})")
    else:
        out.append(f"- captions: {report['retrieval']['unique_captions']} distinct texts among {d['samples']}")
    t = report.get("teacher")
    out.append(f"- teacher: {t if t else 'none among the models'}")
    out.append(f"- kdcache {report['kdcache_version']}, {report['created']}")
    out.append("")

    if task == "zeroshot":
        out += ["## Accuracy (%)", ""]
        rows = [[_model_name(m), _fmt(m["metrics"]["top1"], True), _fmt(m["metrics"]["top5"], True),
                 _fmt(m["metrics"]["macro_precision"], True), _fmt(m["metrics"]["macro_recall"], True),
                 _fmt(m["metrics"]["macro_f1"], True), _fmt(m["metrics"]["weighted_f1"], True)] for m in models]
        out.append(md_table(["model", "top-1", "top-5", "macro P", "macro R", "macro F1", "weighted F1"], rows))
    else:
        out += ["## Retrieval recall (%)", ""]
        keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in RETRIEVAL_KS]
        rows = [[_model_name(m), *(_fmt(m["metrics"][k], True) for k in keys)] for m in models]
        out.append(md_table(["model", *(f"{'I→T' if k.startswith('i2t') else 'T→I'} R@{k.split('_r')[1]}"
                                        for k in keys)], rows))
    out.append("")

    a = report["agreement"]
    out += ["## Agreement with the teacher", ""]
    if not a["available"]:
        out.append(f"Unavailable: {a['reason']}")
    else:
        out.append(f"Reference: {a['reference']}." + (f" {a['reason']}" if a.get("reason") else ""))
        out.append("")
        rows = []
        for m in models:
            g = m.get("agreement")
            if g is None:
                continue
            row = [m["label"], _fmt(g.get("top1_agreement"), True), _fmt(g.get("cosine"), digits=4),
                   _fmt(g.get("kl"), digits=4)]
            if task == "retrieval":
                row.append(_fmt(g.get("text_cosine"), digits=4))
            rows.append(row)
        header = ["model", "top-1 agreement (%)", "image cosine", "KL(teacher‖model)"]
        if task == "retrieval":
            header.append("text cosine")
        out.append(md_table(header, rows) if rows else "No model besides the reference.")
    out.append("")

    tm = report["timing"]
    out += ["## Efficiency", "",
            f"Device: {tm['device']}; " + ("timed side by side in one process, interleaved" if tm["side_by_side"]
                                           else "one model timed") +
            f", {tm['warmup']} warm-up + {tm['repeats']} timed calls per model and batch size, medians.", ""]
    b = tm["batch"]
    rows = [[_model_name(m), _fmt(m["image_params"]), _fmt(m["total_params"]), _fmt(m["size_mb"]),
             _fmt(m["latency"]["ms_per_image_b1"]), _fmt(m["latency"]["images_per_s"], digits=1)] for m in models]
    out.append(md_table(["model", "image params", "total params", "MB", "ms/img (batch 1)", f"img/s (batch {b})"],
                        rows))
    notes = [f"{m['label']}: {m['size_source']}" for m in models if m["size_source"] != "checkpoint file on disk"]
    if notes:
        out += ["", *(f"- {n}" for n in notes)]
    out.append("")

    if task == "zeroshot":
        names = report["classes"]["names"]
        out += ["## Per class (%)", ""]
        for m in models:
            pc = m["metrics"]["per_class"]
            out += [f"### {m['label']}", ""]
            rows = [[n, str(pc["support"][i]), _fmt(pc["precision"][i], True), _fmt(pc["recall"][i], True),
                     _fmt(pc["f1"][i], True)] for i, n in enumerate(names)]
            out += [md_table(["class", "support", "precision", "recall", "F1"], rows), ""]
        out += ["## Confusion matrices (rows: true class, columns: predicted)", ""]
        for m in models:
            cm = m["metrics"]["confusion"]
            out += [f"### {m['label']}", ""]
            if isinstance(cm, list):
                out += [md_table(["true \\ pred", *names], [[n, *map(str, r)] for n, r in zip(names, cm, strict=True)]),
                        ""]
            out += [f"CSV: `{m['metrics']['confusion_csv']}`", ""]
    if report["notes"]:
        out += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    out += ["## Definitions", "", *(f"- {c}" for c in CONVENTIONS), ""]
    return "\n".join(out)


def _write_confusion(path: Path, cm: np.ndarray, names: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true\\pred", *names])
        for n, row in zip(names, cm.tolist(), strict=True):
            w.writerow([n, *row])


def _data_fingerprint(col: _Collected) -> str:
    h = hashlib.sha256()
    for url, key in zip(col.urls, col.keys, strict=True):
        h.update(f"{os.path.basename(url)}\t{key}\n".encode())
    return "sha256:" + h.hexdigest()[:32]


# ------------------------------------------------------------------------------------------------------------ run

def _check(cfg: EvalConfig) -> None:
    if cfg.task not in TASKS:
        raise EvalError(f"--task {cfg.task!r}: expected one of {', '.join(TASKS)}")
    if not cfg.models:
        raise EvalError("give at least one --model")
    if not cfg.data:
        raise EvalError("give --data: labelled (zeroshot) or captioned (retrieval) WebDataset shards")
    if cfg.task == "zeroshot" and not cfg.classes:
        raise EvalError("--task zeroshot needs --classes (cifar10, cifar100, imagenet, or a file, one class a line)")
    if cfg.task == "retrieval" and (cfg.classes or cfg.templates):
        raise EvalError("--classes/--templates are for --task zeroshot, not retrieval")
    for name in ("batch_size", "latency_batch", "latency_repeats"):
        if getattr(cfg, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.limit is not None and cfg.limit < 1:
        raise EvalError("--limit must be at least 1")
    resolve_device(cfg.device, cfg.precision, error=EvalError, who="evaluation")


def load_models(specs: Sequence[str], *, pretrained: str | None = None, allow_random_init: bool = False,
                device: str = "cpu", precision: str = "fp32", cache: str | None = None) -> list[EvalModel]:
    """Resolve every --model, with unique labels. `pretrained` goes to the one model it applies to (a built-in
    open_clip name or a JSON config); giving it when none or several could take it is an error."""
    takers = [s for s in specs if accepts_pretrained(s)]
    if pretrained is not None and len(takers) != 1:
        found = f"{len(takers)} are: {', '.join(takers)}; evaluate them separately and compare the reports" \
            if takers else "none is"
        raise EvalError(f"--pretrained {pretrained!r} applies to exactly one --model that is a built-in open_clip name "
                        f"or a JSON config ({found})")
    labels: Counter = Counter()
    models = []
    for spec in specs:
        own = pretrained if spec in takers else None
        base = spec.rstrip("/") + (f" ({os.path.basename(own)})" if own else "")
        labels[base] += 1
        label = base if labels[base] == 1 else f"{base} #{labels[base]}"
        models.append(resolve_model(spec, label=label, pretrained=own, allow_random_init=allow_random_init,
                                    device=device, precision=precision, cache=cache))
    return models


def run(cfg: EvalConfig) -> dict:
    """Evaluate every model on the data and write REPORT_DIR/report.{json,md}; returns the report dict."""
    _check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from kdcache.vocab import load_classes, load_templates

    classes = templates = None
    try:
        if cfg.task == "zeroshot":
            classes, classes_src = load_classes(cfg.classes)
            templates, templates_src = load_templates(cfg.templates, classes_spec=cfg.classes)
        urls = expand_urls(cfg.data)
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(str(e)) from None
    if not urls:
        raise EvalError(f"--data {' '.join(cfg.data)} names no shards")

    models = load_models(cfg.models, pretrained=cfg.pretrained, allow_random_init=cfg.allow_random_init,
                         device=cfg.device, precision=cfg.precision, cache=cfg.cache)
    cache_teacher = None
    if cfg.cache:
        from kdcache.cache.reader import CacheError, open_cache

        try:
            cache_teacher = open_cache(cfg.cache).attrs.get("teacher")
        except CacheError as e:
            raise EvalError(f"--cache: {e}") from None
    teacher, notes = pick_teacher(models, cache_teacher)

    # Everything that can fail on a model fails here, before the data pass.
    heads: dict[str, torch.Tensor] = {}
    if cfg.task == "zeroshot":
        for m in models:
            heads[m.label] = m.zero_shot_head(classes, templates)
            cached = m.provenance.get("cache_templates")
            if cached is not None and list(cached) != list(templates):
                notes.append(f"{m.label}: a run's class head is its cache's, built with the cache's "
                             f"{len(cached)} template(s), not the {len(templates)} --templates.")
    else:
        for m in models:
            if not m.can_embed_text:
                raise ModelError(f"--model {m.label}: --task retrieval needs a text tower; a training run has only "
                                 "its trained tower: `kdcache export` it (with the teacher's other tower) and "
                                 "evaluate the exported directory")

    t0 = time.perf_counter()
    col = collect(models, urls, task=cfg.task, num_classes=len(classes) if classes else None,
                  batch_size=cfg.batch_size, limit=cfg.limit, progress=cfg.progress)
    n = len(col.keys)
    if n == 0:
        need = "labels (.cls)" if cfg.task == "zeroshot" else "captions (.txt or .json caption)"
        raise EvalError(f"no usable samples in --data for --task {cfg.task}: it needs {need}; "
                        f"rejected {dict(col.rejected)}, skipped {dict(col.skipped)}")
    data_s = time.perf_counter() - t0

    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = torch.tensor(col.labels)
    outputs: dict[str, dict] = {}
    per_model: dict[str, dict] = {}
    for i, m in enumerate(models):
        img = torch.cat(col.image_emb[m.label])
        o: dict = {"image_emb": img}
        if cfg.task == "zeroshot":
            logits = M.class_logits(img, heads[m.label], logit_scale=m.logit_scale)
            o["logits"] = logits
            rep = M.classification_report(logits.argmax(1), labels, num_classes=len(classes))
            cm = rep.pop("confusion")
            csv_name = f"confusion-{i}-{_slug(m.label)}.csv"
            _write_confusion(out_dir / csv_name, cm, classes)
            metrics = {"top1": M.topk_accuracy(logits, labels, k=1),
                       "top5": M.topk_accuracy(logits, labels, k=5) if len(classes) > 5 else None,
                       **rep, "confusion": cm.tolist() if len(classes) <= CONFUSION_INLINE else None,
                       "confusion_csv": csv_name}
        else:
            txt = torch.cat(col.text_emb[m.label])
            o["text_emb"] = txt
            metrics = M.retrieval_recall(img, txt, col.captions, ks=RETRIEVAL_KS)
        outputs[m.label] = o
        per_model[m.label] = metrics

    # Agreement: against the teacher model when there is one (same samples, its own preprocessing), else against the
    # cache's teacher outputs when the eval samples are the cache's.
    agreement = {"available": False, "reference": None, "reason": ""}
    ref = None
    if teacher is not None:
        ref = outputs[teacher.label]
        agreement.update(available=True, reference=f"model {teacher.label}")
        if cfg.cache:
            notes.append("--cache is not used for agreement: a teacher is among the models, so it is measured "
                         "against the teacher run on the eval data.")
    elif cfg.cache:
        ref, why = cache_reference(cfg.cache, urls=col.urls, positions=col.positions, keys=col.keys, task=cfg.task,
                                   classes=classes, digests=col.digests)
        if ref is None:
            agreement["reason"] = why
        else:
            agreement.update(available=True, reason=why,
                             reference=f"cached teacher outputs in {cfg.cache} (view 0; shards matched by sha256)")
    else:
        agreement["reason"] = "no teacher among --model and no --cache."
    per_agreement = {}
    if ref is not None:
        per_agreement = {m.label: _agreement_for(m, ref, outputs) for m in models if not m.is_teacher}

    timings = lat.measure(models, batch=cfg.latency_batch, repeats=cfg.latency_repeats, warmup=cfg.latency_warmup)

    report = {
        "kdcache_version": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S %z"), "task": cfg.task,
        "config": asdict(cfg),
        "data": {"patterns": list(cfg.data), "shards": len(urls), "samples": n, "limit": cfg.limit,
                 "rejected": dict(col.rejected), "skipped": dict(col.skipped), "shard_errors": col.shard_errors,
                 "fingerprint": _data_fingerprint(col), "seconds": data_s},
        "teacher": teacher.label if teacher else None,
        "agreement": agreement, "timing": timings.conditions, "notes": notes,
        "models": [{**m.describe(), "metrics": per_model[m.label], "latency": timings.per_model[m.label],
                    "agreement": per_agreement.get(m.label)} for m in models],
    }
    if cfg.task == "zeroshot":
        report["classes"] = {"names": classes, "source": classes_src}
        report["templates"] = {"templates": templates, "source": templates_src}
    else:
        report["retrieval"] = {"unique_captions": len(set(col.captions)), "ks": list(RETRIEVAL_KS),
                               "hit_rule": "caption text equality"}
    # Teacher first, then the models in the order given.
    report["models"].sort(key=lambda r: not r["is_teacher"])
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, default=_json_default), encoding="utf-8")
    (out_dir / REPORT_MD).write_text(render_markdown(report), encoding="utf-8")
    return report


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
