"""Experiment trackers (`kdcache train --report-to`): every metrics row also goes to TensorBoard and/or W&B.

    kdcache train ... --report-to tensorboard     # then: tensorboard --logdir RUN/tensorboard
    kdcache train ... --report-to wandb           # pip install 'kdcache[wandb]'; WANDB_MODE=offline works without login
    kdcache train ... --report-to tensorboard,wandb   # or: all

metrics.jsonl/csv stay the source of truth (`kdcache compare` and the tests read them); a tracker receives the same
rows. Each numeric column of a row except `step` becomes the scalar `<kind>/<column>` at x = the optimizer step, with
the kind's own prefix dropped from the column (`train/loss`, `train/lr`, `train/grad_norm`, `val/cosine`, `val/loss`).

A resumed run continues the same logs. TensorBoard: a new event file in RUN/tensorboard/ whose `purge_step` is the
first step after the checkpoint, so readers drop what the interrupted attempt logged past it (as metrics.jsonl is
truncated). W&B: the same run id (kept in RUN/wandb/kdcache-run-id) with resume="allow"; W&B ignores steps it already
has, so those keep the first attempt's values (the same losses: a resumed run replays the same batches).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from kdcache.train import rundir
from kdcache.train.config import TrainError

REPORTERS = ("tensorboard", "wandb")
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'kdcache[wandb]'"}


def parse_report_to(value: str | Iterable[str]) -> tuple[str, ...]:
    """`--report-to`: tensorboard, wandb, all, none, or a comma list of them, as the trackers in a fixed order."""
    names = [value] if isinstance(value, str) else list(value)
    asked = {p.strip().lower() for n in names for p in n.split(",") if p.strip()}
    unknown = sorted(asked - {*REPORTERS, "all", "none"})
    if unknown:
        raise TrainError(f"--report-to: unknown tracker {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join((*REPORTERS, 'all', 'none'))} (or a comma list)")
    if "none" in asked and len(asked) > 1:
        raise TrainError(f"--report-to: 'none' cannot be combined with {', '.join(sorted(asked - {'none'}))}")
    return REPORTERS if "all" in asked else tuple(r for r in REPORTERS if r in asked)


def check_installed(report_to: Iterable[str]) -> None:
    """Refuse, before anything runs, a tracker whose package is missing, with the command that installs it."""
    for name in parse_report_to(tuple(report_to)):
        if importlib.util.find_spec(name) is None:
            raise TrainError(f"--report-to {name} needs the '{name}' package, which is not installed: {_INSTALL[name]}")


def tag(kind: str, column: str) -> str:
    """The tracker name of a metrics column: `<kind>/<column>` without the kind's prefix (val_cosine -> val/cosine)."""
    return f"{kind}/{column.removeprefix(kind + '_')}"


def scalars(row: dict) -> dict[str, float]:
    """A metrics row's numbers by tracker name (everything but `kind` and the x-axis `step`)."""
    kind = row.get("kind", "train")
    return {tag(kind, k): float(v) for k, v in row.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    """Event files in RUN/tensorboard/ (torch's SummaryWriter), flushed every row as metrics.jsonl is."""

    def __init__(self, run_dir: Path, *, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        logdir = run_dir / rundir.TENSORBOARD
        if resume_step is None and logdir.is_dir():  # a fresh start: an earlier attempt's events go, as its metrics do
            for old in logdir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(logdir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, v in values.items():
            self.writer.add_scalar(name, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run whose files live in RUN/wandb/. Project from WANDB_PROJECT (default kdcache), entity and mode
    (online/offline) from W&B's own settings and environment; the run is named after the run directory."""

    def __init__(self, run_dir: Path, *, resume_step: int | None, config: dict):
        import wandb

        id_file = run_dir / rundir.WANDB / rundir.WANDB_RUN_ID  # wandb.init(dir=RUN) makes and fills RUN/wandb/
        if resume_step is not None and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "kdcache"), name=run_dir.name, id=run_id,
                                  resume="allow", dir=str(run_dir), config=config, job_type="train",
                                  # console capture would wrap sys.stdout (tqdm, click's runner); metrics are the point
                                  settings=wandb.Settings(console="off", save_code=False))
        except wandb.errors.Error as e:
            raise TrainError(f"--report-to wandb: W&B could not start ({e}); run `wandb login`, or set "
                             f"WANDB_MODE=offline to log locally and `wandb sync` later") from None

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers a run reports to, fed the rows metrics.jsonl gets: `log(row)` where the loop logs a row,
    `close()` at the end. With none asked for, both do nothing."""

    def __init__(self, trackers: Iterable[Tracker] = ()):
        self.trackers = list(trackers)

    @classmethod
    def open(cls, run_dir: str | Path, report_to: Iterable[str], *, resume_step: int | None,
             config: dict | None = None) -> Trackers:
        """Start the trackers of `report_to` for `run_dir`; `resume_step`: the checkpoint's step when resuming."""
        run_dir, opened = Path(run_dir), []
        new_dirs = [d for d in (run_dir / rundir.TENSORBOARD, run_dir / rundir.WANDB) if not d.exists()]
        try:
            for name in parse_report_to(tuple(report_to)):
                if name == "tensorboard":
                    opened.append(TensorBoard(run_dir, resume_step=resume_step))
                else:
                    opened.append(WandB(run_dir, resume_step=resume_step, config=config or {}))
        except BaseException:  # a failed start leaves the run directory as it found it
            cls(opened).close()
            for d in new_dirs:
                shutil.rmtree(d, ignore_errors=True)
            raise
        return cls(opened)

    def log(self, row: dict) -> None:
        if self.trackers:
            values = scalars(row)
            for t in self.trackers:
                t.log(values, int(row["step"]))

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []
