"""The run directory: one home for its layout and everything that reads or writes it.

    RUN/config.json        resolved config, loss formula, cache fingerprint, student config, the teacher learnt from
    RUN/metrics.jsonl|csv  every step's losses, lr, samples/s; validation rows at epoch ends
    RUN/checkpoints/       step-N/ (student, optimizer/scheduler/RNG state, loader position) + `latest`, atomic
    RUN/final/student.safetensors
    RUN/done.json          written last: a run is finished when it exists
    RUN/tensorboard/       with --report-to tensorboard: event files of the same rows (kdcache/train/tracking.py)
    RUN/wandb/             with --report-to wandb: W&B's files, and `kdcache-run-id`, the W&B run a --resume continues

A run holds the directory's writer lock (`holding`: RUN.lock next to it, `kdcache.locks`) while it runs, and removes
what a killed run left half written. The training loop writes it; `kdcache export`, `kdcache eval` and
`kdcache compare` read it through this module (never through the loop). No pickles: tensors are safetensors, the rest
JSON.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdcache import locks
from kdcache.train.config import TrainError
from kdcache.train.students import Student, build_student

log = logging.getLogger(__name__)

DONE = "done.json"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
FINAL = "final"
WEIGHTS = "student.safetensors"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
WANDB_RUN_ID = "kdcache-run-id"


def is_run_dir(path: str | Path) -> bool:
    """A kdcache training run directory, finished or not (config.json and done.json or checkpoints/)."""
    p = Path(path)
    return (p / CONFIG).is_file() and ((p / DONE).is_file() or (p / CHECKPOINTS).is_dir())


def read_config(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / CONFIG).read_text())


def read_done(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / DONE).read_text())


def final_weights(run_dir: str | Path) -> Path:
    return Path(run_dir) / FINAL / WEIGHTS


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl's rows ([] when the run has none yet)."""
    p = Path(run_dir) / METRICS
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def holding(out: str, *, main: bool = True) -> Iterator[None]:
    """The run directory's writer lock (`kdcache.locks`, `OUT.lock`) held around a run, taken by the process that
    writes the run directory (`main`; under DDP rank 0) before it reads or writes anything there. Under the lock,
    temporary files of a run killed while writing (a checkpoint, config.json, metrics.csv) are removed, with a log
    line. An OSError while the run writes (disk full, ...) becomes a TrainError naming the path: the checkpoints
    already written are kept and the run is resumable."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainError(f"--out {out} is a file, not a run directory: choose another --out")
    lock = locks.WriterLock(out, what="run directory") if main and "://" not in out else None  # URLs: see the loop
    if lock is not None:
        try:
            lock.acquire()
        except locks.LockError as e:
            raise TrainError(str(e)) from None
    try:
        if lock is not None and os.path.isdir(out):
            for p in remove_interrupted_writes(Path(out)):
                log.info("%s: removed %s, left by a run killed while writing it", out, p)
        yield
    except OSError as e:
        if isinstance(e, FileNotFoundError):  # a missing input (a shard moved): its own message names it
            raise
        raise TrainError(f"{e.filename or out}: {e.strerror or e}: the run stopped; its checkpoints are kept: fix "
                         "this, then rerun with --resume") from None
    finally:
        if lock is not None:
            lock.release()


def remove_interrupted_writes(run_dir: Path) -> list[str]:
    """Delete the temporary files and folders a killed run left (`checkpoints/.step-N.tmp-PID/`, `.NAME.tmp-PID`);
    their paths relative to `run_dir`. Only safe under the run directory's lock."""
    found = []
    for folder in (run_dir, run_dir / CHECKPOINTS):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return [p.relative_to(run_dir).as_posix() for p in found]


def check_resume(run_dir: Path, *, resume: bool, fingerprint: str, resolved: dict) -> bool:
    """Whether `run_dir` holds an earlier run to continue. Refuses (TrainError, naming the field) an existing run
    without --resume, and a --resume whose cache fingerprint or result-determining config changed."""
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return False
    if not resume:
        raise TrainError(f"{run_dir} already exists: pass --resume to continue it, or choose a new --out")
    if not (run_dir / CONFIG).is_file():
        # A run killed before it recorded config.json leaves at most its trackers' folders: nothing to continue.
        if {p.name for p in run_dir.iterdir()} <= {TENSORBOARD, WANDB}:
            log.warning("--resume: %s holds only the start of a run killed before it recorded its config; starting "
                        "from step 0", run_dir)
            return False
        raise TrainError(f"--resume refused: {run_dir} is not a kdcache run directory (no {CONFIG}); choose another "
                         "--out")
    old = read_config(run_dir)
    if old["cache_fingerprint"] != fingerprint:
        raise TrainError(f"--resume refused: the cache changed (cache_fingerprint {old['cache_fingerprint']} "
                         f"-> {fingerprint})")
    was, now = old["config"].get("world_size", 1), resolved.get("world_size", 1)
    if was != now:  # DDP: the global batch, and so every step, depends on the number of ranks
        raise TrainError(f"--resume refused: the run was trained on {was} rank(s) (world_size) and this launch has "
                         f"{now}; resume with {was} (torchrun --nnodes x --nproc-per-node = {was})")
    changed = sorted(k for k in set(old["config"]) | set(resolved) if old["config"].get(k) != resolved.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old['config'].get(k)!r} -> {resolved.get(k)!r}" for k in changed)
        raise TrainError(f"--resume refused: config changed ({detail})")
    return True


def write_config(run_dir: Path, conf: dict) -> None:
    atomic_write_text(run_dir / CONFIG, json.dumps(conf, indent=2))


def write_final(run_dir: Path, student: Student, done: dict) -> None:
    """The final weights, then done.json: a reader that sees done.json finds the weights complete."""
    final = run_dir / FINAL
    final.mkdir(exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(final / WEIGHTS))
    atomic_write_text(run_dir / DONE, json.dumps(done, indent=2))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, *, student: Student, optimizer, scheduler, step: int, epoch: int,
                    epoch_step: int, meta: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-N/ completely under a temporary name, rename it, then point `latest` at it."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()},
              str(tmp / WEIGHTS))
    tensors, state_meta = _flatten_train_state(optimizer, scheduler)
    save_file(tensors, str(tmp / "train_state.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "epoch": epoch, "epoch_step": epoch_step,
                                               "train_state": state_meta}, indent=2))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, name)
    for old in sorted(p for p in root.glob("step-*") if p.name != name)[:-max(keep - 1, 0) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _flatten_train_state(optimizer, scheduler) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer/scheduler/RNG state as safetensors tensors + JSON (no pickles in a run directory)."""
    opt = optimizer.state_dict()
    tensors = {"torch_rng": torch.get_rng_state()}
    scalars: dict[str, dict] = {}
    for idx, st in opt["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = v
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    return tensors, {"param_groups": opt["param_groups"], "scalars": scalars, "scheduler": sched}


def restore_train_state(optimizer, scheduler, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, sc in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(meta["param_groups"])})
    torch.set_rng_state(tensors["torch_rng"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    p = run_dir / CHECKPOINTS / LATEST
    if not p.exists():
        return None
    ck = run_dir / CHECKPOINTS / p.read_text().strip()
    return ck if (ck / "meta.json").exists() else None


def strict_row(row: dict) -> dict:
    """`row` as strict JSON can hold it: a NaN or infinite value (a step the fp16 scaler skipped, a validation pass
    that gave NaN before the run stopped) becomes null, and "non_finite" names each such field with its value
    ("nan", "inf", "-inf"), so jq, JavaScript and CSV readers parse every row and nothing is lost."""
    bad = {k: str(v) for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return row
    return {**{k: None if k in bad else v for k, v in row.items()}, "non_finite": bad}


class Metrics:
    """metrics.jsonl (appended every step) and metrics.csv (rewritten from the JSONL at each epoch end)."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.jsonl, self.csv = run_dir / METRICS, run_dir / METRICS_CSV
        if resume_step is not None and self.jsonl.exists():  # drop rows logged after the checkpoint we resume from
            rows = [r for r in self._rows() if r.get("step", 0) <= resume_step]
            atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        elif resume_step is None and self.jsonl.exists():
            self.jsonl.unlink()
        self.fh = open(self.jsonl, "a")  # noqa: SIM115 - closed in close()

    def _rows(self) -> list[dict]:
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def log(self, row: dict) -> None:
        self.fh.write(json.dumps(strict_row(row), allow_nan=False) + "\n")
        self.fh.flush()

    def write_csv(self) -> None:
        self.fh.flush()
        rows = self._rows()
        cols = list(dict.fromkeys(k for r in rows for k in r))
        tmp = self.csv.with_name(".metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv)

    def close(self) -> None:
        self.fh.close()


class NoMetrics:
    """What a DDP rank other than 0 logs to: nothing (rank 0 holds the run's metrics, which are means over ranks)."""

    def log(self, row: dict) -> None:
        pass

    def write_csv(self) -> None:
        pass

    def close(self) -> None:
        pass


def load_run_student(run_dir: str | Path, *, device: str = "cpu") -> tuple[Student, dict]:
    """A finished run's student (final weights) and its config.json."""
    run_dir = Path(run_dir)
    if not (run_dir / DONE).exists():
        raise TrainError(f"{run_dir} is not a finished kdcache run (no {DONE}); finish it with --resume")
    conf = json.loads((run_dir / CONFIG).read_text())
    c = conf["config"]
    student = build_student(c["student"], tower=conf["tower"], teacher_dim=conf["embed_dim"],
                            pretrained=None, seed=c["seed"])
    # hint adapters are training-only: the student a run leaves is its tower (and projection)
    weights = {k: v for k, v in load_file(str(run_dir / FINAL / WEIGHTS), device=device).items()
               if not k.startswith("hint_adapters.")}
    student.load_state_dict(weights)
    student.eval()
    return student, conf
