"""How many torch ops a --decode gpu batch's view 0s cost to render, one by one (`TensorViews.render`) and with the
pictures of one size rendered together (`TensorViews.render_all`, what the build and students run on a GPU): there
each op is a kernel launch and its dispatch on the CPU, which is what bounds rendering.

    python bench/bench_render.py --out bench/results/render.json            # synthetic, ~1 minute
    python bench/bench_render.py --images ../shared/data/cifar10/cifar10-test-000.tar   # + real same-size pictures

Batches of 256 view 0s at 224 px (a ViT-B-32 teacher's eval transform), decoded with libjpeg on the CPU:
  varied     synthetic photo-like JPEGs of 256-512 px, every picture its own size (render_all's worst case)
  camera     the same, but 4 sizes (640x480, 480x640, 500x375, 375x500), as a camera's or a curated set's
  --images   the first 256 pictures of the given shards (CIFAR-10: all 32x32)
Ops are counted with a TorchDispatchMode, as dispatched on the CPU: 5 per picture one by one. On CUDA there are more
(torchvision resizes uint8 natively on the CPU, through float32 on CUDA: a cast, the resampling, a clamp, a rounding
and a cast back), so the ratio there is at least this one. CPU milliseconds (median of `--repeats`) include the
resampling itself, most of it here, and show why the CPU renders one by one: the stack's copy costs more than the
dispatch it saves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))

from bench_ahead import PREPROCESS  # noqa: E402 (the path above)
from bench_build import synth_jpeg, write_result  # noqa: E402


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", nargs="*", default=(), metavar="SHARD")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from kdcache.shards import ShardReport, iter_shard
    from kdcache.shards.gpudecode import decode_jpegs
    from kdcache.tensorviews import TensorViews

    torch.set_num_threads(1)
    views = TensorViews(PREPROCESS, fill=(0, 0, 0))
    rng = np.random.default_rng(0)
    n = args.batch
    sets = {"varied": [synth_jpeg(rng, *(int(v) for v in rng.integers(256, 513, 2))) for _ in range(n)],
            "camera": [synth_jpeg(rng, *[(640, 480), (480, 640), (500, 375), (375, 500)][i % 4]) for i in range(n)]}
    if args.images:
        datas = []
        for url in args.images:
            for raw in iter_shard(url, ShardReport(url=url)):
                datas += [v for k, v in raw.members.items() if k.lower() in ("jpg", "jpeg")][:1]
                if len(datas) >= n:
                    break
        sets["images"] = datas[:n]
    res: dict = {"batch": n, "size": PREPROCESS["size"], "images": list(args.images), "sets": {}}
    for name, datas in sets.items():
        jobs = [(x, None) for x in decode_jpegs(datas, device="cpu")]

        def one_by_one(jobs=jobs):
            return torch.stack([views.render(pic, rec) for pic, rec in jobs])

        def together(jobs=jobs):
            return torch.stack(views.render_all(jobs, together=True))

        assert torch.equal(one_by_one(), together())
        row = {"picture_sizes": len({tuple(p.shape) for p, _ in jobs})}
        for fn in (one_by_one, together):
            with _Count() as c:
                fn()
            ms = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - t0) * 1e3)
            row[fn.__name__] = {"ops": c.ops, "cpu_ms": statistics.median(ms)}
        row["ops_ratio"] = row["one_by_one"]["ops"] / row["together"]["ops"]
        res["sets"][name] = row
        print(name, row, flush=True)
    if args.out:
        write_result(args.out, res)
    return res


if __name__ == "__main__":
    main()
