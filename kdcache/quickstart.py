"""`kdcache quickstart`: the whole path on an embedded default, in a minute or two on a CPU.

    kdcache quickstart --workdir /tmp/kdq

It writes a few small sample shards and a caption file, builds a cache with a tiny random-init teacher (so every
number it prints is meaningless: it shows the mechanics), runs `info` and `verify`, trains a tiny image student and a
tiny text student from the cache alone, exports them as one CLIP that stock open_clip loads, evaluates teacher and
students side by side on held-out shards (zero-shot: report, confusion-matrix and per-class PNGs), and compares them
in one table with training-curve and accuracy-vs-latency PNGs. With the random teacher the table is printed as
mechanics only (teacher marked RANDOM, no Δ columns), ending with the README's real-teacher command.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from kdcache.cache.build import print_summary, run
from kdcache.cache.config import BuildConfig
from kdcache.cache.verify import format_info, info, verify
from kdcache.eval.compare import write_compare
from kdcache.eval.run import EvalConfig
from kdcache.eval.run import run as evaluate
from kdcache.export import export
from kdcache.synth import write_captions, write_image_shards
from kdcache.train.config import TrainConfig
from kdcache.train.loop import run as train

TINY_TEACHER = "kdc-tiny-vit.json"
QUICKSTART_CLASSES = ("red", "green", "blue")
# The README's real-teacher command (section `kdcache quickstart`): the same path on CIFAR-10, a trained teacher.
REAL_TEACHER_COMMAND = ("python experiments/cifar10_distill.py --train-shards 1 --epochs 1 --test-limit 500 "
                        "--workdir /tmp/kdc-cifar10 --results /tmp/kdc-cifar10/compare.md")


def tiny_teacher_path() -> str:
    """The embedded random-init teacher config (open_clip's nested model/preprocess JSON)."""
    return str(resources.files("kdcache") / "configs" / "teachers" / TINY_TEACHER)


def run_quickstart(workdir: str, *, teacher: str | None = None, images: tuple[str, ...] = ()) -> int:
    t0 = time.time()
    work = Path(workdir)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    random_teacher = teacher is None
    test_images: tuple[str, ...] = ()
    if not images:
        images = tuple(write_image_shards(data, n_shards=4, per_shard=64, classes=QUICKSTART_CLASSES, seed=0))
        test_images = tuple(write_image_shards(data / "test", n_shards=1, per_shard=96, classes=QUICKSTART_CLASSES,
                                               seed=1, prefix="test"))
    captions = write_captions(data / "captions.jsonl", "jsonl", n=300, seed=0)
    classes_file = data / "classes.txt"
    classes_file.write_text("\n".join(QUICKSTART_CLASSES) + "\n")
    cache = work / "cache.zarr"
    print(f"[1/7] build: {len(images)} shards + a caption corpus -> {cache}")
    if random_teacher:
        print("      teacher: the embedded tiny random-init ViT; its outputs (and every number below) are meaningless.")
    cfg = BuildConfig(
        out=str(cache), teacher=teacher or tiny_teacher_path(), images=images, captions=(captions,),
        allow_random_init=random_teacher, views=2, classes=str(classes_file), templates="photo", batch_size=32,
        overwrite=True,
    )
    result = run(cfg)
    print_summary(result)
    print("[2/7] info")
    print(format_info(info(str(cache))))
    print("[3/7] verify")
    rep = verify(str(cache), progress=False)
    for p in rep.problems:
        print(f"PROBLEM {p}")
    print(f"verified {rep.checked_units} units, {rep.checked_chunks} chunks: " + ("OK" if rep.ok else "FAILED"))
    if not (result.ok and rep.ok):
        return 1
    runs = work / "runs"
    print("[4/7] train: an image student and a text student, from the cache alone (the teacher is not loaded)")
    for tower, student, losses in (("image", "kdc-tiny-image", (("cosine", 1.0), ("kl", 0.5), ("ce", 0.1))),
                                   ("text", "kdc-tiny-text", (("cosine", 1.0), ("icl", 0.2)))):
        res = train(TrainConfig(cache=str(cache), tower=tower, student=student, out=str(runs / tower), losses=losses,
                                max_steps=200, batch_size=32, lr=2e-3, checkpoint_every=100, progress=False))
        print(f"      {tower}: {res.steps} steps, " + ", ".join(
            f"{k} {v:.3f}" for k, v in res.final_val.items() if k in ("val_cosine", "val_top1_agreement")))
    exported = work / "exported"
    print(f"[5/7] export -> {exported}")
    export(out=str(exported), image_run=str(runs / "image"), text_run=str(runs / "text"))
    reports = work / "reports"
    models = (cfg.teacher, str(exported), str(runs / "image"))
    print(f"[6/7] eval: {', '.join(models)} on {'held-out shards' if test_images else 'the given shards'} (zero-shot)")
    report = evaluate(EvalConfig(models=models, data=test_images or images, task="zeroshot",
                                 out=str(reports / "zeroshot"), classes=str(classes_file), templates="photo",
                                 cache=str(cache), allow_random_init=random_teacher,
                                 limit=None if test_images else 256, progress=False))
    eval_pngs = [reports / "zeroshot" / name for m in report["models"] for name in m["metrics"]["plots"].values()]
    print(f"[7/7] compare -> {work / 'compare.md'}")
    table, written = write_compare([str(reports / "zeroshot")], out=str(work / "compare.md"),
                                   runs=(str(runs / "image"), str(runs / "text")))
    if random_teacher:
        print("      MECHANICS ONLY, NOT A RESULT: the teacher has random weights, so its accuracy is chance and a "
              "student\n      scoring above it means nothing (no Δ columns). Agreement, size and speed are measured "
              "as usual.")
    print(table)
    print(f"\nquickstart finished in {time.time() - t0:.0f} s. Everything is under {work}/:")
    print(f"  sample shards and captions  {data}/")
    print(f"  teacher cache               {cache}  (inspect: kdcache info {cache})")
    print(f"  training runs               {runs}/image, {runs}/text  (metrics.csv, checkpoints, config.json)")
    print(f"  exported CLIP               {exported}  (open_clip.create_model_and_transforms('local-dir:{exported}'))")
    print(f"  eval report                 {reports / 'zeroshot'}/report.md")
    print(f"  comparison                  {written[0]}")
    for p in [*written[1:], *eval_pngs]:
        print(f"  plot                        {p}")
    if random_teacher:
        print("The teacher was random, so only the mechanics, not the numbers, mean anything. For real numbers, run "
              "the README's\nreal-teacher command (section `kdcache quickstart`; needs the CIFAR-10 teacher and "
              f"shards in ../shared):\n  {REAL_TEACHER_COMMAND}")
    return 0
