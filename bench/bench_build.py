"""Build throughput vs. the same work done by hand, measured side by side in one run (ratios, not seconds).

    python bench/bench_build.py                       # ViT-B-32 (random init), 192 synthetic 256-512 px JPEGs
    python bench/bench_build.py --teacher RN50 --images 'x/{0..3}.tar' --repeats 3
    python bench/bench_build.py --teacher local-dir:../shared/teachers/kdc-cifar10-rn18 \
        --images '../shared/data/cifar10/cifar10-test-000.tar' --limit 2000     # small real teacher, real data

Configurations, interleaved A B C A B C … with the median of each reported:
  kdcache  `kdcache build` (BuildConfig + run) writing a real cache
  serial   one process: decode + eval transform (+ views) + teacher forward in the same batches; nothing written
  naive    what a user would write: PIL open + open_clip preprocess + encode_image + np.save per batch
Ratios > 1 mean kdcache is faster. On 2 CPU cores decode and teacher share the cores, so the GPU target
(kdcache ÷ bare teacher forward ≥ 0.95) is not measurable here.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.cache.build import BuildConfig, run
from kdcache.cache.sources import ShardReport, expand_urls, iter_shard, parse_sample
from kdcache.cache.teacher import load_teacher
from kdcache.cache.views import eval_transform_uint8, random_view, render_view


def synth_shards(out: Path, n: int, per_shard: int, seed: int = 0) -> list[str]:
    """Real-sized JPEGs (256-512 px, photo-like noise + shapes) so decode costs what it costs on real data."""
    from PIL import Image, ImageDraw

    from kdcache.synth import write_tar

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n):
        members = []
        for i in range(per_shard):
            w, h = (int(x) for x in rng.integers(256, 513, size=2))
            base = rng.integers(0, 255, size=(h // 8, w // 8, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
            ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=tuple(rng.integers(0, 255, 3)))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            key = f"{s:05d}{i:04d}"
            members += [(f"{key}.jpg", buf.getvalue()), (f"{key}.cls", str(i % 10).encode())]
        paths.append(write_tar(out / f"bench-{s:05d}.tar", members))
    return paths


def serial_loop(spec: str, pretrained, urls: list[str], *, views: int, batch_size: int, limit: int | None,
                allow_random: bool) -> int:
    """The same teacher load, decode + preprocess + forward as the build, batched the same way, in one process, no
    writes."""
    teacher = load_teacher(spec, pretrained=pretrained, allow_random_init=allow_random)
    eval_tf = eval_transform_uint8(teacher.preprocess)
    size, interp = tuple(teacher.preprocess["size"]), teacher.preprocess["interpolation"]
    n, pending = 0, []
    for si, url in enumerate(urls):
        report = ShardReport(url=url)
        for raw in iter_shard(url, report):
            if limit is not None and n >= limit:
                break
            s = parse_sample(raw, max_pixels=89_478_485)
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
    return n


def naive_loop(spec: str, pretrained, urls: list[str], out: Path, *, batch_size: int, limit: int | None) -> int:
    """What a user would write with stock open_clip: PIL + preprocess + encode_image + np.save."""
    import tarfile

    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(spec, pretrained=pretrained)
    model.eval()
    n, batch, k = 0, [], 0
    with torch.no_grad():
        for url in urls:
            with tarfile.open(url) as tf:
                for m in tf:
                    if not m.name.endswith(".jpg"):
                        continue
                    if limit is not None and n >= limit:
                        break
                    batch.append(preprocess(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
                    n += 1
                    if len(batch) == batch_size:
                        np.save(out / f"{k}.npy", model.encode_image(torch.stack(batch), normalize=True).numpy())
                        batch, k = [], k + 1
        if batch:
            np.save(out / f"{k}.npy", model.encode_image(torch.stack(batch), normalize=True).numpy())
    return n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--images", nargs="*", default=None, help="shards (default: synthetic 256-512 px JPEGs)")
    ap.add_argument("--n-images", type=int, default=192, help="synthetic images (split over 3 shards)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/build.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        urls = expand_urls(args.images) if args.images else synth_shards(tmp / "shards", 3, args.n_images // 3)
        allow_random = args.pretrained is None and not args.teacher.startswith(("local-dir:", "hf-hub:"))
        times: dict[str, list[float]] = {"kdcache": [], "serial": [], "naive": []}
        counts = {}
        serial_loop(args.teacher, args.pretrained, urls[:1], views=args.views, batch_size=args.batch_size,
                    limit=args.batch_size, allow_random=allow_random)  # warm-up: imports, allocator, page cache
        for r in range(args.repeats):
            for name in times:
                t0 = time.perf_counter()
                if name == "kdcache":
                    res = run(BuildConfig(out=str(tmp / f"c{r}.zarr"), teacher=args.teacher, images=tuple(urls),
                                          pretrained=args.pretrained, allow_random_init=allow_random,
                                          views=args.views, batch_size=args.batch_size, limit=args.limit,
                                          progress=False))
                    counts[name] = res.summary["images"]
                elif name == "serial":
                    counts[name] = serial_loop(args.teacher, args.pretrained, urls, views=args.views,
                                               batch_size=args.batch_size, limit=args.limit,
                                               allow_random=allow_random)
                else:
                    d = tmp / f"naive{r}"
                    d.mkdir()
                    counts[name] = naive_loop(args.teacher, args.pretrained, urls, d, batch_size=args.batch_size,
                                              limit=args.limit)
                times[name].append(time.perf_counter() - t0)
                print(f"  repeat {r} {name:8s} {times[name][-1]:7.2f} s ({counts[name]} images)", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: counts[k] / med[k] for k in med}
    result = {
        "teacher": args.teacher, "images": counts["kdcache"], "views": args.views, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "median_seconds": med,
        "images_per_s": rate,
        "ratio_kdcache_over_serial": rate["kdcache"] / rate["serial"],
        "ratio_kdcache_over_naive": rate["kdcache"] / rate["naive"],
        "note": "every configuration's seconds include its teacher load",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nteacher {args.teacher}, {counts['kdcache']} images x {args.views} view(s), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| config  | median s | images/s | ratio kdcache ÷ config |")
    print("|---------|---------:|---------:|-----------------------:|")
    for k in times:
        print(f"| {k:7s} | {med[k]:8.2f} | {rate[k]:8.1f} | {rate['kdcache'] / rate[k]:22.3f} |")
    return result


if __name__ == "__main__":
    main()
