"""Students replay a `--decode gpu` cache's views with the build's own decoder where they can (`train --decode`).

A `--decode gpu` build decoded its JPEGs with nvjpeg and cut and resized the views on the GPU
(`kdcache.tensorviews`); PIL's decode and fixed-point resize give pixels a level or two away from those. On CUDA a
student replays such a cache the same way, so it sees what the teacher saw:

- the DataLoader workers only read bytes and headers, as the build's did: a member the build's header probe
  (`kdcache.shards.gpudecode.probe_image`) sends to PIL is decoded and rendered by PIL in the worker, as the build
  did; every other JPEG travels undecoded in the batch (`ReplayJobs`);
- the main process decodes a batch's JPEGs on the device in one call, falling back to PIL where the device refuses
  one, exactly as the build did (`decode_pictures`), and renders each row's view from the decoded picture at the
  student's size (and, for online distillation, the teacher's): `DeviceReplay`, on a background thread one batch
  ahead of the training step (`replayed`).

`resolve` picks the decoder: `auto` (the default) is `gpu` for a `--decode gpu` cache on a CUDA student and `cpu`
(PIL, logged once per cache) otherwise; `gpu` is refused for a cache PIL decoded, and without CUDA. The decoder a run
replays with is part of its `--resume` identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from open_clip.transform import PreprocessCfg

from kdcache.augment import ViewRecord
from kdcache.shards import RejectError
from kdcache.shards.gpudecode import ahead, decode_pictures, device_decode_problem
from kdcache.tensorviews import TensorViews
from kdcache.train.config import REPLAY_DECODERS, TrainError
from kdcache.train.dataspec import DataError


def resolve(decode: str, *, cache_decode: str, tower: str, device: torch.device, decode_device: str | None) -> str:
    """The decoder this run replays views with: "gpu" (the build's device decode) or "cpu" (PIL)."""
    if decode not in REPLAY_DECODERS:
        raise TrainError(f"--decode {decode!r}: expected one of {', '.join(REPLAY_DECODERS)}")
    if tower != "image" or decode == "cpu":
        return "cpu"
    if cache_decode != "gpu":
        if decode == "gpu":
            raise TrainError("--decode gpu replays a cache built with --decode gpu; this cache's pictures were decoded "
                             "by PIL (--decode cpu), which is how its views replay exactly: use --decode auto or cpu")
        return "cpu"
    if decode_device is not None or device_decode_problem(device) is None:  # decode_device: tests, on the CPU
        return "gpu"
    if decode == "gpu":
        raise TrainError(f"--decode gpu replays with nvjpeg on the student's CUDA device, and --device {device} is "
                         "not one with CUDA available: give --device cuda, or --decode auto to replay with PIL")
    return "cpu"


class ReplayRow(NamedTuple):
    """One row of a batch to replay: its JPEG (an index into `ReplayJobs.jpegs`) and view record (None: view 0), or,
    where the build decoded the picture with PIL, the pixels PIL rendered in the worker."""

    jpeg: int = -1                          # -1: rendered in the worker
    rec: ViewRecord | None = None
    student: torch.Tensor | None = None     # uint8 [3, H, W] at the student's size, when rendered in the worker
    teacher: torch.Tensor | None = None     # ... at the teacher's (online distillation)


@dataclass
class ReplayJobs:
    """What a worker sends instead of pixels when the main process decodes: the batch's undecoded JPEGs (each once,
    however many of its views the batch holds) and its rows in batch order."""

    jpegs: list[bytes] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)        # the key of each JPEG, for messages
    rows: list[ReplayRow] = field(default_factory=list)


def _views(preprocess: dict, fill: tuple[int, int, int]) -> TensorViews:
    # The PIL path's default interpolation where a student's preprocessing does not name one.
    return TensorViews({**preprocess, "interpolation": preprocess.get("interpolation") or PreprocessCfg.interpolation},
                       fill=fill)


class DeviceReplay:
    """Turns a batch's `ReplayJobs` ("replay") into "pixels" (and "teacher_pixels") on `device`."""

    def __init__(self, *, student_preprocess: dict, teacher_preprocess: dict | None, fill: tuple[int, int, int],
                 max_pixels: int, background: tuple[int, int, int], device: str | torch.device):
        self.device = torch.device(device)
        self.student = _views(student_preprocess, fill)
        self.teacher = None if teacher_preprocess is None else _views(teacher_preprocess, fill)
        self.max_pixels, self.background = max_pixels, background

    @classmethod
    def for_rows(cls, rows, device: str | torch.device) -> DeviceReplay:
        """The replay of an `ImageRows`' batches (its preprocessing, erase fill and the build's decode settings)."""
        return cls(student_preprocess=rows.student_preprocess, teacher_preprocess=rows.teacher_preprocess,
                   fill=rows.fill, max_pixels=rows.build["max_pixels"], background=rows.build["background"],
                   device=device)

    def __call__(self, batch: dict) -> dict:
        jobs: ReplayJobs | None = batch.get("replay")
        if jobs is None:
            return batch
        pics = decode_pictures(jobs.jpegs, device=self.device, max_pixels=self.max_pixels, background=self.background)
        for key, pic in zip(jobs.keys, pics, strict=True):
            if isinstance(pic, RejectError):
                raise DataError(f"key {key!r} was valid at build time but neither the device decoder nor PIL decodes "
                                f"it now ({pic}): the shard was rewritten after the build; --exclude '{key}' trains "
                                "without it")
        out = {k: v for k, v in batch.items() if k != "replay"}
        out["pixels"] = self._pixels(self.student, pics, jobs.rows, [r.student for r in jobs.rows])
        if self.teacher is not None:
            out["teacher_pixels"] = self._pixels(self.teacher, pics, jobs.rows, [r.teacher for r in jobs.rows])
        return out

    def _pixels(self, views: TensorViews, pics: list, rows: list[ReplayRow], in_worker: list) -> torch.Tensor:
        """The rows' views at one size: rendered in the worker, or from the decoded pictures here."""
        here = iter(views.render_all([(pics[r.jpeg], r.rec) for r, w in zip(rows, in_worker, strict=True)
                                      if w is None]))
        return torch.stack([(next(here) if w is None else w).to(self.device) for w in in_worker])


def replayed(batches, replay: DeviceReplay | None):
    """`batches` with their views decoded and rendered on the device (unchanged without a replay), each on a
    background thread while the step before it runs (`ahead`)."""
    return batches if replay is None else (out for _, out in ahead(batches, replay))
