"""kill -9 campaign: `kdcache build` and `kdcache train --workers 2` killed at random moments, resumed, compared.

    python bench/kill_campaign.py                       # 20 build kills + 10 train kills, ~10 min on 2 CPU cores
    python bench/kill_campaign.py --builds 4 --trains 2 # a smoke run
    python bench/kill_campaign.py --out bench/results/kill_campaign.json

Tiny synthetic shards (10 image shards with paired captions and labels) and a small caption corpus, and a tiny random
teacher (seeded weights saved as a local-dir teacher, so every process loads the same one). First an uninterrupted
build and an uninterrupted train are the references; the reference build's timeline is recorded (when --out appears,
when each unit's status appears, when the process exits). Each build trial starts `kdcache build` as a subprocess and
SIGKILLs it at a moment drawn from four kinds, each anchored on what the trial itself has written so far:
  early        0-30 ms after --out appears (root creation, vocabulary, root attributes: the first milliseconds)
  last-status  from the moment all units but one have a status, within the reference's time to the last one (the
               last unit's data and status writes)
  consolidate  from the moment every unit has a status, within the reference's time to exit (rank 0 reading the
               statuses, listing duplicate keys, rewriting the root as complete, the process ending)
  random       uniformly from the moment --out appears to the reference's exit
then runs `kdcache build ... --resume` once (never --overwrite). It counts as identical when that resume exits 0, every
array is byte-identical to the reference, the deterministic root attributes and every unit status (timing aside) are
equal, and no lock file is left. Each train trial starts `kdcache train --workers 2` and SIGKILLs it either 0-50 ms
after it took its run directory's lock (early) or uniformly from then to the reference's exit, then runs `--resume`
once (taking over the stale lock, removing a half-written checkpoint); identical = that resume exits 0, the final
weights are byte-identical to the reference's, and no lock file or temporary checkpoint is left. Prints the counts
(and where the kills landed); exits 1 if any trial differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from kdcache.cache import schema
from kdcache.cache.reader import deterministic_attrs
from kdcache.locks import lock_path


def make_teacher(path: Path, seed: int = 0) -> str:
    """The embedded tiny teacher config with seeded random weights, as an open_clip local-dir (what tests use)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from kdcache.quickstart import tiny_teacher_path

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_teacher_path(), path / "open_clip_config.json")
    cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return f"local-dir:{path}"


def _arrays(path: Path) -> dict[str, np.ndarray]:
    out = {}

    def walk(g, prefix=""):
        for name, arr in g.arrays():
            out[prefix + name] = arr[...]
        for name, sub in g.groups():
            walk(sub, prefix + name + "/")
    walk(zarr.open_group(str(path), mode="r"))
    return out


def _statuses(path: Path) -> dict:
    root = zarr.open_group(str(path), mode="r")
    if schema.STATUS not in root:
        return {}
    return {n: {k: v for k, v in dict(g.attrs).items() if k not in schema.STATUS_NONDETERMINISTIC_KEYS}
            for n, g in root[schema.STATUS].groups()}


def identical_caches(a: Path, b: Path) -> str | None:
    """None when identical, else what differs first."""
    try:
        xa, xb = _arrays(a), _arrays(b)
    except Exception as e:
        return f"unreadable: {type(e).__name__}: {e}"
    if sorted(xa) != sorted(xb):
        return f"arrays differ: {sorted(set(xa) ^ set(xb))[:3]}"
    for k in xa:
        if xa[k].shape != xb[k].shape or xa[k].dtype != xb[k].dtype:
            return f"{k}: shape/dtype"
        same = xa[k].tobytes() == xb[k].tobytes() if xa[k].dtype.kind != "O" else (xa[k] == xb[k]).all()
        if not same:
            return f"{k}: bytes"
    ra = deterministic_attrs(dict(zarr.open_group(str(a), mode="r").attrs)[schema.ROOT_ATTR])
    rb = deterministic_attrs(dict(zarr.open_group(str(b), mode="r").attrs)[schema.ROOT_ATTR])
    if ra != rb:
        return f"root attributes: {sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))}"
    if _statuses(a) != _statuses(b):
        return "unit statuses"
    return None


CODE: Path | None = None  # the snapshot of kdcache every subprocess runs (see snapshot_code)


def snapshot_code(work: Path) -> Path:
    """Copy the kdcache package into the work directory and run every build and train from that copy: the reference
    and each kill and resume then run the very same code, even while the source tree is being edited."""
    import kdcache

    global CODE
    CODE = work / "code"
    shutil.rmtree(CODE, ignore_errors=True)
    shutil.copytree(Path(kdcache.__file__).parent, CODE / "kdcache", ignore=shutil.ignore_patterns("__pycache__"))
    return CODE


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli.main", *args]


def _popen_kw() -> dict:
    assert CODE is not None
    return {"cwd": CODE, "env": {**os.environ, "PYTHONPATH": str(CODE)}}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **_popen_kw())


class Trigger:
    """Kill once `anchor()` has become true and `delay` seconds have passed since it did."""

    def __init__(self, anchor: Callable[[], bool], delay: float):
        self.anchor, self.delay, self.seen = anchor, delay, None

    def __call__(self) -> bool:
        if self.seen is None:
            if not self.anchor():
                return False
            self.seen = time.time()
        return time.time() - self.seen >= self.delay


def _reap(pgid: int, timeout: float = 15.0) -> bool:
    """Wait for the rest of a killed process's group (DataLoader workers notice their parent is gone and exit); kill
    what is left after `timeout`. True if something had to be killed."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return True


def _kill_at(cmd: list[str], trigger: Trigger) -> tuple[float, bool, bool]:
    """Start cmd in its own process group, SIGKILL its main process when `trigger()` says so (polled every ms), then
    wait for its children. Returns (seconds from start to the kill or exit, killed, children had to be killed)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            **_popen_kw())
    killed = False
    while proc.poll() is None:
        if trigger():
            proc.kill()
            killed = True
            break
        time.sleep(0.001)
    proc.wait()
    seconds = time.time() - t0
    return seconds, killed, _reap(proc.pid)


def _timeline(cmd: list[str], marks: Callable[[], set[str]], log: Path) -> tuple[int, dict[str, float]]:
    """Run cmd to its end, recording (seconds from start) when each mark `marks()` names first holds; (exit code,
    times)."""
    t0 = time.time()
    seen: dict[str, float] = {}
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, **_popen_kw())
        while proc.poll() is None:
            now = time.time() - t0
            for name in marks():
                seen.setdefault(name, now)
            time.sleep(0.002)
    seen["exit"] = time.time() - t0
    return proc.returncode, seen


def _complete(out: Path) -> bool:
    """Whether the root's attributes say complete (read straight from the local zarr.json, cheap enough to poll)."""
    try:
        attrs = json.loads((out / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, ValueError):
        return False
    return (attrs.get(schema.ROOT_ATTR) or {}).get("status") == schema.CACHE_COMPLETE


def _units_done(out: Path) -> int:
    d = out / schema.STATUS
    try:
        return sum(1 for p in d.iterdir() if (p / "zarr.json").exists()) if d.is_dir() else 0
    except FileNotFoundError:
        return 0


def _landed(out: Path, n_units: int) -> str:
    """Where a build kill landed, from what it left."""
    if not out.exists() or not any(out.iterdir()):
        return "--out absent or empty"
    try:
        attrs = dict(zarr.open_group(str(out), mode="r").attrs).get(schema.ROOT_ATTR)
    except Exception:
        return "root unreadable"
    if not attrs:
        return "root without attributes (interrupted start)"
    done = _units_done(out)
    if attrs.get("status") == schema.CACHE_COMPLETE:
        return "after completion"
    if done == n_units:
        return "consolidation"
    return f"{done}/{n_units} units done"


def _train_landed(out: Path) -> str:
    """Where a train kill landed, from what it left."""
    ck = out / "checkpoints"
    if (out / "done.json").exists():
        return "after done.json"
    if ck.is_dir() and any(p.name.startswith(".") and ".tmp" in p.name for p in ck.iterdir()):
        return "while writing a checkpoint"
    if (ck / "latest").exists():
        return "after a checkpoint"
    if (out / "config.json").exists():
        return "config written, no checkpoint"
    if out.exists():
        return "run directory created, no config"
    return "before the run directory existed"


def build_trials(args, work: Path, build_args: list[str], reference: Path, ref: dict[str, float], n_units: int,
                 rng: random.Random, trials: list[dict]) -> Counter:
    n = args.builds
    kinds = ["early"] * round(n * 0.25) + ["last-status"] * round(n * 0.1) + ["consolidate"] * round(n * 0.15)
    kinds += ["random"] * (n - len(kinds))
    rng.shuffle(kinds)
    last_gap = ref[f"units{n_units}"] - ref[f"units{n_units - 1}"]
    consolidation = ref["complete"] - ref[f"units{n_units}"] + 0.005  # reading statuses ... the root written
    counts: Counter = Counter()
    for i, kind in enumerate(kinds):
        out = work / f"killed-{i:02d}.zarr"
        anchor, delay = {
            "early": (out.exists, rng.uniform(0, 0.03)),
            "last-status": (lambda out=out: _units_done(out) >= n_units - 1, rng.uniform(0, last_gap)),
            "consolidate": (lambda out=out: _units_done(out) >= n_units, rng.uniform(0, consolidation)),
            "random": (out.exists, rng.uniform(0, ref["complete"] - ref["out"])),
        }[kind]
        seconds, killed, reaped = _kill_at(_cli("build", *build_args, "--out", str(out)), Trigger(anchor, delay))
        landed = _landed(out, n_units) if killed else "ended before the kill"
        lock_left = Path(lock_path(out)).exists()
        res = _run(_cli("build", *build_args, "--out", str(out), "--resume"))
        if res.returncode != 0:
            diff = "resume failed: " + (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        else:
            diff = identical_caches(out, reference)
        if diff is None and Path(lock_path(out)).exists():
            diff = "lock file left"
        counts["identical" if diff is None else "different"] += 1
        counts[f"landed: {landed}"] += 1
        trials.append({"what": "build", "kind": kind, "delay_s": round(delay, 4), "seconds": round(seconds, 3),
                       "landed": landed, "stale_lock_left": lock_left, "children_killed": reaped, "result": diff or
                       "identical"})
        print(f"build {i + 1:2d}/{n} kill={kind:11s} +{delay * 1000:6.0f} ms at {seconds:5.2f}s landed={landed:44s} "
              f"{'IDENTICAL' if diff is None else 'DIFFERENT: ' + diff}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return counts


def _weights(path: Path) -> dict[str, bytes]:
    from safetensors.numpy import load_file

    return {k: v.tobytes() for k, v in load_file(str(path)).items()}


def train_trials(args, work: Path, train_args: list[str], ref_weights: dict[str, bytes], ref: dict[str, float],
                 rng: random.Random, trials: list[dict]) -> Counter:
    n = args.trains
    kinds = ["early"] * round(n * 0.2) + ["random"] * (n - round(n * 0.2))
    rng.shuffle(kinds)
    counts: Counter = Counter()
    for i, kind in enumerate(kinds):
        out = work / f"run-{i:02d}"
        lock = Path(lock_path(out))
        delay = rng.uniform(0, 0.05) if kind == "early" else rng.uniform(0, ref["done"] - ref["lock"])
        seconds, killed, reaped = _kill_at(_cli("train", *train_args, "--out", str(out)), Trigger(lock.exists, delay))
        landed = _train_landed(out) if killed else "ended before the kill"
        ckpt = (out / "checkpoints" / "latest").read_text().strip() if (out / "checkpoints" / "latest").exists() \
            else "none"
        res = _run(_cli("train", *train_args, "--out", str(out), "--resume"))
        if res.returncode != 0:
            diff = "resume failed: " + (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        else:
            diff = None if _weights(out / "final" / "student.safetensors") == ref_weights else "weights differ"
            left = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
            if diff is None and (lock.exists() or left):
                diff = f"left behind: {[lock.name] if lock.exists() else []} {left}"
        counts["identical" if diff is None else "different"] += 1
        counts[f"landed: {landed}"] += 1
        trials.append({"what": "train", "kind": kind, "delay_s": round(delay, 4), "seconds": round(seconds, 3),
                       "landed": landed, "last_checkpoint": ckpt, "children_killed": reaped,
                       "result": diff or "identical"})
        print(f"train {i + 1:2d}/{n} kill={kind:6s} +{delay:5.2f} s at {seconds:5.2f}s landed={landed:32s} "
              f"(last checkpoint: {ckpt}) {'IDENTICAL' if diff is None else 'DIFFERENT: ' + diff}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return counts


def _landings(counts: Counter) -> list[str]:
    return [f"  {k}: {v}" for k, v in sorted(counts.items()) if k.startswith("landed")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--builds", type=int, default=20)
    ap.add_argument("--trains", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one, removed at the end)")
    ap.add_argument("--out", default=None, help="write the counts and every trial here (JSON)")
    args = ap.parse_args()
    from kdcache.synth import write_image_shards

    started = time.time()
    rng = random.Random(args.seed)
    tmp = tempfile.TemporaryDirectory(prefix="kdcache-kill-") if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(work / "teacher")
    shards = write_image_shards(work / "shards", n_shards=10, per_shard=8, seed=5)
    classes = work / "classes.txt"
    classes.write_text("red\ngreen\nblue\n")
    corpus = work / "captions.txt"
    corpus.write_text("".join(f"a photo of thing number {i}\n" for i in range(40)))
    build_args = ["--teacher", teacher, "--views", "2", "--classes", str(classes), "--templates", "photo",
                  "--captions", f"txt:{corpus}", "--batch-size", "4", "--threads", "1", "--no-progress"]
    for s in shards:
        build_args += ["--images", s]

    reference = work / "reference.zarr"

    def marks() -> set[str]:
        if not reference.exists():
            return set()
        return {"out", *(f"units{k}" for k in range(1, _units_done(reference) + 1)),
                *(["complete"] if _complete(reference) else [])}
    snapshot_code(work)
    rc, ref_b = _timeline(_cli("build", *build_args, "--out", str(reference)), marks, work / "reference-build.log")
    if rc != 0:
        print((work / "reference-build.log").read_text())
        return 1
    n_units = _units_done(reference)
    print(f"reference build: {ref_b['exit']:.1f} s (process start to exit; --out appeared at {ref_b['out']:.2f} s, "
          f"unit {n_units - 1} of {n_units} done at {ref_b[f'units{n_units - 1}']:.2f} s, the last at "
          f"{ref_b[f'units{n_units}']:.2f} s, complete at {ref_b['complete']:.2f} s), {len(shards)} image shards + a "
          "caption corpus", flush=True)
    trials: list[dict] = []
    counts = build_trials(args, work, build_args, reference, ref_b, n_units, rng, trials) if args.builds \
        else Counter()

    train_args = ["--cache", str(reference), "--tower", "image", "--student", "kdc-tiny-image", "--max-steps", "24",
                  "--batch-size", "4", "--checkpoint-every", "3", "--workers", "2", "--threads", "1", "--no-progress"]
    tcounts: Counter = Counter()
    if args.trains:
        run = work / "reference-run"
        files = {"lock": Path(lock_path(run)), "done": run / "done.json"}
        rc, ref_t = _timeline(_cli("train", *train_args, "--out", str(run)),
                              lambda: {name for name, p in files.items() if p.exists()}, work / "reference-train.log")
        if rc != 0:
            print((work / "reference-train.log").read_text())
            return 1
        print(f"reference train: {ref_t['exit']:.1f} s (its lock taken at {ref_t['lock']:.2f} s, done.json at "
              f"{ref_t['done']:.2f} s), 24 steps, checkpoint every 3, --workers 2", flush=True)
        tcounts = train_trials(args, work, train_args, _weights(run / "final" / "student.safetensors"), ref_t, rng,
                               trials)

    total = time.time() - started
    lines = ["", f"build: {counts['identical']}/{args.builds} resumed (one --resume each) to a byte-identical cache",
             *_landings(counts),
             f"train --workers 2: {tcounts['identical']}/{args.trains} resumed (one --resume each) to byte-identical "
             "final weights", *_landings(tcounts),
             f"campaign: {total / 60:.1f} min"]
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), "seconds": round(total, 1),
            "build": {"identical": counts["identical"], "trials": args.builds},
            "train": {"identical": tcounts["identical"], "trials": args.trains},
            "trials": trials}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0 if counts["different"] == 0 and tcounts["different"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
