"""CIFAR-10 study: distil the real kdc-cifar10-rn18 CLIP teacher into a small ViT with three loss recipes.

    python experiments/cifar10_distill.py                                   # needs ../shared (or KDCACHE_SHARED)
    python experiments/cifar10_distill.py --train-shards 1 --epochs 1 --test-limit 500   # a few minutes on 2 CPUs

The teacher runs once (`kdcache build`, 2 views per image); every recipe then trains from the cache alone:
  feature   cosine=1                         (feature mimicry only, label-free)
  kd        kl=1 @ T=4 + ce=0.1              (logit KD on the cached zero-shot head, plus a little label CE)
  seed001   l1=0.6 + ce=0.35 + kl=0.05 @ T=4 (the seed project's weighting)
Each student's image tower is exported with the teacher's text tower and evaluated zero-shot on the CIFAR-10 test
shard side by side with the teacher; `kdcache compare` writes the table to experiments/results/cifar10.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from kdcache.cache.build import print_summary
from kdcache.cache.build import run as build
from kdcache.cache.config import BuildConfig
from kdcache.eval.compare import write_compare
from kdcache.eval.run import EvalConfig
from kdcache.eval.run import run as evaluate
from kdcache.export import export
from kdcache.train.config import TrainConfig
from kdcache.train.loop import run as train

HERE = Path(__file__).parent
RECIPES = {
    "feature": ((("cosine", 1.0),), 4.0),
    "kd": ((("kl", 1.0), ("ce", 0.1)), 4.0),
    "seed001": ((("l1", 0.6), ("ce", 0.35), ("kl", 0.05)), 4.0),
}


def main(argv=None) -> None:
    shared = Path(os.environ.get("KDCACHE_SHARED", HERE.parent.parent / "shared"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(shared), help="folder holding data/cifar10 and teachers/")
    ap.add_argument("--workdir", default=str(HERE / "out" / "cifar10"))
    ap.add_argument("--train-shards", type=int, default=2, help="of the 10 training shards (5,000 images each)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--test-limit", type=int, default=2000)
    ap.add_argument("--student", default=str(HERE / "configs" / "cifar-vit-small.json"))
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--results", default=str(HERE / "results" / "cifar10.md"))
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    teacher = f"local-dir:{shared / 'teachers' / 'kdc-cifar10-rn18'}"
    train_shards = tuple(str(shared / "data" / "cifar10" / f"cifar10-train-{i:03d}.tar")
                         for i in range(args.train_shards))
    test = (str(shared / "data" / "cifar10" / "cifar10-test-000.tar"),)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    cache = work / "cache.zarr"
    res = build(BuildConfig(out=str(cache), teacher=teacher, images=train_shards, views=2, classes="cifar10",
                            templates="photo", batch_size=256, resume=cache.exists()))
    print_summary(res)
    print(f"build done at {time.time() - t0:.0f} s")

    models = [teacher]
    runs = []
    for name in args.recipes:
        losses, temperature = RECIPES[name]
        run_dir = work / "runs" / name
        if not (run_dir / "done.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            r = train(TrainConfig(cache=str(cache), tower="image", student=args.student, out=str(run_dir),
                                  losses=losses, temperature=temperature, epochs=args.epochs,
                                  batch_size=args.batch_size, lr=args.lr, workers=args.workers, progress=False))
            print(f"{name}: {r.steps} steps, val {r.final_val}  ({time.time() - t0:.0f} s)")
        exported = work / "exported" / name
        export(out=str(exported), image_run=str(run_dir), text_from_teacher=teacher)
        models.append(str(exported))
        runs.append(str(run_dir))

    report = work / "reports" / "zeroshot"
    evaluate(EvalConfig(models=tuple(models), data=test, task="zeroshot", out=str(report), classes="cifar10",
                        templates="photo", limit=args.test_limit, batch_size=256, progress=False))
    table, written = write_compare([str(report)], out=args.results, runs=tuple(runs))
    print(table)
    print(f"finished in {time.time() - t0:.0f} s; wrote {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    main()
