"""`kdcache build` against a naive script, each as its own Python process: the marginal whole-process cost per image.

    python bench/bench_build.py --whole-process              # quiet machine, 2 rounds: ~6 min on 2 cores
    python bench/bench_build.py --whole-process --load       # one busy process on the cores: ~10 min
    python bench/bench_build_process.py --load both          # quiet, then loaded: ~16 min
    python bench/bench_build_process.py --quick              # smoke: 64 and 128 images, 1 round, ~2 min

Both run as subprocesses on the same JPEGs (320 px, shards of 128) with the same teacher (ViT-B-32, random init
saved once as an open_clip local-dir checkpoint, so both load real weights from disk, in the same way):
  naive    a separate Python script, what a user would write: open_clip create_model_and_transforms, PIL decode +
           the model's preprocess, encode_image in batches of 64, normalise, np.save per batch
  kdcache  `kdcache build --views 1 --batch-size 64` writing a real cache
Each runs on the first `--small` images (256) and on all `--large` images (768), so its marginal cost per image is
(t_large - t_small) / (large - small): process start, imports, model load and the first (slow) batches cancel, and
what is left is what each extra image costs, which is what a long build pays. naive ÷ kdcache of that marginal cost
(> 1: kdcache is cheaper per image) is taken within a round and summarised as median [min-max] over rounds. Every
round runs the four processes in a rotated order, after a discarded warm-up run of each small one (page cache, .pyc
files).

Why this and the in-process bench (`bench/bench_build.py`) can disagree: in-process, every configuration shares one
warm interpreter (imports done, oneDNN kernels primed, allocator warm) and images/s is a whole run's minus its model
load; here each process pays its own start-up, which the marginal cost removes, and nothing else is shared.
`--load` runs one busy process (a Python loop) on the cores during every timed run: torch's OpenMP threads (one per
core, in both processes) then wait at every barrier for a sibling the busy process displaced, and any other thread
of the build that runs beside the forward (a writer thread, zarr's I/O and compression threads) makes that worse.
CPU seconds are printed beside wall seconds: equal CPU per image with unequal wall time means the difference is
time when not every core works (serial steps, stalls), not extra work.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NAIVE_SCRIPT = r'''
import io, sys, tarfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

teacher, out, shards = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
model, _, preprocess = open_clip.create_model_and_transforms(teacher)
model.eval()
out.mkdir(parents=True, exist_ok=True)
batch, k = [], 0


def flush():
    global batch, k
    with torch.no_grad():
        emb = model.encode_image(torch.stack(batch))
    np.save(out / f"emb{k:05d}.npy", torch.nn.functional.normalize(emb, dim=-1).numpy())
    batch, k = [], k + 1


for shard in shards:
    with tarfile.open(shard) as tf:
        for m in tf:
            if m.name.endswith(".jpg"):
                batch.append(preprocess(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
                if len(batch) == 64:
                    flush()
if batch:
    flush()
'''

BUSY = "while True: pass"


def make_teacher(path: Path, name: str = "ViT-B-32", seed: int = 0) -> str:
    """`name` with seeded random weights, saved as an open_clip local-dir (config + safetensors); returns its spec."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = open_clip.get_model_config(name)
    pre = {"size": cfg["vision_cfg"]["image_size"], "mean": list(open_clip.OPENAI_DATASET_MEAN),
           "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return f"local-dir:{path}"


def make_shards(out: Path, n: int, per_shard: int, px: int, seed: int = 0) -> list[str]:
    """n photo-like JPEGs of px x px (smooth noise + a shape), per_shard to a tar, each with a .cls."""
    from PIL import Image, ImageDraw

    from kdcache.synth import write_tar

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(-(-n // per_shard)):
        members = []
        for i in range(min(per_shard, n - s * per_shard)):
            img = Image.fromarray(rng.integers(0, 255, size=(px // 8, px // 8, 3), dtype=np.uint8)).resize(
                (px, px), Image.BICUBIC)
            ImageDraw.Draw(img).ellipse([px // 4, px // 4, 3 * px // 4, 3 * px // 4],
                                        fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            members += [(f"{s:05d}{i:04d}.jpg", buf.getvalue()), (f"{s:05d}{i:04d}.cls", str(i % 10).encode())]
        paths.append(write_tar(out / f"bench-{s:05d}.tar", members))
    return paths


def timed_process(argv: list[str], env: dict | None = None) -> dict:
    """Run argv to completion; its wall seconds and its CPU seconds (user + sys, from wait4)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed ({p.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime}


def run_rounds(cmds: dict, rounds: int, *, load: bool, warmup: list[str], env: dict | None = None,
               log=sys.stderr) -> dict:
    """Every command once per round, rotated, after a discarded warm-up run of each `warmup` command; with load, one
    busy process runs on the cores during each command (started before it, stopped after it)."""
    names, out = list(cmds), {k: [] for k in cmds}
    for r in range(-1, rounds):
        order = names[r % len(names):] + names[:r % len(names)] if r >= 0 else warmup
        for name in order:
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load else None
            try:
                rec = timed_process(cmds[name](), env)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            print(f"  {'warm-up' if r < 0 else f'round {r}':8s} {name:14s} {rec['wall_s']:7.2f} s wall "
                  f"{rec['cpu_s']:7.2f} s cpu  (load average {os.getloadavg()[0]:.2f})", file=log, flush=True)
            if r >= 0:
                out[name].append(rec)
    return out


def marginal(runs: dict[str, list[dict]], who: str, small: int, large: int, key: str = "wall_s") -> list[float]:
    """Per round: seconds per extra image, (t_large - t_small) / (large - small)."""
    return [(b[key] - a[key]) / (large - small) for a, b in zip(runs[f"{who}-{small}"], runs[f"{who}-{large}"],
                                                                   strict=True)]


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt(s: dict, d: int = 3) -> str:
    return f"{s['median']:.{d}f} [{s['min']:.{d}f}-{s['max']:.{d}f}]"


def measure(tmp: Path, args, *, load: bool) -> dict:
    """One phase (quiet or loaded): the rounds, and the marginal costs and ratios they give."""
    small, large, px, per = args.small, args.large, args.px, args.per_shard
    shards = make_shards(tmp / "shards", large, per, px) if not (tmp / "shards").exists() else \
        sorted(str(p) for p in (tmp / "shards").glob("*.tar"))
    teacher = f"local-dir:{tmp / 'teacher'}" if (tmp / "teacher").exists() else make_teacher(tmp / "teacher")
    script = tmp / "naive.py"
    script.write_text(NAIVE_SCRIPT)
    n_small = -(-small // per)
    k = iter(range(10**6))
    kd = [str(Path(sys.executable).parent / "kdcache")]  # the console script of this environment

    def build(sh):
        return lambda: [*kd, "build", "--teacher", teacher, "--views", "1", "--batch-size", "64", "--no-progress",
                        *[a for s in sh for a in ("--images", s)], "--out", str(tmp / f"c{next(k)}.zarr"),
                        *args.kdcache_arg]

    def naive(sh):
        return lambda: [sys.executable, str(script), teacher, str(tmp / f"n{next(k)}"), *sh]

    cmds = {f"naive-{small}": naive(shards[:n_small]), f"kdcache-{small}": build(shards[:n_small]),
            f"naive-{large}": naive(shards), f"kdcache-{large}": build(shards)}
    print(f"{'loaded (one busy process)' if load else 'quiet'}: {len(shards)} shards of {per} JPEGs of {px} px",
          file=sys.stderr)
    env = None if args.threads is None else {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs = run_rounds(cmds, args.rounds, load=load, env=env, warmup=[f"naive-{small}", f"kdcache-{small}"])
    res = {"load": load, "runs": runs}
    for key in ("wall_s", "cpu_s"):
        mn, mk = marginal(runs, "naive", small, large, key), marginal(runs, "kdcache", small, large, key)
        res[key] = {"naive_ms_per_image": spread([1e3 * x for x in mn]),
                    "kdcache_ms_per_image": spread([1e3 * x for x in mk]),
                    "naive_over_kdcache": spread([a / b for a, b in zip(mn, mk, strict=True)])}
    res["start_s"] = {w: spread([r[f"{w}-{small}"]["wall_s"] - small * m for r, m in
                                 zip(({n: runs[n][i] for n in runs} for i in range(args.rounds)),
                                     marginal(runs, w, small, large), strict=True)]) for w in ("naive", "kdcache")}
    return res


def report(res: dict, args) -> str:
    w, c = res["wall_s"], res["cpu_s"]
    lines = [f"### {'with one busy process on the cores' if res['load'] else 'quiet'}",
             f"marginal cost per image, {args.large} - {args.small} images, median [min-max] of {args.rounds} rounds",
             "| | naive ms/img | kdcache ms/img | naive ÷ kdcache | start-up s naive / kdcache |",
             "|---|---:|---:|---:|---:|",
             f"| wall | {fmt(w['naive_ms_per_image'], 1)} | {fmt(w['kdcache_ms_per_image'], 1)} | "
             f"{fmt(w['naive_over_kdcache'])} | {res['start_s']['naive']['median']:.2f} / "
             f"{res['start_s']['kdcache']['median']:.2f} |",
             f"| CPU | {fmt(c['naive_ms_per_image'], 1)} | {fmt(c['kdcache_ms_per_image'], 1)} | "
             f"{fmt(c['naive_over_kdcache'])} | |"]
    target = 0.95 if res["load"] else 1.0
    ok = w["naive_over_kdcache"]["median"] >= target
    lines.append(f"target naive ÷ kdcache (wall) >= {target}: {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=256)
    ap.add_argument("--large", type=int, default=768)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--px", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--load", nargs="?", const="yes", default="no", choices=("no", "yes", "both"),
                    help="one busy process on the cores during the runs; 'both': a quiet phase, then a loaded one")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of both processes (OMP_NUM_THREADS)")
    ap.add_argument("--kdcache-arg", action="append", default=[], help="extra `kdcache build` argument (repeatable)")
    ap.add_argument("--out", default="bench/results/build_process.json")
    ap.add_argument("--quick", action="store_true", help="64 and 128 images in shards of 64, 1 round: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(small=64, large=128, per_shard=64, rounds=1)
        args = ap.parse_args(argv)
    if args.small % args.per_shard or args.large % args.per_shard or args.small >= args.large:
        ap.error("--small < --large, both multiples of --per-shard (runs take whole shards)")
    phases = {"no": [False], "yes": [True], "both": [False, True]}[args.load]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(Path(tmp), args, load=lo) for lo in phases]
    text = "\n\n".join(report(r, args) for r in results)
    header = (f"`kdcache build` vs a naive script as separate processes: ViT-B-32 (random init, local-dir), "
              f"{args.px} px JPEGs, shards of {args.per_shard}, batch 64, views 1, {os.cpu_count()} cores; "
              f"{time.perf_counter() - t0:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"bench": "build_process", "header": header, "phases": results,
                                          "table": text}, indent=2))
    print(header + "\n\n" + text)
    return {"phases": results}


if __name__ == "__main__":
    main()
