"""What decoding one batch ahead on a background thread (`kdcache.shards.gpudecode.ahead`) buys the --decode gpu build,
on a model of the GPU that runs here: ratios measured side by side in one run.

    python bench/bench_ahead.py --out bench/results/ahead.json          # ~2 minutes on 2 cores

On a GPU the build's main thread does three things per batch: nvjpeg's batched decode, which blocks it until the batch
is decoded; rendering the views (kernel launches); and launching the teacher's forward, then waiting for the previous
batch's outputs. The waits release the GIL. Here the batch's preparation is the build's real one, on the CPU
(`decode_pictures` with libjpeg standing in for nvjpeg, then `TensorViews.eval_view` per image at 224 px, as a
ViT-B-32 teacher's) and the forward is a wait that holds no GIL (time.sleep), as a CUDA synchronisation is, of F ms.

  serial  each batch prepared, then its forward waited for (the build before `ahead`: "gpu_inline" in gpu_check.py)
  ahead   the build's loop: batch k+1 prepared on the background thread while batch k's forward is waited for

Ideal ratio serial ÷ ahead: (P + F) / max(P, F) for a long run, where P is one batch's preparation alone (for n
batches n(P + F) / (P + F + (n - 1) max(P, F)), which the bench reports beside the measured one for F = P/2, P, 2P).
This shows the GIL does not serialise the two (torch and torchvision release it in their kernels); it says nothing
about nvjpeg's speed or the real forward's, which only `gpu_check.py` measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

PREPROCESS = {"size": 224, "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
              "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic", "resize_mode": "shortest",
              "fill_color": 0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=384, help="synthetic 256-512 px JPEGs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="rounds, each running both loops at each F")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from bench_build import synth_shards, write_result

    from kdcache.shards import ShardReport, iter_shard
    from kdcache.shards.gpudecode import ahead, decode_pictures
    from kdcache.tensorviews import TensorViews

    torch.set_num_threads(1)  # the preparation on one core, the "forward" on none: nothing else competes
    tmp = Path(tempfile.mkdtemp(prefix="kdc-ahead-"))
    datas = []
    for url in synth_shards(tmp, 1, args.n_images, seed=2):
        datas += [raw.members["jpg"] for raw in iter_shard(url, ShardReport(url=url))]
    b = args.batch_size
    batches = [datas[i:i + b] for i in range(0, len(datas) - b + 1, b)]
    views = TensorViews(PREPROCESS, fill=(0, 0, 0))

    def prepare(chunk: list[bytes]) -> torch.Tensor:
        pics = decode_pictures(chunk, device="cpu", max_pixels=1 << 26, background=(255, 255, 255))
        return torch.stack([views.eval_view(p) for p in pics])

    def serial(fwd: float) -> float:
        t0 = time.perf_counter()
        for chunk in batches:
            prepare(chunk)
            time.sleep(fwd)
        return time.perf_counter() - t0

    def threaded(fwd: float) -> float:
        t0 = time.perf_counter()
        for _ in ahead(batches, prepare):
            time.sleep(fwd)
        return time.perf_counter() - t0

    prepare(batches[0])  # warm-up
    p_times = []
    for chunk in batches:
        t0 = time.perf_counter()
        prepare(chunk)
        p_times.append(time.perf_counter() - t0)
    p = statistics.median(p_times)
    res: dict = {"images": len(batches) * b, "batch": b, "prepare_ms": p * 1e3, "rounds": args.repeats, "by_f": {}}
    for name, f in (("F=P/2", p / 2), ("F=P", p), ("F=2P", 2 * p)):
        ratios = []
        for r in range(args.repeats):
            order = (serial, threaded) if r % 2 == 0 else (threaded, serial)
            t = {fn.__name__: fn(f) for fn in order}
            ratios.append(t["serial"] / t["threaded"])
        n = len(batches)  # the first preparation and the last forward overlap nothing
        res["by_f"][name] = {"forward_ms": f * 1e3, "ideal": n * (p + f) / (p + f + (n - 1) * max(p, f)),
                             "serial_over_ahead": statistics.median(ratios),
                             "range": [min(ratios), max(ratios)]}
        print(name, res["by_f"][name], flush=True)
    if args.out:
        write_result(args.out, res)
    return res


if __name__ == "__main__":
    main()
