"""The `kdcache` command line. Each command parses its options into a config and calls one `run`."""

from __future__ import annotations

import json
import logging
import sys

import click

from kdcache import __version__
from kdcache.cli import options
from kdcache.cli.options import CONTEXT


def _setup_logging(verbose: bool) -> None:
    # open_clip logs every model it builds at INFO on the root logger: keep third-party output at WARNING and
    # kdcache's own at INFO (DEBUG with -v).
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kdcache").setLevel(logging.DEBUG if verbose else logging.INFO)
    # Object-store clients log signed request headers at DEBUG (botocore: the access key id): never, even with -v.
    for name in ("botocore", "aiobotocore", "s3fs", "urllib3"):
        logging.getLogger(name).setLevel(logging.INFO)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="kdcache")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """kdcache: distil CLIP models from a cache of teacher outputs.

    Run the big teacher once (`kdcache build`) and store its embeddings, logits and the exact augmented views in
    a compressed Zarr cache; check it (`kdcache info`, `kdcache verify`). `kdcache quickstart` runs the whole path
    on tiny embedded data in a minute or two on a CPU.
    """
    _setup_logging(verbose)


@cli.command(context_settings=CONTEXT)
@click.option("--images", "images", multiple=True, metavar="PATTERN",
              help="WebDataset tar shards (repeatable): local paths, brace patterns 'shards/{00000..00009}.tar', "
                   "fsspec URLs. Members KEY.jpg|jpeg|png|webp, optional KEY.txt, KEY.json, KEY.cls.")
@click.option("--captions", "captions", multiple=True, metavar="SPEC",
              help="Caption corpora (repeatable): coco:FILE.json, cc:FILE.tsv, txt:FILE, jsonl:FILE "
                   "(prefix inferred from the suffix when omitted).")
@click.option("--teacher", required=True, metavar="SPEC",
              help="open_clip model: built-in name (with --pretrained), hf-hub:org/repo, local-dir:PATH, or a "
                   "model-config JSON file (flat, or nested {model_cfg, preprocess_cfg}).")
@options.pretrained("open_clip pretrained tag, or a local .pt/.bin/.safetensors checkpoint (built-in names and JSON).")
@options.allow_random_init("Accept a teacher whose weights were not loaded (tests, benchmarks). Its outputs are "
                           "meaningless.")
@click.option("--out", required=True, metavar="CACHE",
              help="Cache to write (a zarr v3 group): a directory or an fsspec URL (s3://bucket/cache.zarr, "
                   "memory://...); object-store credentials come from the environment, never the URL.")
@click.option("--views", default=1, type=click.IntRange(1),
              help="Views per image. View 0 is the teacher's eval transform; views 1..K-1 are random-resized-crop + "
                   "flip, keyed by (seed, shard, position, view) and stored so students can replay them exactly.")
@click.option("--augment", default=None, metavar="POLICY",
              help="Random views 1..K-1 (kdcache.augment, versioned), e.g. 'rrc=0.35-1,flip,randaugment=2x9,"
                   "erase=0.25,mix=mixup:0.2|cutmix:1.0': random-resized-crop scale range, flip, RandAugment N ops at "
                   "magnitude M, random erasing probability, mixup/cutmix (Beta alpha) with an earlier sample of the "
                   "same shard (window=W, mixprob=P). Stored as compact records; students replay them exactly. "
                   "[default: rrc=0.9-1,flip]")
@click.option("--hints", multiple=True, metavar="MODULE",
              help="Cache, per view, the pooled output of this teacher image-tower module (repeatable; `kdcache layers "
                   "--teacher SPEC` lists them): conv blocks by global average, transformer blocks by --hint-pool. "
                   "For `kdcache train --loss hint=W --hint-map STUDENT_MODULE=MODULE`.")
@click.option("--hint-pool", default="cls", type=click.Choice(["cls", "mean"]),
              help="Pooling of transformer-block hints: the CLS token or the mean of the patch tokens.")
@options.classes("Class vocabulary for the zero-shot head and top-k logits: cifar10, cifar100, imagenet, or a "
                 "text file with one class per line. Without it no logits are stored.")
@options.templates("Prompt templates: simple, openai, photo, or a file with one template per line containing {}.")
@click.option("--topk", default=10, type=click.IntRange(1), help="Top-k logits stored per view (capped at classes).")
@click.option("--batch-size", default=64, type=click.IntRange(1),
              help="Teacher batch (formed within a shard; part of the cache identity on CPU).")
@click.option("--workers", default=0, type=click.IntRange(0),
              help="DataLoader decode workers. 0 on CPU (decode competes with the teacher for cores); use some on GPU.")
@options.threads("torch CPU threads [default: torch's default]. Part of the cache identity: CPU results "
                 "depend on it.")
@options.device("Teacher device: cpu, cuda, cuda:1, ...")
@options.precision("Teacher autocast precision (CUDA only; CPU always runs fp32).")
@options.embed_dtype("Storage of the embeddings: fp16, fp32, or int8 with a per-vector scale (about half of fp16's "
                     "bytes; lossy, see README 'Performance').")
@click.option("--decode", default="cpu", type=click.Choice(["cpu", "gpu"]),
              help="JPEG decoder: cpu (PIL in the DataLoader workers) or gpu (nvjpeg on the teacher's CUDA device, "
                   "batched, views resized there; workers only read bytes; other formats fall back to PIL per sample). "
                   "Recorded in the cache and part of its --resume identity; CUDA students replay it the same way, "
                   "others with PIL (train --decode; README).")
@click.option("--seed", default=0, type=int, help="Seed of the view generator.")
@click.option("--limit", default=None, type=click.IntRange(1),
              help="Only the first N image samples and N caption records (dry runs; single process).")
@options.max_pixels("Images with more pixels are rejected as too_large.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted build, or extend it with inputs appended at the end.")
@click.option("--overwrite", is_flag=True, help="Delete an existing cache at --out and build again.")
@click.option("--allow-failed-shards", is_flag=True,
              help="Exit 0 even when some shards failed (truncated tars); they stay marked failed in the cache.")
@options.no_progress("No progress bars.")
def build(**kw) -> None:
    """Run the teacher once over image shards and caption corpora and write the cache.

    \b
    Example:
      kdcache build --images 'data/cifar10/cifar10-train-{000..009}.tar' --classes cifar10 --views 2 \\
          --teacher local-dir:teachers/kdc-cifar10-rn18 --out cifar10.zarr
    """
    from kdcache.cache.build import print_summary, run
    from kdcache.cache.config import BuildConfig, BuildError

    if kw["resume"] and kw["overwrite"]:
        raise click.UsageError("--resume and --overwrite are mutually exclusive")
    cfg = BuildConfig(
        out=kw["out"], teacher=kw["teacher"], images=kw["images"], captions=kw["captions"],
        pretrained=kw["pretrained"], allow_random_init=kw["allow_random_init"], views=kw["views"],
        classes=kw["classes"], templates=kw["templates"], topk=kw["topk"], batch_size=kw["batch_size"],
        workers=kw["workers"], threads=kw["threads"], device=kw["device"], precision=kw["precision"],
        embed_dtype=kw["embed_dtype"], augment=kw["augment"], hints=kw["hints"], hint_pool=kw["hint_pool"],
        seed=kw["seed"], limit=kw["limit"], decode=kw["decode"],
        max_pixels=kw["max_pixels"],
        resume=kw["resume"], overwrite=kw["overwrite"], progress=not kw["no_progress"],
    )
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        click.echo("interrupted: units finished so far are kept; rerun with --resume to continue", err=True)
        sys.exit(130)
    except (BuildError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    print_summary(result)
    if not result.ok and not kw["allow_failed_shards"]:
        click.echo("build finished with failed or missing units (see above); the cache is marked incomplete",
                   err=True)
        sys.exit(1)


@cli.command("pack", context_settings=CONTEXT)
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, metavar="PATTERN",
              help="Shards to write: an integer %-format in the file name, e.g. 'shards/%05d.tar'. The directory must "
                   "be new or empty; classes.txt (one class per line, index = line number) and pack.json go there too.")
@click.option("--shard-size", default=10_000, type=click.IntRange(1), help="Images per shard.")
@click.option("--captions-from-class", default=None, metavar="TEMPLATE",
              help="Also write a .txt caption per image from its class folder name, e.g. 'a photo of a {}.'.")
@options.no_progress()
def pack_cmd(folder: str, out: str, shard_size: int, captions_from_class: str | None, no_progress: bool) -> None:
    """Pack an image-folder tree FOLDER/CLASS/IMAGE (torchvision ImageFolder, CIFAR-10, ImageNet) into WebDataset
    shards for `kdcache build`: image bytes unchanged, .cls = index of the sorted class folders, optional .txt.

    \b
    Example:
      kdcache pack data/cifar10/train --out shards/cifar10-train-%05d.tar --captions-from-class 'a photo of a {}.'
      kdcache build --images 'shards/cifar10-train-{00000..00004}.tar' --classes shards/classes.txt ...
    """
    from kdcache.shards.pack import PackError, format_summary, pack

    try:
        result = pack(folder, out=out, shard_size=shard_size, captions_from_class=captions_from_class,
                      progress=not no_progress)
    except KeyboardInterrupt:
        click.echo("interrupted: the output directory holds no finished pack (no pack.json); remove it and rerun",
                   err=True)
        sys.exit(130)
    except PackError as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_summary(result))


@cli.command(context_settings=CONTEXT)
@click.argument("cache", metavar="CACHE")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(cache: str, as_json: bool) -> None:
    """Describe a cache: teacher, counts, views, classes, size, compression, status, rejects, duplicate keys.

    CACHE is a directory or an fsspec URL (s3://bucket/cache.zarr).
    """
    from kdcache.cache.reader import CacheError
    from kdcache.cache.verify import format_info
    from kdcache.cache.verify import info as cache_info

    try:
        d = cache_info(cache)
    except CacheError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(d, indent=2) if as_json else format_info(d))


@cli.command(context_settings=CONTEXT)
@click.argument("cache", metavar="CACHE")
@options.no_progress()
def verify(cache: str, no_progress: bool) -> None:
    """Check every chunk of a cache: present, decodable (checksums), shapes and row counts, each array against the
    content digest its unit's status records (a chunk copied from another shard), finite unit-norm embeddings.

    Exits non-zero naming the array, chunk and shard of every problem. CACHE is a directory or an fsspec URL
    (s3://bucket/cache.zarr): on an object store too, every chunk must exist as an object.
    """
    from kdcache.cache.reader import CacheError
    from kdcache.cache.verify import verify as run_verify

    try:
        rep = run_verify(cache, progress=not no_progress)
    except CacheError as e:
        raise click.ClickException(str(e)) from None
    for p in rep.problems:
        click.echo(f"PROBLEM {p}", err=True)
    for n in rep.notes:
        click.echo(f"NOTE {n}")
    click.echo(f"verified {rep.checked_units} units, {rep.checked_chunks} chunks: "
               + ("OK" if rep.ok else f"{len(rep.problems)} problem(s)"))
    if not rep.ok:
        sys.exit(1)


@cli.command(context_settings=CONTEXT)
@click.option("--teacher", default=None, metavar="SPEC", help="A teacher (any --teacher form); weights are not needed.")
@click.option("--student", default=None, metavar="NAME|CONFIG.json", help="A student (any --student form).")
@options.pretrained("--pretrained of --teacher (a built-in open_clip name).")
@click.option("--pool", default="cls", type=click.Choice(["cls", "mean"]),
              help="How transformer-block outputs are pooled for the 'pooled' column.")
def layers(teacher: str | None, student: str | None, pretrained: str | None, pool: str) -> None:
    """List the image tower's hookable modules with their output shapes and pooled widths: the names that
    `kdcache build --hints` and `kdcache train --hint-map STUDENT_MODULE=TEACHER_MODULE` take."""
    import torch

    from kdcache.hints import list_layers

    if (teacher is None) == (student is None):
        raise click.UsageError("give --teacher SPEC or --student SPEC")
    try:
        if teacher is not None:
            from kdcache.teacher import load_teacher

            t = load_teacher(teacher, pretrained=pretrained, allow_random_init=True)
            model, size = t.model, t.preprocess["size"]
            x = t.normalize_images(torch.zeros(2, 3, size[0], size[1], dtype=torch.uint8))
        else:
            from kdcache.train.students import build_student

            s = build_student(student, tower="image", teacher_dim=1)  # the projection is not listed
            model, size = s.model, s.preprocess["size"]
            x = s.normalize_pixels(torch.zeros(2, 3, size[0], size[1], dtype=torch.uint8))
        rows = list_layers(model, x, mode=pool)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'module':{width}s}  {'type':24s}  {'output shape':22s}  pooled")
    for r in rows:
        click.echo(f"{r['name']:{width}s}  {r['type'][:24]:24s}  {str(r['shape']):22s}  {r['pooled']}")


@cli.command(context_settings=CONTEXT)
@click.argument("cache", metavar="CACHE")
@click.option("--key", required=True, help="The sample's __key__ (as in its shard).")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="PNG to write. [default: views-KEY.png]")
@click.option("--images", multiple=True, metavar="PATTERN",
              help="Where the cache's image shards are now, if they moved (same shards, same order).")
def show(cache: str, key: str, out: str | None, images: tuple[str, ...]) -> None:
    """A contact sheet of one sample's views exactly as the teacher saw them, each captioned with its view record
    (crop, flip, ops, erasing, mixing) and the teacher's top-3 classes: the picture to look at when tuning --augment.
    """
    from kdcache.cache.reader import CacheError
    from kdcache.cache.show import contact_sheet

    try:
        path = contact_sheet(cache, key, out=out or f"views-{key}.png", images=images)
    except (CacheError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")


@cli.command(context_settings=CONTEXT)
@click.option("--cache", required=True, metavar="CACHE",
              help="The teacher cache (from kdcache build): a directory or an fsspec URL (s3://bucket/cache.zarr).")
@options.tower("Which student tower to train.")
@click.option("--student", required=True, metavar="NAME|CONFIG.json",
              help="kdcache student (kdc-seed-image-vit, kdc-seed-text, kdc-tiny-image, kdc-tiny-text), any open_clip "
                   "model name, or an open_clip model-config JSON. Random init unless --student-pretrained.")
@click.option("--student-pretrained", default=None, metavar="TAG|PATH", help="Initial weights for the student.")
@click.option("--out", required=True, type=click.Path(),
              help="Run directory (config, metrics, checkpoints): a local path; object-store URLs are refused.")
@click.option("--loss", "losses", multiple=True, metavar="NAME=WEIGHT",
              help="Loss terms (repeatable), e.g. --loss l1=0.6 --loss ce=0.35 --loss kl=0.05, or a preset "
                   "(--loss seed001). Image: kl, ce, l1, mse, cosine, icl, affinity; text: l1, mse, cosine, icl, "
                   "affinity. [default: a label-free default per tower]")
@click.option("--temperature", default=2.0, type=options.finite(0, min_open=True),
              help="KD temperature T for kl (scaled by T^2) and affinity.")
@click.option("--epochs", default=None, type=click.IntRange(1), help="Epochs [default: 1 unless --max-steps].")
@click.option("--max-steps", default=None, type=click.IntRange(1), help="Optimizer steps (instead of --epochs).")
@click.option("--batch-size", default=64, type=click.IntRange(1),
              help="Samples per micro-batch; under torchrun per rank (the global batch is ranks x this).")
@click.option("--accum-steps", default=1, type=click.IntRange(1), help="Gradient accumulation micro-batches per step.")
@click.option("--lr", default=5e-4, type=options.finite(0, min_open=True),
              help="AdamW peak learning rate (linear warmup, cosine decay).")
@click.option("--weight-decay", default=0.05, type=options.finite(0),
              help="AdamW weight decay (not on biases and norms).")
@click.option("--warmup-steps", default=None, type=click.IntRange(0), help="Warmup steps [default: 5% of steps].")
@click.option("--grad-clip", default=1.0, type=options.finite(0),
              help="Clip the total gradient norm to this; 0 turns clipping off (the norm is still logged).")
@options.device("cpu, cuda, cuda:1, ...")
@options.precision("Autocast precision (CUDA only; CPU trains in fp32).")
@click.option("--workers", default=0, type=click.IntRange(0),
              help="DataLoader workers (decode + crop replay for the image tower). Does not change the result.")
@options.threads("torch CPU threads [default: torch's].")
@click.option("--images", multiple=True, metavar="PATTERN",
              help="Where the cache's image shards are now, if they moved (same shards, same order).")
@click.option("--seed", default=0, type=int, help="Seed of student init and data order.")
@click.option("--val-fraction", default=0.05, type=options.finite(0, 0.5),
              help="Fixed validation split, chosen by key hash.")
@click.option("--buffer", default=2048, type=click.IntRange(1), help="In-memory shuffle buffer (rows).")
@click.option("--hint-map", "hint_map", multiple=True, metavar="STUDENT_MODULE=TEACHER_HINT",
              help="For --loss hint=W (repeatable): which student image-tower module learns which cached teacher hint "
                   "(built with --hints; `kdcache layers --student/--teacher` lists module paths and widths).")
@click.option("--hint-adapter", default="linear", type=click.Choice(["linear", "none"]),
              help="A learned linear map from each student feature to its teacher hint's width (training only, never "
                   "exported), or none (the widths must match).")
@click.option("--views-per-sample", default=1, type=click.IntRange(1),
              help="Image tower: each decoded picture gives M of its cached views to the same batch (repeated "
                   "augmentation; decoding is shared). --batch-size counts views and must be a multiple of M.")
@click.option("--decode", default="auto", type=click.Choice(["auto", "cpu", "gpu"]),
              help="Image tower, a cache built with --decode gpu: replay its views as the build made them (nvjpeg "
                   "decode and resize on the GPU; gpu), or with PIL in the workers (cpu; pixels a level or two away "
                   "from the teacher's). auto: gpu on a CUDA student, else cpu. Other caches always replay with PIL.")
@click.option("--checkpoint-every", default=200, type=click.IntRange(1), help="Checkpoint every N steps (and at "
              "each epoch end).")
@options.subset("rows", note=" Applied before the validation split. Text tower: a paired caption matches as its "
                "image; a corpus record by key cap:CORPUS:INDEX and corpus file name.",
                labels_note=" The cache's vocabulary (--classes of the build) names them; refused for rows without "
                "labels (caption corpora).")
@click.option("--max-skipped-steps", default=20, type=click.IntRange(0),
              help="fp16 on CUDA: stop after more than this many consecutive steps the gradient scaler skips as "
                   "non-finite (it skips some by design while it finds its scale). In fp32/bf16 a non-finite loss or "
                   "gradient stops the run at once.")
@click.option("--allow-incomplete", is_flag=True, help="Train on a cache whose build has failed or missing shards.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--report-to", default="none", metavar="TRACKERS",
              help="Also log every metrics row (losses, lr, grad norm, samples/s, validation) to tensorboard "
                   "(RUN/tensorboard/), wandb (RUN/wandb/; pip install 'kdcache[wandb]'), all, or none; a comma list "
                   "such as tensorboard,wandb works too. metrics.jsonl/csv are written either way.")
@click.option("--online-teacher", default=None, metavar="SPEC",
              help="Online KD baseline: run this teacher (any --teacher form) live on every batch instead of reading "
                   "its outputs from the cache; same student, losses, views and schedule. Slow by design.")
@click.option("--online-pretrained", default=None, metavar="TAG|PATH", help="--pretrained of --online-teacher.")
@click.option("--online-allow-random-init", is_flag=True,
              help="Accept an --online-teacher whose weights were not loaded (benchmarks).")
@options.no_progress()
def train(**kw) -> None:
    """Train a student image or text tower from the cache alone (the teacher is never built).

    With --online-teacher the teacher runs in the loop instead (the expensive baseline the cache replaces).

    \b
    Example:
      kdcache train --cache cifar10.zarr --tower image --student kdc-seed-image-vit \\
          --loss seed001 --temperature 4 --epochs 5 --out runs/seed001
    """
    from kdcache.cache.reader import CacheError
    from kdcache.train.config import TrainConfig, TrainError
    from kdcache.train.dataspec import DataError
    from kdcache.train.hinting import parse_hint_map
    from kdcache.train.loop import run
    from kdcache.train.losses import parse_loss_args
    from kdcache.train.tracking import parse_report_to

    try:
        losses = tuple(parse_loss_args(kw.pop("losses")).items())
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--loss") from None
    try:
        kw["report_to"] = parse_report_to(kw["report_to"])
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    kw["progress"] = not kw.pop("no_progress")
    online = {"teacher": kw.pop("online_teacher"), "pretrained": kw.pop("online_pretrained"),
              "allow_random_init": kw.pop("online_allow_random_init")}
    if online["teacher"] is None and (online["pretrained"] is not None or online["allow_random_init"]):
        raise click.UsageError("--online-pretrained and --online-allow-random-init need --online-teacher")
    try:
        kw["hint_map"] = parse_hint_map(kw["hint_map"])
    except TrainError as e:
        raise click.BadParameter(str(e), param_hint="--hint-map") from None
    try:  # the option types refuse bad numbers first; TrainConfig re-checks them for library callers
        cfg = TrainConfig(losses=losses, subset=options.subset_from(kw), **kw)
    except TrainError as e:
        raise click.UsageError(str(e)) from None
    # Every kdcache error a user can cause is a ValueError subclass (TrainError, CacheError, DataError, StudentError,
    # TeacherError, unknown or misapplied losses): shown as a message, not a traceback.
    errors: tuple[type[Exception], ...] = (TrainError, CacheError, DataError, ValueError, FileNotFoundError)
    if online["teacher"] is not None:  # the only path that builds a teacher: imported only here
        from kdcache.online import run_online
    try:
        result = run(cfg) if online["teacher"] is None else run_online(cfg, **online)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun with --resume to continue from the latest checkpoint", err=True)
        sys.exit(130)
    except errors as e:
        raise click.ClickException(str(e)) from None
    v = result.final_val
    click.echo(f"run: {result.out}  steps: {result.steps}  " + "  ".join(
        f"{k}={val:.4f}" for k, val in v.items() if isinstance(val, float)))


@cli.command(context_settings=CONTEXT)
@click.option("--image", "image_run", type=click.Path(exists=True), default=None, metavar="RUN",
              help="Training run whose image tower to export.")
@click.option("--image-from-teacher", default=None, metavar="SPEC",
              help="Take the image tower from this teacher (any --teacher form) instead.")
@click.option("--text", "text_run", type=click.Path(exists=True), default=None, metavar="RUN",
              help="Training run whose text tower to export.")
@click.option("--text-from-teacher", default=None, metavar="SPEC",
              help="Take the text tower from this teacher (any --teacher form) instead.")
@options.pretrained("--pretrained of the teacher given above.")
@options.allow_random_init("Accept a teacher without weights (a run distilled from one: tests, the quickstart). "
                           "It must still be the run's teacher: the same model config and init seed.")
@click.option("--out", required=True, type=click.Path(), help="Directory to write (open_clip local-dir format).")
def export(image_run, image_from_teacher, text_run, text_from_teacher, pretrained, allow_random_init, out) -> None:
    """Export a full CLIP that stock open_clip loads: create_model_and_transforms("local-dir:DIR").

    Each tower comes from a training run (its projection folded in) or from the teacher the run distilled.

    \b
    Example:
      kdcache export --image runs/img --text-from-teacher local-dir:teachers/kdc-cifar10-rn18 --out exported/
    """
    from kdcache.export import ExportError
    from kdcache.export import export as run_export
    from kdcache.teacher import TeacherError
    from kdcache.train.config import TrainError

    try:
        path = run_export(out=out, image_run=image_run, text_run=text_run, image_from_teacher=image_from_teacher,
                          text_from_teacher=text_from_teacher, pretrained=pretrained,
                          allow_random_init=allow_random_init)
    except (ExportError, TrainError, TeacherError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"exported {path}  (load: open_clip.create_model_and_transforms('local-dir:{path}'))")


@cli.command(context_settings=CONTEXT)
@click.option("--workdir", default="kdcache-quickstart", type=click.Path(),
              help="Where the sample data, cache and reports go.")
@click.option("--teacher", default=None, metavar="SPEC",
              help="Use a real teacher instead of the embedded random tiny one (any --teacher form).")
@click.option("--images", multiple=True, metavar="PATTERN", help="Use these shards instead of the generated ones.")
def quickstart(workdir: str, teacher: str | None, images: tuple[str, ...]) -> None:
    """The whole path on an embedded default, in a minute or two on a CPU: sample shards and captions, build the
    cache with a tiny random-init teacher, info, verify."""
    from kdcache.quickstart import run_quickstart

    sys.exit(run_quickstart(workdir, teacher=teacher, images=images))


def _register_eval_commands() -> None:
    # eval/compare live in their own module (it has its own click options); registered here so `kdcache --help`
    # lists every command.
    from kdcache.cli.eval_cmds import compare_cmd, eval_cmd

    cli.add_command(eval_cmd)
    cli.add_command(compare_cmd)


_register_eval_commands()

if __name__ == "__main__":
    cli()
