"""Latency and throughput of image towers, measured so that ratios between models are honest on a noisy machine.

    timings = measure([teacher, student], batch=32, repeats=10, warmup=2)
    timings.per_model["runs/img"]["ms_per_image_b1"], timings.per_model["runs/img"]["images_per_s"]

All models are timed in this one process, interleaved (A B C, B C A, C A B, ...: the start rotates so no model always
runs right after the same one), after warm-up, and summarised by medians. What is timed is the image tower's forward
pass (projection included) on a random normalised tensor at the model's own input size — decoding and resizing are
not, as they depend on the data pipeline, not the model.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kdcache.eval.models import EvalModel


@dataclass
class Timings:
    """Per-model medians and the conditions they were taken under."""

    per_model: dict[str, dict] = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)


def device_description(device: torch.device) -> str:
    """A human name for the device timings were taken on (GPU model, or CPU and torch's thread count)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine() or "cpu"
    n = torch.get_num_threads()
    return f"cpu: {cpu}, {n} torch thread{'' if n == 1 else 's'}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(model: EvalModel, x: torch.Tensor) -> float:
    _sync(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode(), model.autocast():
        model.image_forward(x)
    _sync(model.device)
    return time.perf_counter() - t0


def _interleaved(models: Sequence[EvalModel], inputs: Sequence[torch.Tensor], *, repeats: int,
                 warmup: int) -> list[list[float]]:
    n = len(models)
    for _ in range(warmup):
        for m, x in zip(models, inputs, strict=True):
            _time_once(m, x)
    times: list[list[float]] = [[] for _ in models]
    for r in range(repeats):
        for j in range(n):
            i = (r + j) % n
            times[i].append(_time_once(models[i], inputs[i]))
    return times


def measure(models: Sequence[EvalModel], *, batch: int = 32, repeats: int = 10, warmup: int = 2,
            seed: int = 0) -> Timings:
    """Median latency per image at batch 1 (ms) and throughput at `batch` (images/s) of each model's image tower."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError("latency needs batch >= 1, repeats >= 1, warmup >= 0")
    gen = torch.Generator().manual_seed(seed)
    out = Timings()
    results: dict[int, list[list[float]]] = {}
    for b in (1, batch):
        if b in results:
            continue
        # Inputs are made (and moved to the device) before timing starts.
        inputs = [torch.randn(b, 3, *m.input_size, generator=gen).to(m.device) for m in models]
        results[b] = _interleaved(models, inputs, repeats=repeats, warmup=warmup)
    for i, m in enumerate(models):
        b1 = statistics.median(results[1][i])
        bn = statistics.median(results[batch][i])
        out.per_model[m.label] = {"ms_per_image_b1": 1000.0 * b1, "images_per_s": batch / bn, "batch": batch,
                                  "b1_spread_ms": [1000.0 * min(results[1][i]), 1000.0 * max(results[1][i])]}
    devices = sorted({device_description(m.device) for m in models})
    out.conditions = {"device": "; ".join(devices), "side_by_side": len(models) > 1, "interleaved": len(models) > 1,
                      "batch": batch, "repeats": repeats, "warmup": warmup, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "precision": sorted({m.precision for m in models}),
                      "what": "image tower forward (projection included) on a random normalised tensor at the "
                              "model's input size; medians"}
    return out
