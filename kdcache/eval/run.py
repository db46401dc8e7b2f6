"""`kdcache eval`: teacher and students side by side on the same data — accuracy, agreement, size and speed.

    kdcache eval --model ViT-B-32 --pretrained openai --model exported/ --model runs/img \\
        --data 'shards/{00000..00009}.tar' --task zeroshot --classes cifar10 --out reports/cifar10
    kdcache eval --model local-dir:/tmp/qs/exported --model /tmp/qs/runs/image --data '/tmp/qs/data/*.tar' \\
        --task zeroshot --classes /tmp/qs/data/classes.txt --cache /tmp/qs/cache.zarr --out /tmp/qs/report  # tiny CPU

Every model sees the same samples, each through its own eval preprocessing. The report directory gets
`report.json` (everything, machine-readable), `report.md` (the tables), and per model for zeroshot a
`confusion-*.csv`, a confusion-matrix heatmap `confusion-*.png` and per-class precision/recall/F1 bars
`per-class-*.png` (`kdcache.eval.plots`), which report.md links.

This module is the orchestration: load the models, pick the teacher, one data pass (`kdcache.eval.data`), agreement
with the teacher or the cache, timing (`kdcache.eval.latency`), the report files. What differs between --task values
is the task object's (`kdcache.eval.tasks`); report.md is rendered by `kdcache.eval.report`.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from kdcache import __version__, location
from kdcache.eval import latency as lat
from kdcache.eval import metrics as M
from kdcache.eval.config import EvalConfig, EvalError
from kdcache.eval.data import collect, data_fingerprint
from kdcache.eval.models import EvalModel, accepts_pretrained, resolve_model
from kdcache.eval.report import REPORT_JSON, REPORT_MD, render_markdown
from kdcache.eval.tasks import TASKS, Task, get_task
from kdcache.precision import resolve_device
from kdcache.shards import expand_urls, file_sha256
from kdcache.teacher import same_teacher

# The API of `kdcache eval`: the CLI, the quickstart and the experiments import these from here, wherever they live.
__all__ = ["REPORT_JSON", "REPORT_MD", "EvalConfig", "EvalError", "cache_reference", "collect", "load_models",
           "pick_teacher", "run"]


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
                    task: Task, digests: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """The cached teacher outputs (view 0: the teacher's eval transform) for exactly these samples, or (None, why
    not). A sample is found when its shard's bytes are a cache shard's (same sha256, whatever the path) and the row at
    its position holds its __key__: keys alone would match other shards that reuse the same names.
    Returns {"image_emb", "identity"} plus the task's part ("logits" of zero-shot, "text_emb" of retrieval) and a
    note on what is missing."""
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
    names = ["key", "valid", "emb", *task.cache_arrays]
    rows = {u: cache.read(units[u], names) for u in sorted(set(unit_of.values()))}
    emb: list[np.ndarray] = []
    arrays: dict[str, list[np.ndarray]] = {n: [] for n in task.cache_arrays}
    for url, pos, key in zip(urls, positions, keys, strict=True):
        r = rows[unit_of[url]]
        if pos >= len(r["key"]) or not r["valid"][pos] or r["key"][pos] != key:
            return None, f"sample {key!r} of {url} is not a valid row of cache {cache_path} (position {pos})"
        emb.append(r["emb"][pos, 0])
        for n in task.cache_arrays:
            arrays[n].append(r[n][pos])
    ref = {"identity": cache.attrs.get("teacher"), "image_emb": torch.from_numpy(np.stack(emb).astype(np.float32))}
    return ref, task.add_cache_reference(ref, cache, arrays)


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


# ------------------------------------------------------------------------------------------------------------ run

def _check(cfg: EvalConfig, task: Task) -> None:
    if not cfg.models:
        raise EvalError("give at least one --model")
    if not cfg.data:
        kinds = " or ".join(f"{t.data_kind} ({name})" for name, t in TASKS.items())
        raise EvalError(f"give --data: {kinds} WebDataset shards")
    task.check(cfg)
    for name in ("batch_size", "latency_batch", "latency_repeats"):
        if getattr(cfg, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.limit is not None and cfg.limit < 1:
        raise EvalError("--limit must be at least 1")
    resolve_device(cfg.device, cfg.precision, error=EvalError, who="evaluation")
    try:  # the report and its plots are written with plain file I/O: a local directory, refused before any work
        out_is_url = location.is_url(location.check_location(cfg.out, "--out"))
    except location.LocationError as e:
        raise EvalError(str(e)) from None
    if out_is_url:
        raise EvalError(f"--out {cfg.out}: a report directory must be a local path (only caches may live on an object "
                        "store); write the report locally and copy it up")


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
    task = get_task(cfg.task, error=EvalError)
    _check(cfg, task)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        task.load(cfg)
        vocab = task.vocabulary()
        subset = cfg.subset.resolve(vocab, where="--classes" if vocab is not None else f"--task {task.name}")
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

    if subset.labels:
        task.restrict_labels(subset.label_ids)
    # Everything that can fail on a model fails here, before the data pass.
    notes += task.prepare(models)

    t0 = time.perf_counter()
    col = collect(models, urls, task=task, batch_size=cfg.batch_size, limit=cfg.limit, progress=cfg.progress,
                  subset=subset)
    n = len(col.keys)
    if n == 0 and subset:
        raise EvalError(f"the filter {subset.describe(vocab)} keeps no usable samples of --data (it left out "
                        f"{col.filtered}; rejected {dict(col.rejected)}, skipped {dict(col.skipped)})")
    if n == 0:
        raise EvalError(f"no usable samples in --data for --task {task.name}: it needs {task.needs}; "
                        f"rejected {dict(col.rejected)}, skipped {dict(col.skipped)}")
    data_s = time.perf_counter() - t0

    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, dict] = {}
    per_model: dict[str, dict] = {}
    for i, m in enumerate(models):
        outputs[m.label], per_model[m.label] = task.evaluate(m, col, index=i, out_dir=out_dir)

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
        ref, why = cache_reference(cfg.cache, urls=col.urls, positions=col.positions, keys=col.keys, task=task,
                                   digests=col.digests)
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
                 "fingerprint": data_fingerprint(col), "seconds": data_s,
                 **({"subset": {"filter": subset.to_json(), "described": subset.describe(vocab),
                                "filtered_out": col.filtered}} if subset else {})},
        "teacher": teacher.label if teacher else None,
        "agreement": agreement, "timing": timings.conditions, "notes": notes,
        "models": [{**m.describe(), "metrics": per_model[m.label], "latency": timings.per_model[m.label],
                    "agreement": per_agreement.get(m.label)} for m in models],
        **task.report_fields(col),
    }
    # Teacher first, then the models in the order given.
    report["models"].sort(key=lambda r: not r["is_teacher"])
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, default=_json_default), encoding="utf-8")
    (out_dir / REPORT_MD).write_text(render_markdown(report, task), encoding="utf-8")
    return report


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
