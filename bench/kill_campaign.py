"""kill -9 campaign: `kdcache build` and `kdcache train --workers 2` killed at random moments, resumed, compared.

    python bench/kill_campaign.py                       # 20 build kills + 10 train kills, ~10-15 min on 2 CPU cores
    python bench/kill_campaign.py --builds 4 --trains 2 # a smoke run

Tiny synthetic shards and a tiny random teacher (seeded weights saved as a local-dir teacher, so every process loads
the same one). First an uninterrupted build and an uninterrupted train are the references. Then each build trial
starts `kdcache build` as a subprocess and SIGKILLs it at a moment drawn from three kinds:
  early        0-30 ms after --out appears (root creation, vocabulary, root attributes: the first milliseconds)
  random       uniformly within the reference build's duration (from process start, imports included)
  consolidate  as soon as every unit's status exists (rank 0 reading statuses, listing keys, rewriting the root)
and runs `kdcache build ... --resume` (with `--overwrite` never used) until it exits 0 (at most 3 times). The result
counts as identical when every array is byte-identical to the reference, the deterministic root attributes and every
unit status (timing aside) are equal, and no lock file is left. Each train trial starts `kdcache train --workers 2`,
SIGKILLs it uniformly within the reference train's duration, then `--resume`s it; identical = final weights
byte-identical to the reference's. Prints the counts (and where the kills landed); nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
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


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli.main", *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _kill_at(cmd: list[str], when) -> tuple[float, str]:
    """Start cmd, wait until `when(proc, t0)` says kill (returns a label) or the process ends; SIGKILL it."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    label = "ended before the kill"
    while proc.poll() is None:
        got = when(proc, t0)
        if got:
            proc.kill()
            label = got
            break
        time.sleep(0.001)
    proc.wait()
    return time.time() - t0, label


def _units_done(out: Path) -> int:
    d = out / schema.STATUS
    return sum(1 for p in d.iterdir() if (p / "zarr.json").exists()) if d.is_dir() else 0


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


def build_trials(args, work: Path, build_args: list[str], reference: Path, ref_seconds: float, n_units: int,
                 rng: random.Random) -> Counter:
    kinds = ["early"] * round(args.builds * 0.3) + ["consolidate"] * round(args.builds * 0.2)
    kinds += ["random"] * (args.builds - len(kinds))
    rng.shuffle(kinds)
    counts: Counter = Counter()
    for i, kind in enumerate(kinds):
        out = work / f"killed-{i:02d}.zarr"
        cmd = _cli("build", *build_args, "--out", str(out))
        if kind == "early":
            delay, seen = rng.uniform(0, 0.03), {}

            def when(proc, t0, delay=delay, seen=seen, out=out):
                if "t" not in seen and out.exists():
                    seen["t"] = time.time()
                return "early" if "t" in seen and time.time() - seen["t"] >= delay else None
        elif kind == "consolidate":
            def when(proc, t0, out=out):
                return "consolidate" if _units_done(out) >= n_units else None
        else:
            at = rng.uniform(0, ref_seconds)

            def when(proc, t0, at=at):
                return "random" if time.time() - t0 >= at else None
        seconds, _ = _kill_at(cmd, when)
        landed = _landed(out, n_units)
        tries, res = 0, None
        while tries < 3:
            tries += 1
            res = _run(_cli("build", *build_args, "--out", str(out), "--resume"))
            if res.returncode == 0:
                break
        diff = identical_caches(out, reference) if res.returncode == 0 else f"resume failed: {res.stderr[-300:]}"
        if diff is None and Path(lock_path(out)).exists():
            diff = "lock file left"
        ok = diff is None
        counts["identical" if ok else "different"] += 1
        counts[f"landed: {landed}"] += 1
        print(f"build {i + 1:2d}/{len(kinds)} kill={kind:11s} at {seconds:5.2f}s landed={landed:45s} resumes={tries} "
              f"{'IDENTICAL' if ok else 'DIFFERENT: ' + diff}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return counts


def train_trials(args, work: Path, train_args: list[str], ref_weights: dict, ref_seconds: float,
                 rng: random.Random) -> Counter:
    from safetensors.numpy import load_file

    counts: Counter = Counter()
    for i in range(args.trains):
        out = work / f"run-{i:02d}"
        at = rng.uniform(0, ref_seconds)
        seconds, label = _kill_at(_cli("train", *train_args, "--out", str(out)),
                                  lambda proc, t0, at=at: "killed" if time.time() - t0 >= at else None)
        ckpt = (out / "checkpoints" / "latest").read_text().strip() if (out / "checkpoints" / "latest").exists() \
            else "none"
        res = _run(_cli("train", *train_args, "--out", str(out), "--resume"))
        if res.returncode != 0 and not (out / "config.json").exists():  # killed before the run recorded anything
            res = _run(_cli("train", *train_args, "--out", str(out)))
        if res.returncode != 0:
            diff = f"resume failed: {res.stderr.strip().splitlines()[-1:] }"
        else:
            w = load_file(str(out / "final" / "student.safetensors"))
            same = sorted(w) == sorted(ref_weights) and all(w[k].tobytes() == ref_weights[k].tobytes() for k in w)
            diff = None if same else "weights differ"
            if same and Path(lock_path(out)).exists():
                diff = "lock file left"
        counts["identical" if diff is None else "different"] += 1
        print(f"train {i + 1:2d}/{args.trains} {label} at {seconds:5.2f}s (last checkpoint: {ckpt}) "
              f"{'IDENTICAL' if diff is None else 'DIFFERENT: ' + diff}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--builds", type=int, default=20)
    ap.add_argument("--trains", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one, removed at the end)")
    args = ap.parse_args()
    from kdcache.synth import write_image_shards

    rng = random.Random(args.seed)
    tmp = tempfile.TemporaryDirectory(prefix="kdcache-kill-") if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(work / "teacher")
    shards = write_image_shards(work / "shards", n_shards=10, per_shard=8, seed=5)
    classes = work / "classes.txt"
    classes.write_text("red\ngreen\nblue\n")
    build_args = ["--teacher", teacher, "--views", "2", "--classes", str(classes), "--templates", "photo",
                  "--batch-size", "4", "--threads", "1", "--no-progress"]
    for s in shards:
        build_args += ["--images", s]

    reference = work / "reference.zarr"
    t0 = time.time()
    res = _run(_cli("build", *build_args, "--out", str(reference)))
    ref_build_s = time.time() - t0
    if res.returncode != 0:
        print(res.stderr)
        return 1
    print(f"reference build: {ref_build_s:.1f} s (process start to exit), {len(shards)} shards", flush=True)
    counts = build_trials(args, work, build_args, reference, ref_build_s, len(shards), rng) if args.builds \
        else Counter()

    train_args = ["--cache", str(reference), "--tower", "image", "--student", "kdc-tiny-image", "--max-steps", "30",
                  "--batch-size", "4", "--checkpoint-every", "3", "--workers", "2", "--threads", "1", "--no-progress"]
    tcounts: Counter = Counter()
    if args.trains:
        from safetensors.numpy import load_file

        t0 = time.time()
        res = _run(_cli("train", *train_args, "--out", str(work / "reference-run")))
        ref_train_s = time.time() - t0
        if res.returncode != 0:
            print(res.stderr)
            return 1
        print(f"reference train: {ref_train_s:.1f} s, 30 steps, --workers 2", flush=True)
        ref_w = load_file(str(work / "reference-run" / "final" / "student.safetensors"))
        tcounts = train_trials(args, work, train_args, ref_w, ref_train_s, rng)

    print()
    print(f"build: {counts['identical']}/{args.builds} resumed to a byte-identical cache")
    for k, v in sorted((k, v) for k, v in counts.items() if k.startswith("landed")):
        print(f"  {k}: {v}")
    print(f"train --workers 2: {tcounts['identical']}/{args.trains} resumed to byte-identical weights")
    if tmp is not None:
        tmp.cleanup()
    return 0 if counts["different"] == 0 and tcounts["different"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
