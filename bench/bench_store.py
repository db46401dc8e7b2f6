"""Caches on an object store (issue 13): a `kdcache train` epoch reading the cache from an S3 endpoint on loopback ÷
the same epoch reading it from local disk, side by side in one run.

    python bench/bench_store.py --quick              # smoke run: 4096 captions, text tower, 1 round (~1 min)
    python bench/bench_store.py                      # 16384 captions, text tower, 3 rounds
    python bench/bench_store.py --tower image        # the image tower: cache + local tar shards + JPEG decode

Needs moto's server mode and s3fs (`pip install -e '.[test]'`).

Setup (not timed): synthetic shards + a caption corpus -> `kdcache build` on local disk with kdc-tiny-vit made 512 wide
(cache rows as big as ViT-B-32's; embeddings overwritten with random unit vectors, as bench_read does, so they compress
like a real teacher's), then the same objects uploaded to a bucket of a moto S3 server started here on 127.0.0.1.
Dummy credentials and the endpoint reach `kdcache train` (a subprocess) through the environment only.

Configurations, interleaved (A B, B A, ...): `kdcache train --epochs 1 --tower TOWER --cache CACHE`, a fresh subprocess
each, with CACHE the local directory or the s3:// URL; same student, loss, batch size, --workers, seed and order.
The text tower reads nothing but the cache, so the store's cost shows fully; the image tower also reads local tars and
decodes JPEGs, which dilute it. Epoch time is the training part of the epoch, from the run's own metrics (as
bench_online); process start-up, opening the cache and validation are printed beside it as setup_s.

The ratio printed: S3 epoch seconds ÷ local epoch seconds (1.0 = no cost; higher = slower from S3). The loopback
server runs in this process on the same cores as the trainer, so its CPU is part of the cost; there is no network
latency, which a remote bucket adds per chunk request.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_build import (  # noqa: E402
    best_ratio,
    fmt_spread,
    interleaved,
    machine_note,
    md_table,
    paired_ratio,
    spread,
    synth_shards,
    write_result,
)
from bench_online import epoch_seconds  # noqa: E402
from bench_read import build_cache, realistic_embeddings, store_bytes, wide_tiny_teacher  # noqa: E402

BUCKET = "kdcache-bench"
STUDENTS = {"text": "kdc-tiny-text", "image": "kdc-tiny-image"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> tuple[object, str]:
    """A moto S3 server on a free loopback port, one bucket, dummy credentials in this process's environment (which
    the train subprocesses inherit). Returns (server, endpoint)."""
    try:
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise SystemExit(f"bench_store needs moto[server] and s3fs ({e}); pip install -e '.[test]'") from None
    port = _free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    endpoint = f"http://127.0.0.1:{port}"
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    return srv, endpoint


def upload(local: str, url: str) -> int:
    """Every file of the local cache as an object under `url`; returns the object count."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.mkdir(root.split("/")[0])  # the bucket
    files = [p for p in Path(local).rglob("*") if p.is_file()]
    for p in files:
        fs.pipe_file(f"{root}/{p.relative_to(local).as_posix()}", p.read_bytes())
    fs.invalidate_cache()
    return len(files)


def train_cmd(cache: str, out: Path, *, tower: str, batch_size: int, workers: int) -> list[str]:
    """`kdcache train` as a user types it: one epoch; the image tower reads the local shards the cache records."""
    return [sys.executable, "-m", "kdcache.cli.main", "train", "--cache", cache, "--tower", tower,
           "--student", STUDENTS[tower], "--out", str(out), "--epochs", "1", "--batch-size", str(batch_size),
           "--workers", str(workers), "--loss", "cosine=1", "--threads", "1", "--no-progress"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tower", choices=sorted(STUDENTS), default="text")
    ap.add_argument("--n-images", type=int, default=256, help="synthetic images (4 shards)")
    ap.add_argument("--n-captions", type=int, default=16384)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="loader workers of kdcache train")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="128 images, 4096 captions, 1 round")
    ap.add_argument("--out", default="bench/results/store.json")
    args = ap.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(n_images=128, n_captions=4096, repeats=1)
        args = ap.parse_args(argv)
    from kdcache.synth import write_captions

    srv, endpoint = start_s3()
    try:
        with tempfile.TemporaryDirectory(prefix="kdcache-bench-store-") as tmp:
            tmp = Path(tmp)
            t0 = time.perf_counter()
            images = synth_shards(tmp / "shards", 4, max(1, -(-args.n_images // 4)))
            captions = write_captions(tmp / "captions.txt", "txt", n=args.n_captions)
            cache = build_cache(tmp, images=images, captions=captions, teacher=wide_tiny_teacher(tmp, 512),
                                pretrained=None, views=args.views)
            realistic_embeddings(cache)
            url = f"s3://{BUCKET}/cache.zarr"
            objects = upload(cache, url)
            print(f"  setup {time.perf_counter() - t0:.1f} s: cache {store_bytes(cache) / 1e6:.1f} MB, {objects} "
                  f"objects uploaded to {endpoint}", file=sys.stderr, flush=True)
            counter = iter(range(1_000_000))

            def one(where: str) -> dict:
                out = tmp / f"run-{where}-{next(counter)}"
                t0 = time.perf_counter()
                p = subprocess.run(train_cmd(cache if where == "local" else url, out, tower=args.tower,
                                             batch_size=args.batch_size, workers=args.workers),
                                   capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if p.returncode != 0:
                    raise SystemExit(f"kdcache train ({where}) failed:\n{p.stderr[-3000:]}")
                secs, n = epoch_seconds(out, args.batch_size)
                return {"n": n, "epoch_s": secs, "setup_s": wall - secs}

            configs = {"local": lambda: one("local"), "s3": lambda: one("s3")}
            runs = interleaved(configs, repeats=args.repeats, warmup=configs)
    finally:
        srv.stop()

    # local rate ÷ S3 rate = S3 epoch seconds ÷ local epoch seconds, paired within each round
    ratio = paired_ratio(runs, "local", "s3")
    result = {
        "tower": args.tower, "student": STUDENTS[args.tower], "images": args.n_images, "captions": args.n_captions,
        "views": args.views, "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats,
        "quick": args.quick, "machine": machine_note(), "endpoint": "moto server on 127.0.0.1 (this process)",
        "epoch_s": {k: spread([r["epoch_s"] for r in v]) for k, v in runs.items()},
        "setup_s": {k: spread([r["setup_s"] for r in v]) for k, v in runs.items()},
        "samples_per_s": {k: spread([r["rate"] for r in v]) for k, v in runs.items()},
        "s3_over_local_epoch": ratio, "s3_over_local_best": best_ratio(runs, "local", "s3"),
        "runs": runs,
    }
    write_result(args.out, result)
    print(f"\n{args.tower} tower, student {STUDENTS[args.tower]}, {runs['local'][0]['n']} samples/epoch, batch "
          f"{args.batch_size}, --workers {args.workers}, {machine_note()}, median [min-max] of {args.repeats} "
          "round(s)\n")
    print(md_table(["cache", "epoch s", "samples/s", "start-up + validation s"],
                   [[k, fmt_spread(result["epoch_s"][k], 2), fmt_spread(result["samples_per_s"][k], 1),
                     fmt_spread(result["setup_s"][k], 2)] for k in runs]))
    print(f"\ntrain epoch from loopback S3 ÷ from local disk: {fmt_spread(ratio, 2)} "
          f"(best rounds: {result['s3_over_local_best']:.2f}; reported, the issue sets no bound)")
    return result


if __name__ == "__main__":
    main()
