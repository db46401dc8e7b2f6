"""Cache read: how fast the training loaders feed a student, ÷ the price of compression and ÷ the student's own step.

    python bench/bench_read.py --quick                 # 256 synthetic 256-512 px JPEGs + 4096 captions, ~1 min
    python bench/bench_read.py                         # 512 JPEGs + 16384 captions, tiny + seed students, 3 rounds
    python bench/bench_read.py --images ../shared/data/cifar10/cifar10-train-000.tar \
        --teacher local-dir:../shared/teachers/kdc-cifar10-rn18 \
        --captions coco:../shared/data/coco/captions_val2017.json

Setup (not timed): a cache is built (`kdcache build`, 2 views) with a tiny random-init ViT teacher whose embed_dim is
512 (so a cache row is as big as ViT-B-32's) over synthetic real-sized JPEGs (or --images) and a caption corpus; then
an uncompressed copy of it is written with zarr's own API (every array re-created with compressors=None).

Configurations, interleaved (rotated per round, medians [min-max]):
  text loader      `kdcache.train.loader.make_loader`, text tower, 4 epochs (a fresh loader each): cache reads +
                   shuffle + the cached caption tokens cut to the student's context (the students' tokenizer is the
                   teacher's, as with a real CLIP teacher, so nothing is tokenised; see kdcache/tokens.py)
  text loader raw  the same on the uncompressed copy
  text loader tokenising   the same with the caption tokens not reused: open_clip's tokenizer runs in the loader
  image rows       the image tower's order stream: cache reads + tar members joined by key + shuffle, no decode
  image rows raw   the same on the uncompressed copy
  image loader     `make_loader`, image tower, at each student's size: + JPEG decode + crop replay + resize
  step <student>   forward + backward + AdamW step of a student tower on one real batch (same batch size)
Ratios: loader ÷ uncompressed loader (target ≥ 0.7); cache-only loader ÷ tiny student step (target ≥ 20); image
loader ÷ image student step (expected far below 1 on a CPU); and a per-stage profile of the image loader.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

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
    target,
    targets_table,
    write_result,
)

TINY_TEACHER = Path(__file__).resolve().parents[1] / "kdcache" / "configs" / "teachers" / "kdc-tiny-vit.json"


def copy_uncompressed(src: str, dst: str) -> None:
    """A copy of a zarr store with every array re-created with compressors=None (same shape, chunks, dtype, fill,
    attributes), through zarr's API; groups keep their attributes (the cache's root and status objects)."""
    s = zarr.open_group(src, mode="r")
    d = zarr.open_group(dst, mode="w", attributes=dict(s.attrs))

    def walk(sg: zarr.Group, dg: zarr.Group) -> None:
        for name, node in sg.members():
            if isinstance(node, zarr.Array):
                a = dg.create_array(name, shape=node.shape, dtype=node.dtype, chunks=node.chunks,
                                    fill_value=node.fill_value, compressors=None, attributes=dict(node.attrs),
                                    config={"write_empty_chunks": True})
                if node.size:
                    a[...] = node[...]
            else:
                walk(node, dg.create_group(name, attributes=dict(node.attrs)))

    walk(s, d)


def realistic_embeddings(path: str, seed: int = 0) -> int:
    """Overwrite every stored embedding with a random unit vector (NaN rows stay NaN), in place and with the arrays'
    own codecs, then re-sign each unit's status with the content digests of the rewritten arrays (readers check them;
    the status is rewritten after the data, as a build does). A random-init teacher's outputs are nearly constant
    across inputs and compress ~10x, which would make compression look free; a trained teacher's fp16 embeddings
    compress little. Returns the rows rewritten."""
    from kdcache.cache import schema
    from kdcache.cache.reader import open_cache

    rng, rows = np.random.default_rng(seed), 0

    def walk(g: zarr.Group) -> None:
        nonlocal rows
        for name, node in g.members():
            if isinstance(node, zarr.Group):
                walk(node)
            elif name in ("emb", "caption_emb") and np.dtype(node.dtype).kind == "f" and node.size:
                a = node[...].astype(np.float32)
                v = rng.standard_normal(a.shape).astype(np.float32)
                v /= np.linalg.norm(v, axis=-1, keepdims=True)
                v[~np.isfinite(a)] = np.nan
                node[...] = v.astype(node.dtype)
                rows += int(np.isfinite(v[..., 0]).sum())

    root = zarr.open_group(path, mode="r+")
    # an all-NaN chunk (rejected rows; images without captions) equals the fill value: zarr would delete it by
    # default, and a reader fails closed on a missing chunk. The build writes every chunk; so does this.
    with zarr.config.set({"array.write_empty_chunks": True}):
        walk(root)
    cache = open_cache(path)
    for unit in cache.all_units:
        st = cache.status(unit)
        if st and st.get(schema.DIGEST_KEY):
            group = root[unit.data_path]
            digests = {name: schema.array_digest(group[name][...]) for name in st[schema.DIGEST_KEY]}
            schema.write_status(root, unit, {**st, schema.DIGEST_KEY: digests})
    return rows


def store_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def build_cache(tmp: Path, *, images: list[str], captions: str, teacher: str, pretrained, views: int) -> str:
    from kdcache.cache.build import run
    from kdcache.cache.config import BuildConfig

    out = str(tmp / "cache.zarr")
    allow_random = pretrained is None and not teacher.startswith(("local-dir:", "hf-hub:"))
    res = run(BuildConfig(out=out, teacher=teacher, pretrained=pretrained, allow_random_init=allow_random,
                          images=tuple(images), captions=(captions,), views=views, batch_size=64, progress=False))
    if not res.ok:
        raise SystemExit(f"bench cache build failed: {res.status} {res.failed_units}")
    return out


def wide_tiny_teacher(tmp: Path, dim: int) -> str:
    """kdc-tiny-vit with embed_dim `dim`: tiny towers (fast to build) but cache rows the size of a real teacher's."""
    cfg = json.loads(TINY_TEACHER.read_text())
    cfg["model_cfg"]["embed_dim"] = dim
    cfg["model_cfg"]["text_cfg"]["context_length"] = 77  # as real CLIP teachers: the cached tokens cover students' 77
    p = tmp / f"tiny-vit-{dim}.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def drain_loader(loader) -> dict:
    n = 0
    for batch in loader:
        n += len(batch["teacher"])
    return {"n": n}


def drain_epochs(make, epochs: int) -> dict:
    """`make(epoch)`'s loader drained for epochs 0..epochs-1: one epoch of the text corpus is too short to time."""
    return {"n": sum(drain_loader(make(e))["n"] for e in range(epochs))}


def tokenising(loader):
    """The loader with its stream's cached-token reuse switched off: open_clip's tokenizer runs per batch."""
    loader.dataset.token_context = None
    return loader


def drain_rows(make_stream, epochs: int) -> dict:
    """The image tower's order stream (cache reads + tar members joined by key + shuffle, nothing decoded) for
    `epochs` epochs: one epoch of a small set is too short to time on its own."""
    n = 0
    for epoch in range(epochs):
        for _ in make_stream(epoch).order():
            n += 1
    return {"n": n}


class StudentStep:
    """One optimiser step of a student tower on a fixed batch: forward, cosine loss to the cached teacher embedding,
    backward, grad clipping and AdamW (the loop's per-step work without its data)."""

    def __init__(self, name: str, tower: str, batch: dict, teacher_dim: int):
        from kdcache.train.losses import LossInputs, WeightedLoss
        from kdcache.train.students import build_student

        self.student = build_student(name, tower=tower, teacher_dim=teacher_dim)
        self.student.train()
        self.params = self.student.trainable_parameters()
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.loss = WeightedLoss({"cosine": 1.0}, tower)
        self.inputs = LossInputs
        self.batch = batch
        self.x = batch["pixels"] if tower == "image" else batch["tokens"]
        self.tower = tower

    def __call__(self, steps: int) -> dict:
        for _ in range(steps):
            x = self.student.normalize_pixels(self.x) if self.tower == "image" else self.x
            s = self.student(x)
            terms = self.loss(self.inputs(student=s, teacher=self.batch["teacher"]))
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return {"n": steps * len(self.x)}


def profile_image_loader(stream, rows: int) -> dict:
    """Seconds per sample of each stage of the image loader, on the first `rows` rows of the order stream: reading
    (cache + tar members, no decode), JPEG decode + RGB, crop replay + resize to the student's size, batch stacking;
    plus, as a what-if, the decode with PIL's JPEG draft mode (DCT-domain downscaling) where the student's size allows
    it."""
    from PIL import Image

    from kdcache.views import crop_view, eval_transform_uint8, render_view

    t0 = time.perf_counter()
    picked, total = [], 0
    for row in stream.order():  # the whole epoch, so the stream's start-up is amortised as in training
        total += 1
        if len(picked) < rows:
            picked.append(row)
    read = (time.perf_counter() - t0) / total
    pp = stream.student_preprocess
    eval_tf = eval_transform_uint8(pp)
    size = pp["size"]
    side = size if isinstance(size, int) else min(size)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    t_dec = t_rep = t_draft = t_gap = 0.0
    px, drafted = [], 0
    for row in picked:
        t0 = time.perf_counter()
        img = stream.decode_image(row)
        t1 = time.perf_counter()
        px.append(eval_tf(img) if row.view == 0 else
                  render_view(img, row.box, row.flip, size=hw, interpolation=pp.get("interpolation", "bicubic")))
        t_rep += time.perf_counter() - t1
        t_dec += t1 - t0
        # What-if: the same crop resized by PIL with reducing_gap=3 (a fast integer box reduction first, then the
        # filter): not bit-identical to open_clip's transform, so only a candidate for an opt-in fast path.
        t4 = time.perf_counter()
        crop = crop_view(img, row.box, row.flip) if row.view else img
        crop.resize((hw[1], hw[0]), Image.BICUBIC, reducing_gap=3.0)
        t_gap += time.perf_counter() - t4
        # What-if: JPEG draft decode at the largest 1/2^k scale that keeps the crop at least the student's size.
        data = next((v for k, v in row.members.items() if k in ("jpg", "jpeg")), None)
        if data is not None:
            t3 = time.perf_counter()
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            crop = min(row.box[2] or w, row.box[3] or h)
            scale = 1
            while crop // (scale * 2) >= side and scale < 8:
                scale *= 2
            if scale > 1:
                im.draft("RGB", (w // scale, h // scale))
                drafted += 1
            im.convert("RGB")
            t_draft += time.perf_counter() - t3
    t0 = time.perf_counter()
    torch.stack(px)  # as the loader does: pil_to_tensor gives CHW views of HWC memory, so this copy transposes
    stack = (time.perf_counter() - t0) / len(px)
    hwc = [p.permute(1, 2, 0) for p in px]  # the HWC arrays PIL produced (views, no copy)
    t0 = time.perf_counter()
    torch.stack(hwc).permute(0, 3, 1, 2)  # what-if: a plain memcpy, giving a channels_last [B,3,H,W] batch
    stack_hwc = (time.perf_counter() - t0) / len(px)
    n = len(picked)
    return {"rows": n, "read_s": read, "decode_s": t_dec / n, "replay_resize_s": t_rep / n, "stack_s": stack,
            "stack_hwc_s": stack_hwc, "reducing_gap_resize_s": t_gap / n, "draft_decode_s": t_draft / n,
            "draft_rows": drafted}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", nargs="*", default=None, help="image shards (default: synthetic 256-512 px JPEGs)")
    ap.add_argument("--n-images", type=int, default=512, help="synthetic images (4 shards)")
    ap.add_argument("--captions", default=None, help="caption corpus spec (default: synthetic txt)")
    ap.add_argument("--n-captions", type=int, default=16384)
    ap.add_argument("--teacher", default=None, help="default: kdc-tiny-vit with embed_dim 512 (random init)")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--keep-embeddings", action="store_true",
                    help="keep the random-init teacher's (near-constant, very compressible) embeddings")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--chunk-bytes", type=int, default=None,
                    help="build the cache with this kdcache.cache.schema.CHUNK_BYTES (a knob; default: the schema's)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="loader workers")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--step-seconds", type=float, default=1.5,
                    help="student steps per timed run: as many as take about this long (at least 1)")
    ap.add_argument("--students", nargs="*", default=["kdc-tiny", "kdc-seed"],
                    help="student families: <family>-text and <family>-image (kdc-seed uses kdc-seed-image-vit)")
    ap.add_argument("--profile-rows", type=int, default=128)
    ap.add_argument("--row-epochs", type=int, default=4, help="epochs per timed run of the image order stream")
    ap.add_argument("--text-epochs", type=int, default=4, help="epochs per timed run of the text loaders")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256 images, 4096 captions, 2 rounds, tiny students only")
    ap.add_argument("--out", default="bench/results/read.json")
    args = ap.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly still win
        ap.set_defaults(n_images=256, n_captions=4096, repeats=2, profile_rows=64, students=["kdc-tiny"],
                        step_seconds=0.5)
        args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from kdcache.cache import schema

    if args.chunk_bytes:
        schema.CHUNK_BYTES = args.chunk_bytes  # read at call time by schema.chunk_rows; this process only
    from kdcache.cache.reader import open_cache
    from kdcache.synth import write_captions
    from kdcache.train.data import TrainStream
    from kdcache.train.dataspec import DataSpec
    from kdcache.train.loader import make_loader
    from kdcache.train.students import build_student

    students = {"text": [], "image": []}
    for fam in args.students:
        students["text"].append(f"{fam}-text")
        students["image"].append(f"{fam}-image-vit" if fam == "kdc-seed" else f"{fam}-image")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        images = args.images or synth_shards(tmp / "shards", 4, max(1, -(-args.n_images // 4)))
        captions = args.captions or write_captions(tmp / "captions.txt", "txt", n=args.n_captions)
        teacher = args.teacher or wide_tiny_teacher(tmp, 512)
        cache = build_cache(tmp, images=images, captions=captions, teacher=teacher, pretrained=args.pretrained,
                            views=args.views)
        randomised = 0
        if args.teacher is None and not args.keep_embeddings:
            randomised = realistic_embeddings(cache)
        raw = str(tmp / "cache-uncompressed.zarr")
        copy_uncompressed(cache, raw)
        sizes = {"compressed_bytes": store_bytes(cache), "uncompressed_bytes": store_bytes(raw)}
        print(f"  setup {time.perf_counter() - t0:.1f} s: cache {sizes['compressed_bytes'] / 1e6:.1f} MB, "
              f"uncompressed copy {sizes['uncompressed_bytes'] / 1e6:.1f} MB", file=sys.stderr)

        bs, w = args.batch_size, args.workers
        dim = open_cache(cache).embed_dim
        tok = {s: build_student(s, tower="text", teacher_dim=dim).tokenizer for s in students["text"]}
        pre = {s: build_student(s, tower="image", teacher_dim=dim).preprocess for s in students["image"]}
        text_tok = tok[students["text"][0]]
        pre0 = pre[students["image"][0]]

        def spec(path: str, tower: str) -> DataSpec:
            return DataSpec(cache=path, tower=tower, batch_size=bs, seed=0)

        configs = {
            "text loader": lambda: drain_epochs(lambda e: make_loader(
                spec(cache, "text"), split="train", epoch=e, workers=w, tokenizer=text_tok), args.text_epochs),
            "text loader raw": lambda: drain_epochs(lambda e: make_loader(
                spec(raw, "text"), split="train", epoch=e, workers=w, tokenizer=text_tok), args.text_epochs),
            "text loader tokenising": lambda: drain_epochs(lambda e: tokenising(make_loader(
                spec(cache, "text"), split="train", epoch=e, workers=w, tokenizer=text_tok)), args.text_epochs),
            "image rows": lambda: drain_rows(lambda e: TrainStream(spec(cache, "image"), split="train", epoch=e,
                                                                   student_preprocess=pre0), args.row_epochs),
            "image rows raw": lambda: drain_rows(lambda e: TrainStream(spec(raw, "image"), split="train", epoch=e,
                                                                       student_preprocess=pre0), args.row_epochs),
        }
        for s in students["image"]:
            configs[f"image loader {s}"] = (lambda s=s: drain_loader(make_loader(
                spec(cache, "image"), split="train", epoch=0, workers=w, student_preprocess=pre[s])))
        steppers = {}
        for tower in ("text", "image"):
            for s in students[tower]:
                first = next(iter(make_loader(spec(cache, tower), split="train", epoch=0, tokenizer=tok.get(s),
                                              student_preprocess=pre.get(s))))
                steppers[s] = StudentStep(s, tower, first, dim)
                steppers[s](1)  # warm-up
                t1 = time.perf_counter()
                steppers[s](2)
                steps = max(1, round(args.step_seconds / ((time.perf_counter() - t1) / 2)))
                configs[f"step {s}"] = lambda s=s, steps=steps: steppers[s](steps)
        runs = interleaved(configs, repeats=args.repeats)
        prof = {s: profile_image_loader(TrainStream(spec(cache, "image"), split="train", epoch=0,
                                                    student_preprocess=pre[s]), args.profile_rows)
                for s in students["image"]}

    rates = {k: spread([r["rate"] for r in v]) for k, v in runs.items()}
    pairs = {"text loader ÷ uncompressed": ("text loader", "text loader raw"),
             "image rows ÷ uncompressed": ("image rows", "image rows raw")}
    pairs["text loader ÷ text loader tokenising"] = ("text loader", "text loader tokenising")
    for s in students["text"]:
        pairs[f"text loader ÷ step {s}"] = ("text loader", f"step {s}")
        pairs[f"text loader tokenising ÷ step {s}"] = ("text loader tokenising", f"step {s}")
    for s in students["image"]:
        pairs[f"image rows ÷ step {s}"] = ("image rows", f"step {s}")
        pairs[f"image loader {s} ÷ step {s}"] = (f"image loader {s}", f"step {s}")
    ratios = {k: paired_ratio(runs, a, b) for k, (a, b) in pairs.items()}
    best = {k: best_ratio(runs, a, b) for k, (a, b) in pairs.items()}
    rows = [[k, fmt_spread(v, 1)] for k, v in rates.items()]
    table = md_table(["configuration", "samples/s"], rows)
    rtable = md_table(["ratio", "paired per round: median [min-max]", "best ÷ best"],
                      [[k, fmt_spread(v), f"{best[k]:.3f}"] for k, v in ratios.items()])
    ptable = md_table(
        ["image loader stage (ms/sample)", *students["image"]],
        [[label, *[f"{1e3 * prof[s][key]:.2f}" for s in students["image"]]] for label, key in (
            ("read: cache + tar members, no decode (whole epoch)", "read_s"), ("JPEG decode + RGB", "decode_s"),
            ("crop replay + resize", "replay_resize_s"), ("stack CHW views into a batch", "stack_s"),
            ("what-if: JPEG draft decode", "draft_decode_s"),
            ("what-if: resize with PIL reducing_gap=3", "reducing_gap_resize_s"),
            ("what-if: stack HWC + permute (channels_last)", "stack_hwc_s"))])
    bound = {}
    for s in students["image"]:
        p = prof[s]
        stages = {"JPEG decode": p["decode_s"], "crop + resize": p["replay_resize_s"], "read": p["read_s"],
                  "batch stacking": p["stack_s"]}
        top = max(stages, key=stages.get)
        bound[s] = f"{top} ({100 * stages[top] / sum(stages.values()):.0f}% of the loader's per-sample time)"
    targets = [
        target("cache-only loader ÷ uncompressed (text tower)", ratios["text loader ÷ uncompressed"]["median"], ">=",
               0.7, "the price of zstd"),
        target("image-path cache reads ÷ uncompressed", ratios["image rows ÷ uncompressed"]["median"], ">=", 0.7,
               "tar members read too (they are the same bytes in both)"),
    ]
    for s in students["text"]:
        targets.append(target(f"cache-only loader ÷ {s} step", ratios[f"text loader ÷ step {s}"]["median"], ">=", 20,
                              "text tower: cache reads + shuffle + cached tokens"))
    for s in students["image"]:
        targets.append(target(f"image-path cache reads ÷ {s} step", ratios[f"image rows ÷ step {s}"]["median"], ">=",
                              20, "image tower without decode: cache arrays + tar members joined by key; the issue's "
                              "20x is for the cache-only loader, the image tower is reported separately",
                              judged=False))
    for s in students["image"]:
        targets.append(target(f"image loader ÷ {s} step", ratios[f"image loader {s} ÷ step {s}"]["median"], ">=", 0,
                              f"expected far less than the cache-only ratio; bound by {bound[s]}", judged=False))
    header = (f"{runs['text loader'][0]['n'] // args.text_epochs} text rows (x {args.text_epochs} epochs), "
              f"{runs['image rows'][0]['n'] // args.row_epochs} image rows "
              f"(x {args.row_epochs} epochs for the order stream) x {args.views} views, "
              f"cache {sizes['compressed_bytes'] / 1e6:.1f} MB (uncompressed {sizes['uncompressed_bytes'] / 1e6:.1f} "
              f"MB, chunks of {schema.CHUNK_BYTES / 2**20:g} MiB raw), batch {bs}, workers {w}, {machine_note()}; "
              f"median [min-max] of {args.repeats} rotated rounds")
    result = {
        "bench": "read", "quick": args.quick, "header": header, "batch_size": bs, "workers": w,
        "chunk_bytes": schema.CHUNK_BYTES,
        "threads": torch.get_num_threads(), "sizes": sizes, "embeddings_randomised": randomised, "runs": runs,
        "samples_per_s": rates, "ratios": ratios, "ratios_best": best,
        "image_loader_profile": prof, "image_loader_bound": bound,
        "table": "\n\n".join([table, rtable, ptable]), "targets": targets,
    }
    write_result(args.out, result)
    print(header)
    for t in (table, rtable, ptable):
        print(t + "\n")
    print("image loader bound: " + "; ".join(f"{s}: {b}" for s, b in bound.items()))
    print()
    print(targets_table(targets))
    return result


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
