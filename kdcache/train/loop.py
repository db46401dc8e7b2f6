"""`kdcache train`: distil a student tower from the cache alone — the teacher is never built or imported.

    kdcache train --cache cache.zarr --tower image --student kdc-tiny-image --out runs/img --max-steps 50
    kdcache train --cache cifar10.zarr --tower image --student kdc-seed-image-vit --loss seed001 --epochs 5 --out runs/s

One readable loop: AdamW, linear warmup + cosine decay, gradient clipping and accumulation, autocast only on CUDA.
Data order is a pure function of (seed, epoch, step), so a run killed at any moment and resumed with `--resume` ends
with the same weights as an uninterrupted one. The run directory holds the resolved config, the cache fingerprint,
metrics (JSONL + CSV; also sent to TensorBoard/W&B with --report-to, see tracking.py), atomic checkpoints, and
`done.json`, written last.

The run directory's layout and its readers and writers live in kdcache/train/rundir.py.

`run(cfg, targets=...)` is the one door for online distillation (kdcache/online): a `Targets` object replaces the
cached teacher outputs of every batch with live ones. This module only defines that interface; it never builds a
teacher.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from kdcache import __version__, location
from kdcache.cache import schema
from kdcache.cache.reader import Cache
from kdcache.precision import autocast, resolve_device
from kdcache.train import cachepin, ddp, replay, rundir, tracking
from kdcache.train.config import TrainConfig, TrainError, TrainResult, identity
from kdcache.train.data import count_rows, subset_rows
from kdcache.train.dataspec import DataSpec
from kdcache.train.finite import StepGuard, check_finite_val, check_finite_weights
from kdcache.train.hinting import StudentHints
from kdcache.train.loader import EpochLoader
from kdcache.train.losses import LossInputs, WeightedLoss, default_losses
from kdcache.train.students import Student, build_student

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class LiveTeacher:
    """What live targets tell the loop before step 1; they stand in for the cache's teacher attributes."""

    embed_dim: int                        # the student's projection target
    logit_scale: float
    head: torch.Tensor | None             # [C, D] zero-shot head on the training device, None when no logits
    loader: dict = field(default_factory=dict)  # extra make_loader keywords (teacher_preprocess, return_texts)
    identity: dict = field(default_factory=dict)  # the teacher the student learns from (config.json "teacher")
    hint_dims: dict = field(default_factory=dict)  # width of each live teacher hint (the `hint` loss), by module


class Targets(Protocol):
    """Teacher outputs computed during training instead of read from the cache (implemented in kdcache/online)."""

    def prepare(self, cache: Cache, *, tower: str, needs: tuple[str, ...], device: torch.device,
                hints: tuple[str, ...] = (), hint_pool: str = "cls") -> LiveTeacher:
        """Check that these targets can serve `tower` and the losses' `needs` (raise TrainError naming what is
        missing), and say what the loop and the loader need; with `hints`, batches also get "hint:NAME"."""

    def __call__(self, batch: dict) -> dict:
        """The batch with "teacher" (and "other"/"has_other" where a loss needs pairs, else removed) replaced by live
        teacher outputs on the training device; must be usable in autograd (no inference-mode tensors)."""

    def describe(self) -> dict:
        """JSON identity of the live teacher: recorded in config.json and part of the --resume identity."""


# -------------------------------------------------------------------------------------------------------- the loop

def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def check_requirements(cache, tower: str, loss: WeightedLoss, *, online: bool = False) -> None:
    """Refuse, before step 1, a tower or loss the cache has no data for — naming the loss and what is missing (online,
    hints come from the live teacher)."""
    caps = set(cache.capabilities)
    if tower == "image" and schema.CAP_IMAGES not in caps:
        raise TrainError(f"--tower image needs image rows; the cache has capabilities {sorted(caps)}")
    if tower == "text" and not caps & {schema.CAP_CAPTIONS, schema.CAP_PAIRED}:
        raise TrainError(f"--tower text needs captions (a caption corpus or paired captions); the cache has "
                         f"{sorted(caps)}")
    need_cap = {"logits": schema.CAP_LOGITS, "labels": schema.CAP_LABELS, "pairs": schema.CAP_PAIRED,
                "hints": schema.CAP_HINTS}
    for name in loss.names:
        for need in loss.needs_of(name):
            if need == "hints" and online:
                continue
            if need_cap[need] not in caps:
                raise TrainError(f"loss '{name}' needs {need} but the cache lacks capability '{need_cap[need]}' "
                                 f"(it has {sorted(caps)}); rebuild with "
                                 + {"logits": "--classes", "labels": "labelled shards (.cls)",
                                    "pairs": "captioned shards (.txt/.json)", "hints": "--hints MODULE"}[need])
    if "labels" in loss.needs and schema.CAP_LOGITS in caps:
        check_label_range(cache)


def check_label_range(cache: Cache) -> None:
    """Labels index the cached class vocabulary: one outside it would stop cross-entropy mid-run, so it is refused
    before step 1 (a build with --classes rejects such samples; an older cache may hold them)."""
    n = len(cache.vocab()[0])
    for unit in cache.units(schema.IMAGES):
        if cache.status(unit) is None:
            continue  # a unit not written (allowed incomplete caches) has no rows to train on
        a = cache.read(unit, ["key", "label", "valid"])
        bad = (a["label"] >= n) & a["valid"].astype(bool)
        if bad.any():
            row = int(bad.argmax())
            raise TrainError(f"{unit.name} ({unit.source}) row {row} (key {str(a['key'][row])!r}) "
                             f"has label {int(a['label'][row])}, but the cache's vocabulary has {n} classes "
                             f"(0..{n - 1}); {int(bad.sum())} such row(s) in this shard. Rebuild the cache (the build "
                             "rejects them as label_out_of_range) or train without a labels loss")


def _to_inputs(batch: dict, s_emb: torch.Tensor, head, scale: float, temperature: float, device,
               hints: StudentHints | None = None, gather=None) -> LossInputs:
    other = batch.get("other")
    return LossInputs(
        hints=None if hints is None else hints.pairs(batch, device), gather=gather,
        student=s_emb.float(), teacher=batch["teacher"].to(device, non_blocking=True), head=head,
        logit_scale=scale, temperature=temperature, labels=batch["labels"].to(device, non_blocking=True),
        other=None if other is None else other.to(device, non_blocking=True),
        has_other=None if other is None else batch["has_other"].to(device, non_blocking=True),
    )


def _student_input(student: Student, batch: dict, device) -> torch.Tensor:
    if student.tower == "image":
        return student.normalize_pixels(batch["pixels"].to(device, non_blocking=True))
    return batch["tokens"].to(device, non_blocking=True)


@torch.no_grad()
def validate(student: Student, loss_fn: WeightedLoss, loader, *, head, scale: float, temperature: float, device,
             precision: str, targets: Targets | None = None, hints: StudentHints | None = None,
             ranks: ddp.Ranks | None = None) -> dict:
    """Mean cosine to the teacher, top-1 agreement with the teacher's class prediction, and the losses. Under DDP each
    rank scores its slices of the validation batches and the sums are added across ranks: every rank returns the
    one-process result at the same --batch-size."""
    student.eval()
    n, cos_sum, agree, sums = 0, 0.0, 0, {}
    for batch in loader:
        if targets is not None:
            batch = targets(batch)
        with autocast(device, precision):
            s = student(_student_input(student, batch, device))
        x = _to_inputs(batch, s, head, scale, temperature, device, hints)
        b = x.student.shape[0]
        cos_sum += torch.nn.functional.cosine_similarity(x.student, x.teacher, dim=-1).sum().item()
        if head is not None:
            agree += ((x.student @ head.T).argmax(-1) == (x.teacher @ head.T).argmax(-1)).sum().item()
        for k, v in loss_fn(x).items():
            sums[k] = sums.get(k, 0.0) + v.item() * b
        n += b
    student.train()
    if ranks is not None and ranks.world > 1:
        keys = [f"{name}_loss" for name in loss_fn.names] + ["loss"]  # a rank with no batch has no sums
        n, cos_sum, agree, *total = ranks.sum([n, cos_sum, agree, *(sums.get(k, 0.0) for k in keys)], device)
        n, agree, sums = round(n), round(agree), dict(zip(keys, total, strict=True))
    if n == 0:
        return {"val_rows": 0}
    out = {"val_rows": n, "val_cosine": cos_sum / n}
    if head is not None:
        out["val_top1_agreement"] = agree / n
    out.update({f"val_{k}": v / n for k, v in sums.items()})
    return out


def run(cfg: TrainConfig, *, targets: Targets | None = None) -> TrainResult:
    """Train (or resume) a student as cfg says. With `targets` (kdcache/online), the teacher outputs of every batch
    come from them instead of the cache; everything else (student, losses, views, order, schedule) is the same. Under
    torchrun, this process is one rank of a DDP run (kdcache/train/ddp.py); otherwise it is the whole run."""
    ranks = ddp.setup(cfg.device)
    try:
        with rundir.holding(cfg.out, main=ranks.main):  # the run directory's writer lock (kdcache.locks)
            return _run(cfg, targets=targets, ranks=ranks)
    finally:
        ranks.close()


def _run(cfg: TrainConfig, *, targets: Targets | None, ranks: ddp.Ranks) -> TrainResult:
    if cfg.tower not in ("image", "text"):
        raise TrainError("--tower must be image or text")
    if cfg.epochs is not None and cfg.max_steps is not None:
        raise TrainError("give --epochs or --max-steps, not both")
    # Checkpoints are renamed into place and metrics appended: a run directory needs a local filesystem.
    if location.is_url(location.check_location(cfg.out, "--out")):
        raise TrainError(f"--out {cfg.out}: a run directory must be a local path (only caches may live on an object "
                         "store); train into a local directory and copy it up when it is done")
    tracking.check_installed(cfg.report_to)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, precision = resolve_device(ranks.device(cfg.device), cfg.precision, error=TrainError, who="the student")
    cache = cachepin.open_for_run(cfg)  # pinned: the units it has now (on --resume, those the run started with)
    watch = cachepin.CacheWatch.start(cfg)  # a build starting to extend the cache stops the run at a checkpoint
    run_dir = Path(cfg.out)

    weights = dict(cfg.losses) or default_losses(cfg.tower, set(cache.capabilities),
                                                 schema.CAP_LABELS in cache.capabilities)
    loss_fn = WeightedLoss(weights, cfg.tower)
    check_requirements(cache, cfg.tower, loss_fn, online=targets is not None)
    if ("hint" in loss_fn.names) != bool(cfg.hint_map):
        raise TrainError("--loss hint=W and --hint-map STUDENT_MODULE=TEACHER_HINT go together (the map says which "
                         "student module learns which teacher hint; `kdcache layers` lists both sides)")
    cached_hints = cache.attrs["build"].get("hints") or {}
    hint_pool = cached_hints.get("pool", "cls")
    teacher_hints = tuple(dict.fromkeys(t for _, t in cfg.hint_map))
    live = None if targets is None else targets.prepare(cache, tower=cfg.tower, needs=loss_fn.needs, device=device,
                                                        hints=teacher_hints, hint_pool=hint_pool)

    classes = cache.vocab()[0] if schema.CAP_LOGITS in cache.capabilities else None  # --labels names -> ids
    subset = cfg.subset.resolve(classes, where=f"the vocabulary of {cfg.cache}")
    resolved = {**identity(cfg), "losses": weights, "loss_formula": loss_fn.formula, "precision": precision,
                "threads": torch.get_num_threads(), **({"subset": subset.to_json()} if subset else {})}
    if targets is not None:
        resolved.update(mode="online", online_teacher=targets.describe())
    if ranks.world > 1:  # part of the --resume identity (a one-process run records none: 1)
        resolved["world_size"] = ranks.world
    decoder = replay.resolve(cfg.decode, cache_decode=cache.attrs["build"].get("decode", "cpu"), tower=cfg.tower,
                             device=device, decode_device=cfg.decode_device)
    if decoder == "gpu":  # part of the --resume identity (a run replaying with PIL records none)
        resolved["replay_decode"] = "gpu"
    fingerprint = cache.fingerprint()
    ckpt = None
    if rundir.check_resume(run_dir, resume=cfg.resume, fingerprint=fingerprint, resolved=resolved):
        ckpt = rundir.latest_checkpoint(run_dir)
    # Every rank has read the run directory before rank 0 writes to it, and all resume from the same checkpoint.
    ranks.check_same(None if ckpt is None else ckpt.name, what="the checkpoint to resume from",
                     fix="--out must be a directory every rank sees (a shared filesystem across nodes)")
    run_dir.mkdir(parents=True, exist_ok=True)

    embed_dim = cache.embed_dim if live is None else live.embed_dim
    student = build_student(cfg.student, tower=cfg.tower, teacher_dim=embed_dim,
                            pretrained=cfg.student_pretrained, seed=cfg.seed).to(device)
    hints = None
    if cfg.hint_map:  # adapters join the student before the optimizer and a checkpoint restore see its parameters
        dims = (live.hint_dims if live is not None else
                {x["name"]: int(x["dim"]) for x in cached_hints.get("layers", [])})
        hints = StudentHints(student, cfg.hint_map, teacher_dims=dims, pool=hint_pool, adapter=cfg.hint_adapter,
                             seed=cfg.seed)
        student.to(device)
    head = None
    if live is not None:
        head, scale = live.head, live.logit_scale
    else:
        if schema.CAP_LOGITS in cache.capabilities:
            head = torch.from_numpy(cache.vocab()[2]).to(device)
        scale = cache.logit_scale

    model = ranks.wrap(student, device)  # what the training step calls: DDP averages gradients across ranks

    spec = DataSpec(cache=cfg.cache, tower=cfg.tower, batch_size=cfg.batch_size, seed=cfg.seed, buffer=cfg.buffer,
                    val_fraction=cfg.val_fraction, images=cfg.images, allow_incomplete=cfg.allow_incomplete,
                    views_per_sample=cfg.views_per_sample, hints=teacher_hints if live is None else (), subset=subset,
                    pin=cache.pin)
    kept = subset_rows(spec) if subset else None  # a filter that keeps no row fails here, naming it
    rows = count_rows(spec, "train")
    micro_per_epoch = rows // (cfg.batch_size * ranks.world)  # a micro-step takes a global batch
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    if steps_per_epoch == 0:
        raise TrainError(f"the training split has {rows} rows: fewer than one step of --batch-size "
                         f"{cfg.batch_size} x {ranks.world} rank(s) x accumulation {cfg.accum_steps}")
    epochs = cfg.epochs if cfg.epochs is not None else (None if cfg.max_steps else 1)
    total = cfg.max_steps if cfg.max_steps else epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)

    step, epoch, epoch_step = 0, 0, 0
    ckpt_meta = json.loads((ckpt / "meta.json").read_text()) if ckpt is not None else None
    if ckpt_meta is not None:
        step, epoch, epoch_step = ckpt_meta["step"], ckpt_meta["epoch"], ckpt_meta["epoch_step"]
    # The data workers fork here, once for the whole run, before the optimizer state exists (see EpochLoader).
    loader_kw = {"workers": cfg.workers, "student_preprocess": student.preprocess, "tokenizer": student.tokenizer,
                 "rank": ranks.rank, "ranks": ranks.world, **(live.loader if live is not None else {})}
    if decoder == "gpu":
        loader_kw["device_decode"] = True
    data = EpochLoader(spec, **loader_kw)
    # A --decode gpu cache on a CUDA student: views decoded and rendered on the device, as the build made them.
    device_replay = replay.DeviceReplay.for_rows(data.stream.rows, cfg.decode_device or device) \
        if decoder == "gpu" else None

    def start(split: str, at_epoch: int, at_batch: int = 0):
        return replay.replayed(data.start(split, at_epoch, at_batch), device_replay)
    with contextlib.closing(data):
        passes = start("train", epoch, epoch_step * cfg.accum_steps) if step < total else iter(())
        params = student.trainable_parameters()
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total))
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")
        guard = StepGuard(scaler_enabled=scaler.is_enabled(), max_skipped=cfg.max_skipped_steps,  # NaN never passes
                          reduce=ranks.all_sum if ranks.world > 1 else None)

        if ckpt is not None:
            student.load_state_dict(load_file(str(ckpt / rundir.WEIGHTS), device=str(device)))
            rundir.restore_train_state(optimizer, scheduler, load_file(str(ckpt / "train_state.safetensors")),
                                 ckpt_meta["train_state"])
            if ranks.main:
                log.info("resuming from %s (step %d, epoch %d)", ckpt.name, step, epoch)
        elif cfg.resume:
            log.info("--resume: no checkpoint in %s yet, starting from step 0", run_dir)

        # before config.json: a tracker that cannot start (W&B not logged in) leaves no run to --resume. Under DDP only
        # rank 0 writes the run directory (config, metrics, trackers, checkpoints, final weights, done.json).
        trackers = tracking.Trackers.open(run_dir, cfg.report_to if ranks.main else (),
                                          resume_step=step if ckpt is not None else None, config=resolved)
        if ranks.main:
            rundir.write_config(run_dir, {
                "config": resolved, "cache": cfg.cache, "cache_fingerprint": fingerprint,
                "cache_pin": cache.pin.to_json(),  # the units it trains on (kdcache.train.cachepin)
                "student_config": student.config, "student_preprocess": student.preprocess, "embed_dim": embed_dim,
                "logit_scale": scale,
                "mode": "offline" if live is None else "online",
                # the teacher the student learns from (export checks it); an online run also names the cache's
                **({"teacher": cache.attrs["teacher"]} if live is None else
                   {"teacher": live.identity, "cache_teacher": cache.attrs["teacher"]}),
                "tower": cfg.tower, "kdcache_version": __version__, "steps_per_epoch": steps_per_epoch,
                "total_steps": total,
                **({"subset": {"filter": subset.to_json(), "described": subset.describe(classes), "rows": kept}}
                   if subset else {}),
            })
        metrics = rundir.Metrics(run_dir, step if ckpt is not None else None) if ranks.main else rundir.NoMetrics()
        if ranks.main and subset:
            print(f"subset: {subset.describe(classes)} keeps {kept['train']} training, {kept['val']} validation rows")
        if ranks.main:
            print(f"loss: {loss_fn.formula}  (temperature {cfg.temperature}); {rows} training rows, {steps_per_epoch} "
                  f"steps/epoch, {total} steps" + (f"; DDP: {ranks.world} ranks x --batch-size {cfg.batch_size} = "
                                                   f"global batch {ranks.world * cfg.batch_size}"
                                                   if ranks.world > 1 else ""))

        meta = {"cache_fingerprint": fingerprint, "tower": cfg.tower}

        def checkpoint() -> None:  # the position it records is the loop's at the time of the call
            check_finite_weights(student, step=step, what=f"checkpoint step {step}")  # every rank: same weights
            if ranks.main:
                rundir.save_checkpoint(run_dir, student=student, optimizer=optimizer, scheduler=scheduler, step=step,
                                       epoch=epoch, epoch_step=epoch_step, meta=meta)
            if step < total:  # stop here, checkpoint written, if a build started writing the cache
                watch.after_checkpoint(step=step, ranks=ranks, device=device)
        final_val: dict = {}
        student.train()
        bar = tqdm(total=total, initial=step, desc=f"train {cfg.tower}", unit="step",
                   disable=not (cfg.progress and ranks.main), dynamic_ncols=True)
        try:
            while step < total:
                t0, seen = time.perf_counter(), 0
                micro = 0
                for batch in passes:
                    if targets is not None:
                        batch = targets(batch)
                    x_in = _student_input(student, batch, device)
                    # DDP: gradients are averaged across ranks on the last micro-batch of an accumulation only
                    with ranks.no_sync(model, (micro + 1) % cfg.accum_steps != 0):
                        with autocast(device, precision):
                            s = model(x_in)
                        terms = loss_fn(_to_inputs(batch, s, head, scale, cfg.temperature, device, hints,
                                                   gather=ranks.gather if ranks.world > 1 else None))
                        scaler.scale(terms["loss"] / cfg.accum_steps).backward()
                    guard.micro(terms)
                    micro += 1
                    seen += s.shape[0]
                    if micro % cfg.accum_steps:
                        continue
                    scaler.unscale_(optimizer)
                    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)  # 0: off, norm logged
                    applied = guard.step_ok(step=step + 1, grad_norm=float(gnorm))  # False: skipped (fp16 only)
                    if applied:
                        scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                    epoch_step += 1
                    rate = seen * ranks.world / max(time.perf_counter() - t0, 1e-9)  # the global rate
                    row = {"kind": "train", "step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": float(gnorm), "samples_per_s": rate,  # losses: the mean over ranks
                           **ranks.mean({k: float(v.detach()) for k, v in terms.items()}, device),
                           **({} if applied else {"skipped": 1})}  # a step the fp16 scaler did not apply
                    metrics.log(row)
                    trackers.log(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{rate:.0f}")
                    bar.update(1)
                    end_of_epoch = epoch_step >= steps_per_epoch
                    if step % cfg.checkpoint_every == 0 and not end_of_epoch and step < total:
                        checkpoint()
                    if end_of_epoch or step >= total:
                        break
                # epoch (or run) boundary: validate, checkpoint at the start of the next epoch
                final_val = validate(student, loss_fn, start("val", 0), head=head,
                                     scale=scale, temperature=cfg.temperature, device=device, precision=precision,
                                     targets=targets, hints=hints, ranks=ranks)
                val_row = {"kind": "val", "step": step, "epoch": epoch, **final_val}
                metrics.log(val_row)
                trackers.log(val_row)
                metrics.write_csv()
                check_finite_val(final_val, step=step)  # logged above; nothing follows it
                if ranks.main:
                    log.info("epoch %d step %d: %s", epoch, step, ", ".join(
                        f"{k}={v:.4f}" for k, v in final_val.items() if isinstance(v, float)))
                if epoch_step >= steps_per_epoch:
                    epoch, epoch_step = epoch + 1, 0
                checkpoint()
                if step < total:
                    passes = start("train", epoch, epoch_step * cfg.accum_steps)
        finally:
            bar.close()
            metrics.close()
            trackers.close()
            if hints is not None:
                hints.close()
        check_finite_weights(student, step=step, what="the final weights")
        if guard.total_skipped and ranks.main:
            log.warning("%d step(s) were skipped by the fp16 gradient scaler (marked skipped in metrics.jsonl)",
                        guard.total_skipped)
        if ranks.main:
            rundir.write_final(run_dir, student, {"steps": step, "epochs": epoch, "val": final_val,
                                                  "finished": time.time()})
        ranks.barrier()  # every rank returns once done.json exists
        return TrainResult(str(run_dir), step, epoch, final_val)
