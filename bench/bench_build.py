"""Build throughput vs. the same work done by hand, measured side by side in one run (ratios, not seconds).

    python bench/bench_build.py --quick                  # tiny CPU smoke: ViT-B-32 (random init), 24 JPEGs, ~40 s
    python bench/bench_build.py                          # ViT-B-32 (random init), 192 synthetic 256-512 px JPEGs
    python bench/bench_build.py --n-images 384 --repeats 5          # "a few hundred images", on a quiet machine
    python bench/bench_build.py --teacher local-dir:../shared/teachers/kdc-cifar10-rn18 \
        --images ../shared/data/cifar10/cifar10-train-000.tar --limit 2048    # small real teacher, real data
    python bench/bench_build.py --device cuda --precision fp16 --workers 8 --n-images 4096   # the GPU target
    python bench/bench_build.py --whole-process [--load]     # separate processes, marginal cost per image (see
                                                             # bench/bench_build_process.py)

Configurations (each one loads its own teacher, in the same way, inside its timed region; each also embeds the
shards' paired captions (.txt) with the text tower when there are any, as the build does — the synthetic shards have
none, CIFAR-10's do):
  kdcache  `kdcache build` (BuildConfig + run) writing a real cache: decode, views, teacher, top-k, zstd, zarr
  serial   one process: the same decode + eval transform (+ views) + teacher forwards in the same batches, no writes
  naive    what a user would write: PIL open + open_clip preprocess + encode_image/encode_text + np.save per batch
  forward  the bare teacher forwards on pre-decoded uint8 tensors and pre-tokenised captions: the compute floor

Measurement: a short warm-up round (one batch per configuration, discarded), then `--repeats` rounds, each running
every configuration once in a rotated order (A B C D, B C D A, ...) so none always runs first or last. Each
configuration's images/s excludes its teacher load (timed separately, identical work in all four); ratios are taken
within a round (paired) and summarised as median [min-max] over rounds. CPU seconds (user+sys, this process and its
workers) are shown beside wall seconds: if the machine is busy, wall ratios move and CPU ratios much less.
Ratios > 1 mean kdcache is faster. On a CPU, decode shares the cores with the teacher (no DataLoader worker helps on
2 cores), so kdcache ÷ forward < 1 by the decode share there; the issue's ≥ 0.95 for it is a GPU target.

Also the helpers the other bench scripts share (interleaved timing, spreads, targets, Markdown tables).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# ------------------------------------------------------------------------------------- helpers shared by bench/*.py


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (DataLoader workers, subprocesses)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def interleaved(configs: dict[str, Callable[[], dict]], *, repeats: int, warmup: dict[str, Callable[[], dict]] | None
                = None, log=sys.stderr) -> dict[str, list[dict]]:
    """Run every configuration once per round, rounds rotated (A B C, B C A, C A B, ...), after a discarded warm-up
    round. Each call returns a dict with at least "n" (items processed) and optionally "setup_s" (start-up inside the
    timed region, e.g. a model load). Returns per configuration one record per round: wall_s, cpu_s, n, rate (n per
    second of wall time excluding setup_s), and whatever the call returned."""
    names = list(configs)
    for name, fn in (warmup or {}).items():
        t0 = time.perf_counter()
        fn()
        print(f"  warm-up  {name:12s} {time.perf_counter() - t0:7.2f} s (discarded)", file=log, flush=True)
    out: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            c0, t0 = cpu_seconds(), time.perf_counter()
            res = configs[name]()
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            setup = float(res.get("setup_s", 0.0))
            rec = {**res, "wall_s": wall, "cpu_s": cpu, "rate": res["n"] / max(wall - setup, 1e-9), "round": r}
            out[name].append(rec)
            print(f"  round {r}  {name:12s} {wall:7.2f} s wall {cpu:7.2f} s cpu  {rec['rate']:9.1f} /s  "
                  f"(n={res['n']}, setup {setup:.2f} s)", file=log, flush=True)
    return out


def spread(xs: list[float]) -> dict:
    """Median with the min and max beside it (what every table prints)."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def paired_ratio(runs: dict[str, list[dict]], a: str, b: str, key: str = "rate") -> dict:
    """a ÷ b computed within each round (the two ran back to back), then summarised over rounds."""
    return spread([x[key] / y[key] for x, y in zip(runs[a], runs[b], strict=True)])


def best_ratio(runs: dict[str, list[dict]], a: str, b: str, key: str = "rate") -> float:
    """a ÷ b of each configuration's best round (highest rate): interference only ever slows a run down, so the best
    round is the one least disturbed. Printed beside the paired median as a check on it."""
    return max(x[key] for x in runs[a]) / max(y[key] for y in runs[b])


def fmt_spread(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def target(name: str, value: float | None, op: str, bound: float, note: str = "", *, judged: bool = True,
           tol: float = 0.0) -> dict:
    """One target of the issue: value op bound, op ">=", "<=" or "≈" (|value - bound| <= tol). judged=False records
    it without a verdict (e.g. a GPU target measured on a CPU)."""
    if op not in (">=", "<=", "≈"):
        raise ValueError(f"op must be >=, <= or ≈, got {op!r}")
    met = None
    if judged and value is not None and value == value:  # NaN: no verdict
        met = bool({">=": value >= bound, "<=": value <= bound, "≈": abs(value - bound) <= tol}[op])
    wanted = f"≈ {bound:g} ± {tol:g}" if op == "≈" else f"{op} {bound:g}"
    return {"name": name, "value": value, "target": wanted, "met": met, "note": note}


def md_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table; numbers right-aligned."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    body = [[cell(v) for v in r] for r in rows]
    align = ["---:" if rows and isinstance(rows[0][i], (int, float)) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def fmt_value(v: float, fmt: str) -> str:
    """`v` in format `fmt`, except values in (0.99, 1) (cosines, agreements), which get 6 significant digits: fewer
    would round them all to 1."""
    return f"{v:.6g}" if 0.99 < v < 1 else format(v, fmt)


def targets_table(targets: list[dict]) -> str:
    verdict = {True: "met", False: "NOT met", None: "not judged here"}
    return md_table(["target", "value", "wanted", "verdict", "note"],
                    [[t["name"], "-" if t["value"] is None else fmt_value(t["value"], ".3f"), t["target"],
                      verdict[t["met"]], t["note"]] for t in targets])


def write_result(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {path}", file=sys.stderr)


def machine_note() -> str:
    return f"{os.cpu_count()} cores, torch {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------------------------------- the bench


def synth_jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A photo-like w x h JPEG (smooth noise + an ellipse), so decode costs what it costs on real data."""
    from PIL import Image, ImageDraw

    base = rng.integers(0, 255, size=(h // 8, w // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=tuple(rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def synth_shards(out: Path, n: int, per_shard: int, seed: int = 0) -> list[str]:
    """Real-sized JPEGs (256-512 px, `synth_jpeg`) in `n` shards of `per_shard`."""
    from kdcache.synth import write_tar

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n):
        members = []
        for i in range(per_shard):
            w, h = (int(x) for x in rng.integers(256, 513, size=2))
            key = f"{s:05d}{i:04d}"
            members += [(f"{key}.jpg", synth_jpeg(rng, w, h)), (f"{key}.cls", str(i % 10).encode())]
        paths.append(write_tar(out / f"bench-{s:05d}.tar", members))
    return paths


def _load(spec: str, pretrained, allow_random: bool, device: str, precision: str):
    from kdcache.teacher import load_teacher

    t0 = time.perf_counter()
    teacher = load_teacher(spec, pretrained=pretrained, allow_random_init=allow_random, device=device,
                           precision=precision)
    return teacher, time.perf_counter() - t0


def serial_loop(spec: str, pretrained, urls: list[str], *, views: int, batch_size: int, limit: int | None,
                allow_random: bool, device: str = "cpu", precision: str = "fp32") -> dict:
    """The same teacher load, decode + preprocess + forward as the build, batched the same way, in one process, no
    writes: images (and views) in batches that never cross a shard; a shard's paired captions (.txt/.json) through the
    text tower after it, as the build embeds them."""
    from kdcache.shards import ShardReport, iter_shard, parse_sample
    from kdcache.views import eval_transform_uint8, random_view, render_view

    teacher, setup = _load(spec, pretrained, allow_random, device, precision)
    eval_tf = eval_transform_uint8(teacher.preprocess)
    size, interp = tuple(teacher.preprocess["size"]), teacher.preprocess["interpolation"]
    n, pending = 0, []
    for si, url in enumerate(urls):
        report = ShardReport(url=url)
        captions = []
        for raw in iter_shard(url, report):
            if limit is not None and n >= limit:
                break
            s = parse_sample(raw, max_pixels=89_478_485)
            if s.caption:
                captions.append(s.caption)
            w, h = s.image.size
            pending.append(eval_tf(s.image))
            for v in range(1, views):
                box, flip = random_view(width=w, height=h, seed=0, shard=si, position=raw.position, view=v)
                pending.append(render_view(s.image, box, flip, size=size, interpolation=interp))
            n += 1
            while len(pending) >= batch_size:
                teacher.encode_images(torch.stack(pending[:batch_size]))
                del pending[:batch_size]
        if pending:  # batches never cross a shard, as in the build
            teacher.encode_images(torch.stack(pending))
            pending = []
        for i in range(0, len(captions), batch_size):
            teacher.encode_texts(captions[i:i + batch_size])
    return {"n": n, "setup_s": setup}


def naive_loop(spec: str, pretrained, urls: list[str], out: Path, *, batch_size: int, limit: int | None,
               device: str = "cpu") -> dict:
    """What a user would write with stock open_clip: PIL + preprocess + encode_image + np.save (and, for captioned
    shards, tokenizer + encode_text + np.save)."""
    import tarfile

    import open_clip
    from PIL import Image

    t0 = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(spec, pretrained=pretrained, device=device)
    tokenizer = open_clip.get_tokenizer(spec)
    model.eval()
    setup = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    n, batch, texts, k = 0, [], [], 0

    def flush_images():
        nonlocal batch, k
        np.save(out / f"img{k}.npy", model.encode_image(torch.stack(batch).to(device), normalize=True).cpu().numpy())
        batch, k = [], k + 1

    def flush_texts():
        nonlocal texts, k
        np.save(out / f"txt{k}.npy", model.encode_text(tokenizer(texts).to(device), normalize=True).cpu().numpy())
        texts, k = [], k + 1

    with torch.no_grad():
        for url in urls:
            with tarfile.open(url) as tf:
                for m in tf:
                    if m.name.endswith(".txt"):
                        texts.append(tf.extractfile(m).read().decode("utf-8").strip())
                        if len(texts) == batch_size:
                            flush_texts()
                        continue
                    if not m.name.endswith(".jpg"):
                        continue
                    if limit is not None and n >= limit:
                        break
                    batch.append(preprocess(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
                    n += 1
                    if len(batch) == batch_size:
                        flush_images()
        if batch:
            flush_images()
        if texts:
            flush_texts()
    return {"n": n, "setup_s": setup}


def predecode(spec: str, pretrained, urls: list[str], *, limit: int | None,
              allow_random: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every image through the teacher's uint8 eval transform and every paired caption through the tokenizer, before
    timing: the inputs of the `forward` config."""
    from kdcache.shards import ShardReport, iter_shard, parse_sample
    from kdcache.teacher import load_teacher
    from kdcache.views import eval_transform_uint8

    teacher = load_teacher(spec, pretrained=pretrained, allow_random_init=allow_random)
    eval_tf = eval_transform_uint8(teacher.preprocess)
    px, captions = [], []
    for url in urls:
        for raw in iter_shard(url, ShardReport(url=url)):
            if limit is not None and len(px) >= limit:
                break
            s = parse_sample(raw, max_pixels=89_478_485)
            px.append(eval_tf(s.image))
            if s.caption:
                captions.append(s.caption)
    return torch.stack(px), (teacher.tokenizer(captions) if captions else None)


def bare_forward(spec: str, pretrained, pixels: torch.Tensor, tokens: torch.Tensor | None, *, batch_size: int,
                 allow_random: bool, device: str = "cpu", precision: str = "fp32") -> dict:
    """Teacher load, then only the forwards: `Teacher.encode_images` over pre-decoded uint8 batches (pinned when on
    CUDA) and the text tower over pre-tokenised captions (normalised, as `Teacher.encode_texts` does)."""
    teacher, setup = _load(spec, pretrained, allow_random, device, precision)
    for i in range(0, len(pixels), batch_size):
        teacher.encode_images(pixels[i:i + batch_size])
    if tokens is not None:
        with torch.inference_mode(), teacher.autocast():
            for i in range(0, len(tokens), batch_size):
                torch.nn.functional.normalize(teacher.model.encode_text(tokens[i:i + batch_size].to(teacher.device))
                                              .float(), dim=-1).cpu()
    return {"n": len(pixels), "setup_s": setup}


def kdcache_build(spec: str, pretrained, urls: list[str], out: str, *, views: int, batch_size: int, workers: int,
                  threads: int | None, limit: int | None, allow_random: bool, device: str = "cpu",
                  precision: str = "fp32", augment: str | None = None) -> dict:
    """`kdcache build` through its Python API; the teacher load inside it is timed by wrapping load_teacher (the
    build imports it at call time), so its images/s excludes the same start-up as the other configurations."""
    import kdcache.teacher as teacher_mod
    from kdcache.cache.build import run
    from kdcache.cache.config import BuildConfig

    original, setup = teacher_mod.load_teacher, []

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            setup.append(time.perf_counter() - t0)

    teacher_mod.load_teacher = timed
    try:
        res = run(BuildConfig(out=out, teacher=spec, images=tuple(urls), pretrained=pretrained,
                              allow_random_init=allow_random, views=views, batch_size=batch_size, workers=workers,
                              threads=threads, limit=limit, device=device, precision=precision, augment=augment,
                              progress=False))
    finally:
        teacher_mod.load_teacher = original
    return {"n": res.summary["images"], "setup_s": sum(setup)}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--whole-process" in argv:  # the marginal whole-process cost against a naive script: bench_build_process.py
        from bench_build_process import main as whole_process

        return whole_process([a for a in argv if a != "--whole-process"])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--whole-process", action="store_true",
                    help="kdcache build and a naive script as separate processes, marginal cost per image "
                         "(bench/bench_build_process.py; its options follow)")
    ap.add_argument("--teacher", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--images", nargs="*", default=None, help="shards (default: synthetic 256-512 px JPEGs)")
    ap.add_argument("--n-images", type=int, default=192, help="synthetic images (split over 3 shards)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images of --images")
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="kdcache build DataLoader workers")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every configuration")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="24 images, batch 8, 2 rounds: a smoke run")
    ap.add_argument("--out", default="bench/results/build.json")
    args = ap.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(n_images=24, batch_size=8, repeats=2)
        args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec, pre, dev, prec = args.teacher, args.pretrained, args.device, args.precision
    allow_random = pre is None and not spec.startswith(("local-dir:", "hf-hub:"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.images:
            from kdcache.shards import expand_urls

            urls = expand_urls(args.images)
        else:
            urls = synth_shards(tmp / "shards", 3, max(1, -(-args.n_images // 3)))
        limit, bs, k = args.limit, args.batch_size, iter(range(10**6))
        pixels, tokens = predecode(spec, pre, urls, limit=limit, allow_random=allow_random)
        if dev.startswith("cuda"):
            pixels = pixels.pin_memory()
        build_kw = {"views": args.views, "batch_size": bs, "workers": args.workers, "threads": args.threads,
                    "allow_random": allow_random, "device": dev, "precision": prec}
        configs = {
            "kdcache": lambda: kdcache_build(spec, pre, urls, str(tmp / f"c{next(k)}.zarr"), limit=limit, **build_kw),
            "serial": lambda: serial_loop(spec, pre, urls, views=args.views, batch_size=bs, limit=limit,
                                          allow_random=allow_random, device=dev, precision=prec),
            "naive": lambda: naive_loop(spec, pre, urls, tmp / f"n{next(k)}", batch_size=bs, limit=limit, device=dev),
            "forward": lambda: bare_forward(spec, pre, pixels, tokens, batch_size=bs, allow_random=allow_random,
                                            device=dev, precision=prec),
        }
        # Warm-up (imports, allocator, page cache, MKL/oneDNN kernels): one batch each, discarded.
        warm = {
            "kdcache": lambda: kdcache_build(spec, pre, urls[:1], str(tmp / "w.zarr"), limit=bs,
                                             **{**build_kw, "workers": 0}),
            "serial": lambda: serial_loop(spec, pre, urls[:1], views=args.views, batch_size=bs, limit=bs,
                                          allow_random=allow_random, device=dev, precision=prec),
            "naive": lambda: naive_loop(spec, pre, urls[:1], tmp / "wn", batch_size=bs, limit=bs, device=dev),
            "forward": lambda: bare_forward(spec, pre, pixels[:bs], None if tokens is None else tokens[:bs],
                                            batch_size=bs, allow_random=allow_random, device=dev, precision=prec),
        }
        runs = interleaved(configs, repeats=args.repeats, warmup=warm)
    n = runs["kdcache"][0]["n"]
    cpu_note = ("" if dev.startswith("cuda") else
                f"On this CPU ({machine_note()}) decode shares the cores with the teacher, so kdcache ÷ forward "
                "falls short of 1 by the decode share; the ≥ 0.95 target for it is a GPU target, not judged here.")
    ratios = {f"kdcache/{b}": paired_ratio(runs, "kdcache", b) for b in ("serial", "naive", "forward")}
    cpu_ratios = {f"kdcache/{b}": paired_ratio(runs, b, "kdcache", key="cpu_s") for b in ("serial", "naive", "forward")}
    rows = []
    for name, rs in runs.items():
        rate, wall, cpu = spread([r["rate"] for r in rs]), spread([r["wall_s"] for r in rs]), spread(
            [r["cpu_s"] for r in rs])
        ratio = "1" if name == "kdcache" else fmt_spread(ratios[f"kdcache/{name}"])
        best = "1" if name == "kdcache" else f"{best_ratio(runs, 'kdcache', name):.3f}"
        cratio = "1" if name == "kdcache" else fmt_spread(cpu_ratios[f"kdcache/{name}"])
        rows.append([name, fmt_spread(rate, 1), fmt_spread(wall, 2), fmt_spread(cpu, 2),
                     f"{statistics.median(r['setup_s'] for r in rs):.2f}", ratio, best, cratio])
    table = md_table(["config", "images/s (excl. load)", "wall s", "CPU s", "load s", "kdcache ÷ config (paired)",
                      "best ÷ best", "config CPU s ÷ kdcache CPU s"], rows)
    on_gpu = dev.startswith("cuda")
    targets = [
        target("build ÷ serial loop", ratios["kdcache/serial"]["median"], ">=", 0.95,
               "only writing, compression, batching and Python overhead are charged to kdcache"),
        target("build ÷ naive loop", ratios["kdcache/naive"]["median"], ">=", 1.0),
        target("build ÷ bare teacher forward (GPU target)", ratios["kdcache/forward"]["median"], ">=", 0.95,
               "" if on_gpu else "CPU: decode shares the cores", judged=on_gpu),
    ]
    n_caps = 0 if tokens is None else len(tokens)
    header = (f"teacher {spec} ({'random init' if allow_random else pre or 'weights'}), {n} images x {args.views} "
              f"view(s) + {n_caps} paired captions, batch {bs}, kdcache workers {args.workers}, {dev} {prec}, "
              f"{machine_note()}; "
              f"median [min-max] of {args.repeats} rotated rounds after a warm-up round")
    result = {
        "bench": "build", "quick": args.quick, "header": header, "teacher": spec, "images": n, "captions": n_caps,
        "views": args.views,
        "batch_size": bs, "workers": args.workers, "device": dev, "precision": prec,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "runs": runs,
        "images_per_s": {k: spread([r["rate"] for r in v]) for k, v in runs.items()},
        "ratios_wall": ratios, "ratios_cpu": cpu_ratios,
        "ratios_best": {f"kdcache/{b}": best_ratio(runs, "kdcache", b) for b in ("serial", "naive", "forward")},
        "ratio_kdcache_over_serial": ratios["kdcache/serial"]["median"],
        "ratio_kdcache_over_naive": ratios["kdcache/naive"]["median"],
        "ratio_kdcache_over_forward": ratios["kdcache/forward"]["median"],
        "notes": [cpu_note] if cpu_note else [], "table": table, "targets": targets,
    }
    write_result(args.out, result)
    print(header)
    print(table)
    print()
    print(targets_table(targets))
    if cpu_note:
        print("\n" + cpu_note)
    return result


if __name__ == "__main__":
    main()
