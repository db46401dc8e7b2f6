"""What a training run is asked to do (`TrainConfig`), what it returns, and the error a bad request raises."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field

from kdcache.subset import Subset

# Settings that do not change the result: a --resume may change them.
NON_IDENTITY = ("resume", "progress", "workers", "out", "images", "checkpoint_every", "allow_incomplete",
                "report_to", "max_skipped_steps", "decode", "decode_device")  # the replay decoder: resolved


REPLAY_DECODERS = ("auto", "cpu", "gpu")  # --decode: how image views are replayed (kdcache.train.replay)


class TrainError(ValueError):
    """A run that cannot start as asked; the message names the field."""


@dataclass(frozen=True)
class TrainConfig:
    cache: str
    tower: str
    student: str
    out: str
    losses: tuple[tuple[str, float], ...] = ()     # empty: the tower's label-free default
    temperature: float = 2.0
    epochs: int | None = None                      # default 1 when max_steps is not given either
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int | None = None                # default: 5% of the total steps
    grad_clip: float = 1.0
    accum_steps: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    workers: int = 0
    threads: int | None = None
    images: tuple[str, ...] = ()
    seed: int = 0
    student_pretrained: str | None = None
    val_fraction: float = 0.05
    buffer: int = 2048
    views_per_sample: int = 1                      # image tower: M cached views of each decoded picture per batch
    hint_map: tuple[tuple[str, str], ...] = ()     # (student module, teacher hint) pairs of the `hint` loss
    hint_adapter: str = "linear"                   # linear | none (kdcache.train.students.HINT_ADAPTERS)
    checkpoint_every: int = 200
    allow_incomplete: bool = False
    resume: bool = False
    progress: bool = True
    report_to: tuple[str, ...] = ()                # trackers besides metrics.jsonl/csv: tensorboard, wandb
    subset: Subset = Subset()                      # --include/--exclude/--labels (kdcache.subset); labels as given
    max_skipped_steps: int = 20                    # fp16 GradScaler: consecutive non-finite (skipped) steps allowed
    decode: str = "auto"                           # replay decoder: auto | cpu | gpu (kdcache.train.replay)
    decode_device: str | None = None               # internal: replay the gpu decode path on this device (tests: "cpu")

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.decode not in REPLAY_DECODERS:
            raise TrainError(f"--decode {self.decode!r}: expected one of {', '.join(REPLAY_DECODERS)}")


# The ranges of TrainConfig's numbers, the same as the option types of `kdcache train` (kdcache/cli/main.py), so a
# library caller is refused what the CLI refuses: (field, lowest, lowest allowed?, highest or None, what it is).
FLOAT_RANGES = (
    ("temperature", 0.0, False, None, "the KD temperature"),
    ("lr", 0.0, False, None, "the peak learning rate"),
    ("weight_decay", 0.0, True, None, "the AdamW weight decay"),
    ("grad_clip", 0.0, True, None, "the max gradient norm, 0 = off"),
    ("val_fraction", 0.0, True, 0.5, "the validation fraction"),
)
# (field, lowest); None is allowed where the field's default is None
INT_MINIMA = (("epochs", 1), ("max_steps", 1), ("batch_size", 1), ("accum_steps", 1), ("warmup_steps", 0),
              ("workers", 0), ("threads", 1), ("buffer", 1), ("views_per_sample", 1), ("checkpoint_every", 1),
              ("max_skipped_steps", 0))


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_numbers(cfg: TrainConfig) -> None:
    """Refuse (TrainError naming the option) a non-finite or out-of-range number: NaN or inf in a float option
    would otherwise train to NaN weights."""
    for name, lo, lo_ok, hi, what in FLOAT_RANGES:
        v = getattr(cfg, name)
        rng = f"{'>=' if lo_ok else '>'} {lo:g}" + ("" if hi is None else f" and <= {hi:g}")
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
                or not (v >= lo if lo_ok else v > lo) or (hi is not None and v > hi):
            raise TrainError(f"{_option(name)} ({what}) must be a finite number {rng}, got {v!r}")
    for name, lo in INT_MINIMA:
        v = getattr(cfg, name)
        if v is None and getattr(TrainConfig, name) is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            raise TrainError(f"{_option(name)} must be an integer >= {lo}, got {v!r}")
    for name, w in cfg.losses:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (math.isfinite(w) and w >= 0):
            raise TrainError(f"--loss {name}={w!r}: a loss weight must be a finite number >= 0")


@dataclass
class TrainResult:
    out: str
    steps: int
    epochs_done: int
    final_val: dict = field(default_factory=dict)


# Settings added after runs existed, left out of the identity at their default so those runs still resume.
_ADDED_DEFAULTS = {"views_per_sample": 1, "hint_map": (), "hint_adapter": "linear",
                   "subset": {"include": (), "exclude": (), "labels": ()}}


def identity(cfg: TrainConfig) -> dict:
    """The settings that determine a run's weights: a --resume must not change them."""
    out = {k: v for k, v in asdict(cfg).items()
           if k not in NON_IDENTITY and not (k in _ADDED_DEFAULTS and v == _ADDED_DEFAULTS[k])}
    if "hint_map" in out:  # as config.json holds it, so a --resume compares equal
        out["hint_map"] = [list(pair) for pair in out["hint_map"]]
    if "subset" in out:  # as given; the loop records it with class names resolved to ids
        out["subset"] = cfg.subset.to_json()
    return out
