"""What a training run is asked to do (`TrainConfig`), what it returns, and the error a bad request raises."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Settings that do not change the result: a --resume may change them.
NON_IDENTITY = ("resume", "progress", "workers", "out", "images", "checkpoint_every", "allow_incomplete",
                "report_to")


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


@dataclass
class TrainResult:
    out: str
    steps: int
    epochs_done: int
    final_val: dict = field(default_factory=dict)


# Settings added after runs existed, left out of the identity at their default so those runs still resume.
_ADDED_DEFAULTS = {"views_per_sample": 1, "hint_map": (), "hint_adapter": "linear"}


def identity(cfg: TrainConfig) -> dict:
    """The settings that determine a run's weights: a --resume must not change them."""
    out = {k: v for k, v in asdict(cfg).items()
           if k not in NON_IDENTITY and not (k in _ADDED_DEFAULTS and v == _ADDED_DEFAULTS[k])}
    if "hint_map" in out:  # as config.json holds it, so a --resume compares equal
        out["hint_map"] = [list(pair) for pair in out["hint_map"]]
    return out
