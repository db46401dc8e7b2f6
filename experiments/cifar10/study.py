"""The CIFAR-10 distillation study: does a student trained from the cache alone come close to the teacher, and as
close as online KD? Every arm is done with kdcache's own commands (build, train, export, eval, compare).

    python experiments/cifar10/study.py                                  # every arm, 2 seeds (needs ../shared)
    python experiments/cifar10/study.py --arms scratch,best --seeds 0 --test PATH --workdir DIR   # a rerun subset
    python experiments/cifar10/study.py --train-shards 1 --steps 60 --seeds 0 --arms scratch,kl --workdir /tmp/s

Teacher: ../shared/teachers/kdc-cifar10-rn18 (open_clip local-dir, CIFAR normalisation). Data: the ten train shards
(50,000 images) for the caches, cifar10-test-000 (5,000 images) for scoring only. Student, the same for every arm:
experiments/configs/cifar-resnet10t.json (timm resnet10t image tower at 32 px, 5.05 M parameters with its projection),
random init per seed. Every arm trains --steps optimizer steps of --batch-size (one budget for all).

Caches (built once, restartable; the teacher runs only here):
  main     --views 8 of the default crop + flip policy, hints visual.trunk.layer3 and visual.trunk.layer4
  1view    --views 1 (the teacher's eval view only), same hints
  strong   --views 8 of `rrc=0.35-1,flip,randaugment=2x9`, same hints
Arms (ARMS below): scratch (ce), kl, kl+ce, feature (cosine), hint without adapter, hint with adapter, hybrid
(kl + cosine + hint), and for the best recipe: online (`--online-teacher`, same everything else), from the 1-view
cache, and from the strong-view cache. `best` names the recipe this study found best on the validation split
(WORKDIR/best.json).

Each student is exported with the teacher's text tower to WORKDIR/exports/ARM-sSEED/ (open_clip local-dir: anyone can
re-score it with stock open_clip) and scored with `kdcache eval` on the test shard; `kdcache compare --paired-ci`
gives paired CIs. The results README (experiments/cifar10/README.md by default) is rewritten at the end of every run
from everything present in WORKDIR, so a subset run updates only its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from kdcache.cache.build import print_summary
from kdcache.cache.build import run as build
from kdcache.cache.config import BuildConfig
from kdcache.cache.reader import CacheError, open_cache
from kdcache.eval.compare import write_compare
from kdcache.eval.metrics import paired_difference
from kdcache.eval.run import EvalConfig
from kdcache.eval.run import run as evaluate
from kdcache.export import export
from kdcache.train import rundir
from kdcache.train.config import TrainConfig
from kdcache.train.loop import run as train

HERE = Path(__file__).resolve().parent
STUDENT = HERE.parent / "configs" / "cifar-resnet10t.json"
HINTS = ("visual.trunk.layer3", "visual.trunk.layer4")
STRONG = "rrc=0.35-1,flip,randaugment=2x9"
TEMPLATE = "a photo of a {}."

# name -> (losses, cache, extra TrainConfig fields, online)
ARMS: dict[str, tuple[tuple, str, dict, bool]] = {
    "scratch": ((("ce", 1.0),), "main", {}, False),
    "kl": ((("kl", 1.0),), "main", {}, False),
    "kl+ce": ((("kl", 1.0), ("ce", 0.5)), "main", {}, False),
    "feature": ((("cosine", 1.0),), "main", {}, False),
    "hint": ((("kl", 1.0), ("hint", 1.0)), "main",
             {"hint_map": (("visual.trunk.layer3", "visual.trunk.layer3"),), "hint_adapter": "none"}, False),
    "hint+adapter": ((("kl", 1.0), ("hint", 1.0)), "main",
                     {"hint_map": (("visual.trunk.layer3", "visual.trunk.layer3"),), "hint_adapter": "linear"}, False),
    "hybrid": ((("kl", 1.0), ("cosine", 1.0), ("hint", 1.0)), "main",
               {"hint_map": (("visual.trunk.layer3", "visual.trunk.layer3"),
                             ("visual.trunk.layer4", "visual.trunk.layer4"))}, False),
}
RECIPES = [a for a in ARMS if a != "scratch"]
# The best recipe, rerun online, from the 1-view cache and from the strong-view cache. Which recipe is best is decided
# on the validation split of the train shards (top-1 agreement with the teacher at the end of training, seed 0),
# never on the test shard, and recorded in WORKDIR/best.json; DEFAULT_BEST until the recipes have run.
VARIANTS = {"best-online": ("main", True), "best-1view": ("1view", False), "best-strong": ("strong", False)}
DEFAULT_BEST = "feature"  # what this study found (experiments/cifar10/README.md); a fresh WORKDIR uses it


def best_recipe(workdir: Path) -> str:
    f = workdir / "best.json"
    if f.exists():
        return json.loads(f.read_text())["best"]
    scores = {}
    for a in RECIPES:
        done = workdir / "runs" / f"{a}-s0" / rundir.DONE
        if done.exists():
            scores[a] = json.loads(done.read_text())["val"].get("val_top1_agreement", 0.0)
    if set(scores) != set(RECIPES):
        return DEFAULT_BEST
    best = max(scores, key=scores.get)
    f.write_text(json.dumps({"best": best, "val_top1_agreement": scores}, indent=2))
    return best


def arm_spec(arm: str, workdir: Path) -> tuple[tuple, str, dict, bool]:
    if arm in ARMS:
        return ARMS[arm]
    losses, _, extra, _ = ARMS[best_recipe(workdir)]
    cache, online = VARIANTS[arm]
    return losses, cache, extra, online


def _caches(args) -> dict[str, dict]:
    common = {"classes": "cifar10", "templates": str(args.workdir / "templates.txt"), "batch_size": 256,
              "threads": args.threads}
    return {"main": {"views": 8, "hints": HINTS, **common},
            "1view": {"views": 1, "hints": HINTS, **common},
            "strong": {"views": 8, "hints": HINTS, "augment": STRONG, **common}}


def ensure_cache(name: str, args, teacher: str, shards: tuple[str, ...]) -> str:
    out = args.workdir / "caches" / f"{name}.zarr"
    try:
        open_cache(str(out))
        return str(out)
    except CacheError:
        pass
    print(f"[cache {name}] building {out}", flush=True)
    res = build(BuildConfig(out=str(out), teacher=teacher, images=shards, resume=out.exists(), progress=args.progress,
                            **_caches(args)[name]))
    print_summary(res, file=sys.stdout)
    if not res.ok:
        raise SystemExit(f"cache {name} is not complete: {res.status}")
    return str(out)


def run_arm(arm: str, seed: int, args, teacher: str, caches: dict[str, str]) -> Path:
    """Train (or resume), export, evaluate one arm and seed; returns its report directory."""
    losses, cache, extra, online = arm_spec(arm, args.workdir)
    name = f"{arm}-s{seed}"
    run_dir, exp_dir, rep_dir = (args.workdir / d / name for d in ("runs", "exports", "reports"))
    if (rep_dir / "report.json").exists():
        return rep_dir
    cfg = TrainConfig(cache=caches[cache], tower="image", student=str(STUDENT), out=str(run_dir), losses=losses,
                      temperature=args.temperature, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      workers=args.workers, threads=args.threads, seed=seed, checkpoint_every=200,
                      progress=args.progress, resume=run_dir.exists(), **extra)
    print(f"[{name}] train: {' + '.join(f'{w:g}*{n}' for n, w in losses)}{' (online)' if online else ''}", flush=True)
    t0 = time.time()
    if not (run_dir / rundir.DONE).exists():
        if online:
            from kdcache.online import run_online

            run_online(cfg, teacher=teacher)
        else:
            train(cfg)
        (run_dir / "study-wall.json").write_text(json.dumps({"seconds": time.time() - t0}))
    export(out=str(exp_dir), image_run=str(run_dir), text_from_teacher=teacher)
    evaluate(EvalConfig(models=(str(exp_dir),), data=args.test, task="zeroshot", classes="cifar10",
                        templates=str(args.workdir / "templates.txt"), out=str(rep_dir), progress=False,
                        threads=args.threads))
    return rep_dir


def teacher_report(args, teacher: str) -> Path:
    rep_dir = args.workdir / "reports" / "teacher"
    if not (rep_dir / "report.json").exists():
        evaluate(EvalConfig(models=(teacher,), data=args.test, task="zeroshot", classes="cifar10",
                            templates=str(args.workdir / "templates.txt"), out=str(rep_dir), progress=False,
                            threads=args.threads))
    return rep_dir


# --------------------------------------------------------------------------------------------------------- results

def _load(rep_dir: Path) -> dict:
    return json.loads((rep_dir / "report.json").read_text())


def _correct(rep: dict) -> np.ndarray:
    m = rep["models"][0]
    return np.array(m["metrics"]["predictions"]) == np.array(rep["samples"]["labels"])


def write_results(args, out_md: Path) -> None:
    reports = {}
    for d in sorted((args.workdir / "reports").glob("*")):
        if (d / "report.json").exists():
            reports[d.name] = _load(d)
    teacher = reports.pop("teacher", None)
    arms: dict[str, dict[int, dict]] = {}
    for name, rep in reports.items():
        arm, _, seed = name.rpartition("-s")
        arms.setdefault(arm, {})[int(seed)] = rep
    order = [a for a in [*ARMS, *VARIANTS] if a in arms]
    best = best_recipe(args.workdir)
    lines = ["# CIFAR-10 distillation study", "",
             "Written by `python experiments/cifar10/study.py` (see its docstring for the exact setup). Teacher: "
             "kdc-cifar10-rn18; student: timm resnet10t image tower at 32 px (5.05 M parameters with its "
             f"projection), random init per seed; {args.steps} steps of batch {args.batch_size} per arm, AdamW lr "
             f"{args.lr}, KD temperature {args.temperature}; scored zero-shot on cifar10-test-000 (5,000 images) with "
             f"the teacher's text tower and the template '{TEMPLATE}'. The best recipe, chosen on the validation split "
             f"of the train shards (top-1 agreement with the teacher, seed 0): **{best}**; the best-* arms rerun it "
             "online, from a 1-view cache and from a strong-view cache.", ""]
    hdr = ["arm", "seeds", "top-1", "top-5", "macro P", "macro R", "macro F1", "weighted F1", "agreement w/ teacher",
           "train wall (s)"]
    rows = []
    for a in order:
        reps = arms[a]
        mets = [r["models"][0]["metrics"] for r in reps.values()]
        walls = []
        for s in reps:
            f = args.workdir / "runs" / f"{a}-s{s}" / "study-wall.json"
            if f.exists():
                walls.append(json.loads(f.read_text())["seconds"])

        def mean(k, mets=mets):
            vals = [m[k] for m in mets if m.get(k) is not None]
            return f"{100 * np.mean(vals):.2f}" + (f" ± {100 * np.std(vals):.2f}" if len(vals) > 1 else "")
        agree = []
        if teacher is not None:
            tpred = np.array(teacher["models"][0]["metrics"]["predictions"])
            agree = [np.mean(np.array(r["models"][0]["metrics"]["predictions"]) == tpred) for r in reps.values()]
        rows.append([a, ",".join(map(str, sorted(reps))), mean("top1"), mean("top5"), mean("macro_precision"),
                     mean("macro_recall"), mean("macro_f1"), mean("weighted_f1"),
                     f"{100 * np.mean(agree):.2f}" if agree else "-", f"{np.mean(walls):.0f}" if walls else "-"])
    if teacher is not None:
        tm = teacher["models"][0]["metrics"]
        rows.insert(0, ["teacher", "-", f"{100 * tm['top1']:.2f}", f"{100 * tm['top5']:.2f}",
                        f"{100 * tm['macro_precision']:.2f}", f"{100 * tm['macro_recall']:.2f}",
                        f"{100 * tm['macro_f1']:.2f}", f"{100 * tm['weighted_f1']:.2f}", "100", "-"])
    lines += ["## Zero-shot on the test shard (mean ± std over seeds, %)", "", _table(hdr, rows), ""]

    # Paired differences, seeds pooled: per image, the fraction of an arm's seeds that get it right.
    def pooled(a):
        return np.mean([_correct(r) for r in arms[a].values()], axis=0)
    pairs = [(a, "scratch") for a in order if a != "scratch"]
    pairs += [("best-online", best), ("best-1view", best), ("best-strong", best), ("hint", "kl"),
              ("hint+adapter", "kl"), ("hint+adapter", "hint")]
    prow = []
    for a, b in pairs:
        if a in arms and b in arms:
            d = paired_difference(pooled(a), pooled(b))
            prow.append([f"{a} − {b}", f"{100 * d['diff']:+.2f}", f"[{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]",
                         "yes" if d["lo"] > 0 or d["hi"] < 0 else "no", f"{d['p_mcnemar']:.3g}"])
    lines += ["## Paired differences in top-1 (points; seeds pooled per image; 95% paired bootstrap over the 5,000 "
              "test images; McNemar on images the two arms score differently)", "",
              _table(["comparison", "Δ top-1", "95% CI", "CI excludes 0", "McNemar p"], prow), ""]
    if teacher is not None and "scratch" in arms:
        t1 = teacher["models"][0]["metrics"]["top1"]
        s1 = np.mean([r["models"][0]["metrics"]["top1"] for r in arms["scratch"].values()])
        gap = [["arm", "top-1", "share of the scratch→teacher gap closed"]]
        for a in order:
            x = np.mean([r["models"][0]["metrics"]["top1"] for r in arms[a].values()])
            gap.append([a, f"{100 * x:.2f}", f"{100 * (x - s1) / (t1 - s1):.0f}%" if t1 != s1 else "-"])
        lines += ["## Gap closed", "", _table(gap[0], gap[1:]), ""]
    # Plots: training curves and accuracy against wall time.
    png = _plots(args, arms, order, out_md)
    lines += [f"![{p.stem}]({os.path.relpath(p, out_md.parent)})" for p in png] + [""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines))
    print(f"wrote {out_md}")


def _table(hdr, rows) -> str:
    return "\n".join(["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr),
                      *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)])


def _plots(args, arms, order, out_md: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for a in order:
        f = args.workdir / "runs" / f"{a}-s{min(arms[a])}"
        rows = [r for r in rundir.read_metrics(f) if r["kind"] == "val" and "val_top1_agreement" in r]
        if rows:
            ax.plot([r["step"] for r in rows], [100 * r["val_top1_agreement"] for r in rows], marker="o", label=a)
    ax.set_xlabel("step")
    ax.set_ylabel("validation top-1 agreement with the teacher (%)")
    ax.legend(fontsize=7)
    out.append(_save(fig, out_md.parent / "cifar10-study-curves.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in order:
        for s, r in arms[a].items():
            f = args.workdir / "runs" / f"{a}-s{s}" / "study-wall.json"
            if f.exists():
                ax.scatter(json.loads(f.read_text())["seconds"], 100 * r["models"][0]["metrics"]["top1"], label=a
                           if s == min(arms[a]) else None)
    ax.set_xlabel("training wall time (s, 2 CPU cores)")
    ax.set_ylabel("zero-shot top-1 on the test shard (%)")
    ax.legend(fontsize=7)
    out.append(_save(fig, out_md.parent / "cifar10-study-accuracy-wall.png"))
    return out


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    shared = Path(os.environ.get("KDCACHE_SHARED", HERE.parent.parent.parent / "shared"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(shared), help="folder holding data/cifar10 and teachers/")
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--arms", default=",".join([*ARMS, *VARIANTS]),
                    help=f"comma list of {', '.join([*ARMS, *VARIANTS])}; 'best' = the recipe found best")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--test", default=None, help="test shard(s) [default: SHARED/data/cifar10/cifar10-test-000.tar]")
    ap.add_argument("--train-shards", type=int, default=10)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", default=str(HERE / "README.md"))
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    args.workdir = Path(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "templates.txt").write_text(TEMPLATE + "\n")
    shared = Path(args.shared)
    teacher = f"local-dir:{shared / 'teachers' / 'kdc-cifar10-rn18'}"
    shards = tuple(str(shared / "data" / "cifar10" / f"cifar10-train-{i:03d}.tar") for i in range(args.train_shards))
    args.test = (args.test,) if args.test else (str(shared / "data" / "cifar10" / "cifar10-test-000.tar"),)
    arms = [best_recipe(args.workdir) if a == "best" else a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS and a not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; valid: {', '.join([*ARMS, *VARIANTS])}, best")
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    caches = {}
    for name in dict.fromkeys(arm_spec(a, args.workdir)[1] for a in arms):
        caches[name] = ensure_cache(name, args, teacher, shards)
    teacher_report(args, teacher)
    for seed in seeds:
        for arm in arms:
            run_arm(arm, seed, args, teacher, caches)
            write_results(args, Path(args.results))
    write_results(args, Path(args.results))
    # The same comparison with kdcache's own command, as a user would run it on their reports.
    reps = sorted(str(d) for d in (args.workdir / "reports").glob("*-s*") if (d / "report.json").exists())
    ref = "scratch-s0" if (args.workdir / "reports" / "scratch-s0").exists() else None
    _, written = write_compare([str(args.workdir / "reports" / "teacher"), *reps], out=str(args.workdir / "compare.md"),
                               paired_ci=True, reference=ref)
    print(f"wrote {written[0]} (kdcache compare --paired-ci{' --reference ' + ref if ref else ''})")


if __name__ == "__main__":
    main()
