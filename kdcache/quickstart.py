"""`kdcache quickstart`: the whole path on an embedded default, in a minute or two on a CPU.

    kdcache quickstart --workdir /tmp/kdq

It writes a few small sample shards and a caption file, builds a cache with a tiny random-init teacher (so every
number it prints is meaningless: it shows the mechanics), then runs `info` and `verify`.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from kdcache.cache.build import BuildConfig, print_summary, run
from kdcache.cache.verify import format_info, info, verify
from kdcache.synth import write_captions, write_image_shards

TINY_TEACHER = "kdc-tiny-vit.json"
QUICKSTART_CLASSES = ("red", "green", "blue")


def tiny_teacher_path() -> str:
    """The embedded random-init teacher config (open_clip's nested model/preprocess JSON)."""
    return str(resources.files("kdcache") / "configs" / "teachers" / TINY_TEACHER)


def run_quickstart(workdir: str, *, teacher: str | None = None, images: tuple[str, ...] = ()) -> int:
    t0 = time.time()
    work = Path(workdir)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    random_teacher = teacher is None
    if not images:
        images = tuple(write_image_shards(data, n_shards=4, per_shard=64, classes=QUICKSTART_CLASSES, seed=0))
    captions = write_captions(data / "captions.jsonl", "jsonl", n=300, seed=0)
    classes_file = data / "classes.txt"
    classes_file.write_text("\n".join(QUICKSTART_CLASSES) + "\n")
    cache = work / "cache.zarr"
    print(f"[1/3] build: {len(images)} shards + a caption corpus -> {cache}")
    if random_teacher:
        print("      teacher: the embedded tiny random-init ViT; its outputs (and every number below) are meaningless.")
    cfg = BuildConfig(
        out=str(cache), teacher=teacher or tiny_teacher_path(), images=images, captions=(captions,),
        allow_random_init=random_teacher, views=2, classes=str(classes_file), templates="photo", batch_size=32,
        overwrite=True,
    )
    result = run(cfg)
    print_summary(result)
    print("[2/3] info")
    print(format_info(info(str(cache))))
    print("[3/3] verify")
    rep = verify(str(cache), progress=False)
    for p in rep.problems:
        print(f"PROBLEM {p}")
    print(f"verified {rep.checked_units} units, {rep.checked_chunks} chunks: " + ("OK" if rep.ok else "FAILED"))
    print(f"\nquickstart finished in {time.time() - t0:.0f} s. Everything is under {work}/:")
    print(f"  sample shards and captions  {data}/")
    print(f"  teacher cache               {cache}  (inspect: kdcache info {cache})")
    if random_teacher:
        print("The teacher was random, so only the mechanics, not the numbers, mean anything. Point --teacher at a "
              "real model to see real ones.")
    return 0 if result.ok and rep.ok else 1
