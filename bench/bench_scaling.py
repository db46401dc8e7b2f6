"""Scaling: `kdcache build` and `kdcache train` at N, 4N and 16N samples — linear time, flat memory.

    python bench/bench_scaling.py --quick          # N = 256 (up to 4096 samples), one round, ~30 s
    python bench/bench_scaling.py                  # N = 1024 (up to 16384 samples), two rounds, ~1.5 min
    python bench/bench_scaling.py --n 1024 --repeats 3 --workers 1

Every build and every train runs as its own subprocess (`python -m kdcache.cli.main ...`), so its wall time and the
peak memory of its whole process tree (DataLoader workers included) are its own. The teacher is the tiny random-init
ViT (kdcache/configs/teachers/kdc-tiny-vit.json), the student kdc-tiny-image trained for one epoch, on synthetic
shards of `--per-shard` small JPEGs: N samples are the first N/per_shard shards, 4N and 16N the first 4x and 16x.

Marginal cost ratio (t(4N) - t(N)) ÷ (t(16N) - t(4N)): start-up (imports, teacher/student construction) cancels
out by construction; 3N ÷ 12N = 0.25 when the cost is linear, less when it grows faster than linear. Peak memory:
the process tree's summed RSS (sampled every 20 ms from /proc; shared pages of forked workers count once per process)
and, where the kernel has it, the summed PSS; peak(16N) ÷ peak(N) should be ~1. Sizes run in a rotated order each
round; medians over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_build import machine_note, md_table, spread, target, targets_table, write_result  # noqa: E402

TINY_TEACHER = Path(__file__).resolve().parents[1] / "kdcache" / "configs" / "teachers" / "kdc-tiny-vit.json"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_memory(root: int) -> tuple[int, int]:
    """(summed RSS, summed PSS) in bytes of `root` and all its descendants; PSS is 0 where smaps_rollup is missing."""
    kids, todo, rss, pss = _children(), [root], 0, 0
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * PAGE
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return rss, pss


def run_measured(cmd: list[str], *, interval: float = 0.02, env: dict | None = None) -> dict:
    """Run `cmd`; return its wall seconds and the peak summed RSS/PSS of its process tree (sampled)."""
    peak = [0, 0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    done = threading.Event()

    def poll():
        while not done.is_set():
            rss, pss = tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            done.wait(interval)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "peak_rss": peak[0], "peak_pss": peak[1]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="N: the smallest size (a multiple of --per-shard)")
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--image-size", type=int, nargs=2, default=(64, 48), help="synthetic JPEG width height")
    ap.add_argument("--student", default="kdc-tiny-image")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="train DataLoader workers (build: 0)")
    ap.add_argument("--threads", type=int, default=None, help="--threads for every kdcache command")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-warmup", action="store_true", help="skip the discarded warm-up build + train")
    ap.add_argument("--quick", action="store_true", help="N = 256 (shards of 128), one round, no warm-up")
    ap.add_argument("--out", default="bench/results/scaling.json")
    args = ap.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(n=256, per_shard=128, repeats=1, no_warmup=True)
        args = ap.parse_args(argv)
    from kdcache.synth import write_image_shards

    per = args.per_shard
    if args.n % per:
        raise SystemExit(f"--n {args.n} must be a multiple of --per-shard {per}")
    sizes = {"N": args.n, "4N": 4 * args.n, "16N": 16 * args.n}
    kd = [sys.executable, "-m", "kdcache.cli.main"]
    threads = ["--threads", str(args.threads)] if args.threads else []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = write_image_shards(tmp / "shards", n_shards=16 * args.n // per, per_shard=per,
                                    size=tuple(args.image_size), seed=0, captions=False)
        runs: dict[str, dict[str, list[dict]]] = {"build": {k: [] for k in sizes}, "train": {k: [] for k in sizes}}
        # Warm-up (page cache, .pyc files), discarded: the smallest build and train once.
        names = list(sizes)
        for r in range(0 if args.no_warmup else -1, args.repeats):
            order = names if r < 0 else names[r % 3:] + names[:r % 3]
            for name in order if r >= 0 else ["N"]:
                n = sizes[name]
                cache, run_dir = tmp / f"c-{name}-{r}.zarr", tmp / f"r-{name}-{r}"
                pattern = f"{Path(shards[0]).parent}/shard-{{00000..{n // per - 1:05d}}}.tar"  # what a user types
                b = run_measured([*kd, "build", "--images", pattern, "--teacher", str(TINY_TEACHER),
                                  "--allow-random-init", "--out", str(cache), "--batch-size", str(args.batch_size),
                                  *threads], env=env)
                t = run_measured([*kd, "train", "--cache", str(cache), "--tower", "image", "--student", args.student,
                                  "--out", str(run_dir), "--epochs", "1", "--batch-size", str(args.batch_size),
                                  "--workers", str(args.workers), "--no-progress", *threads], env=env)
                tag = "warm-up (discarded)" if r < 0 else f"round {r}"
                print(f"  {tag:20s} {name:4s} n={n:6d}  build {b['wall_s']:6.2f} s {b['peak_rss'] / 2**20:6.0f} MiB"
                      f"   train {t['wall_s']:6.2f} s {t['peak_rss'] / 2**20:6.0f} MiB", file=sys.stderr, flush=True)
                if r >= 0:
                    runs["build"][name].append(b)
                    runs["train"][name].append(t)
                for p in (cache, run_dir):
                    subprocess.run(["rm", "-rf", str(p)], check=True)

    med = {cmd: {k: {m: statistics.median(x[m] for x in v) for m in ("wall_s", "peak_rss", "peak_pss")}
                 for k, v in by.items()} for cmd, by in runs.items()}
    result_rows, marginal, mem = [], {}, {}
    for cmd, by in med.items():
        t = {k: v["wall_s"] for k, v in by.items()}
        marginal[cmd] = (t["4N"] - t["N"]) / (t["16N"] - t["4N"]) if t["16N"] != t["4N"] else float("nan")
        per_round = [(a["wall_s"], b["wall_s"], c["wall_s"]) for a, b, c in
                     zip(runs[cmd]["N"], runs[cmd]["4N"], runs[cmd]["16N"], strict=True)]
        marginal_spread = spread([(b - a) / (c - b) for a, b, c in per_round if c != b])
        best = {k: min(x["wall_s"] for x in runs[cmd][k]) for k in sizes}  # interference only adds time
        marginal[f"{cmd}_best"] = (best["4N"] - best["N"]) / (best["16N"] - best["4N"]) if best["16N"] != best["4N"] \
            else float("nan")
        mem[cmd] = by["16N"]["peak_rss"] / by["N"]["peak_rss"]
        for k in sizes:
            result_rows.append([cmd, k, sizes[k], f"{by[k]['wall_s']:.2f}", f"{by[k]['peak_rss'] / 2**20:.0f}",
                                f"{by[k]['peak_pss'] / 2**20:.0f}" if by[k]["peak_pss"] else "-",
                                f"{sizes[k] / by[k]['wall_s']:.0f}"])
        marginal[f"{cmd}_spread"] = marginal_spread
    table = md_table(["command", "size", "samples", "wall s", "peak tree RSS MiB", "peak tree PSS MiB",
                      "samples/s (incl. start-up)"], result_rows)
    rtable = md_table(["ratio", "build", "train"], [
        ["(t(4N) - t(N)) ÷ (t(16N) - t(4N)), linear = 0.25", f"{marginal['build']:.3f}", f"{marginal['train']:.3f}"],
        ["the same from each size's fastest round", f"{marginal['build_best']:.3f}", f"{marginal['train_best']:.3f}"],
        ["peak RSS(16N) ÷ peak RSS(N), flat = 1", f"{mem['build']:.3f}", f"{mem['train']:.3f}"],
    ])
    targets = []
    for cmd in ("build", "train"):
        targets.append(target(f"{cmd}: marginal cost ratio (linear = 0.25)", marginal[cmd], "≈", 0.25,
                              "below: worse than linear; above: the small sizes cost more than their share (noise "
                              "or per-run costs not cancelled)", tol=0.1))
        targets.append(target(f"{cmd}: peak tree RSS 16N ÷ N", mem[cmd], "<=", 1.2, "flat memory"))
    header = (f"N = {args.n} ({args.n // per} shard(s) of {per} {args.image_size[0]}x{args.image_size[1]} JPEGs), "
              f"tiny ViT teacher, {args.student} 1 epoch, batch {args.batch_size}, train workers {args.workers}, "
              f"{machine_note()}; medians of {args.repeats} rotated round(s)"
              f"{'' if args.no_warmup else ' after a discarded warm-up'}")
    result = {"bench": "scaling", "quick": args.quick, "header": header, "sizes": sizes, "runs": runs,
              "medians": med, "marginal_ratio": marginal, "memory_ratio": mem,
              "table": table + "\n\n" + rtable, "targets": targets}
    write_result(args.out, result)
    print(header)
    print(table)
    print()
    print(rtable)
    print()
    print(targets_table(targets))
    return result


if __name__ == "__main__":
    main()
