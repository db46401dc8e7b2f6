"""`kdcache eval` and `kdcache compare`: parse options into a config and call `kdcache.eval.run.run` / `compare`.

Registered on the `kdcache` group in kdcache/cli/main.py.
"""

from __future__ import annotations

from pathlib import Path

import click

from kdcache.cli import options
from kdcache.cli.options import CONTEXT


@click.command("eval", context_settings=CONTEXT)
@click.option("--model", "models", multiple=True, required=True, metavar="SPEC|DIR|RUN",
              help="Model to evaluate (repeatable): an exported dir (DIR or local-dir:DIR), a training run dir (its "
                   "image tower; class head from its cache), or any --teacher form (open_clip name with --pretrained, "
                   "hf-hub:org/repo, local-dir:PATH, model-config JSON).")
@click.option("--data", "data", multiple=True, required=True, metavar="PATTERN",
              help="WebDataset shards (repeatable; brace patterns, fsspec URLs): labelled (.cls) for zeroshot, "
                   "captioned (.txt/.json) for retrieval.")
@click.option("--task", required=True, type=click.Choice(["zeroshot", "retrieval"]),  # = eval.tasks.TASKS (tested)
              help="zeroshot: top-1/top-5, P/R/F1, confusion; retrieval: image<->text R@1/5/10.")
@options.classes("Class vocabulary for zeroshot: cifar10, cifar100, imagenet, or a file with one class per line "
                 "(index = .cls label).")
@options.templates("Prompt templates for zeroshot: simple, openai, photo, or a file, one template per line.")
@click.option("--cache", default=None, metavar="CACHE",
              help="A kdcache cache: agreement with its cached teacher outputs when no teacher is among --model and "
                   "the eval shards are the cache's; also where a run's cache is if it moved. A directory or an "
                   "fsspec URL (s3://bucket/cache.zarr).")
@options.pretrained("--pretrained of the teacher-form --model (open_clip tag or checkpoint file).")
@options.allow_random_init("Accept a teacher-form model without weights (tests, the quickstart): its numbers are "
                           "meaningless.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Report directory: report.json, report.md; zeroshot adds per model a confusion-*.csv, a "
                   "confusion-*.png heatmap and a per-class-*.png (precision/recall/F1 bars).")
@click.option("--limit", default=None, type=click.IntRange(1), help="Evaluate only the first N usable samples.")
@options.subset("test samples", note=" The rule of `kdcache train`, so a subset model is scored on the matching "
                "subset of the test shards.",
                labels_note=" Names are --classes names. zeroshot scores them among these classes only; retrieval "
                "takes ids (the .cls numbers).")
@click.option("--batch-size", default=64, type=click.IntRange(1), help="Images per forward pass.")
@options.device("cpu, cuda, cuda:1, ... (evaluation and timing).")
@options.precision("Autocast precision (CUDA only; CPU runs fp32).")
@options.threads("torch CPU threads [default: torch's]. CPU timings depend on it; it is recorded.")
@click.option("--latency-batch", default=32, type=click.IntRange(1), help="Batch size of the throughput measurement.")
@click.option("--latency-repeats", default=10, type=click.IntRange(1),
              help="Timed calls per model and batch size (the median is reported).")
@click.option("--latency-warmup", default=2, type=click.IntRange(0), help="Untimed warm-up calls per model.")
@options.no_progress()
def eval_cmd(**kw) -> None:
    """Evaluate teacher and students on the same shards: accuracy, agreement with the teacher, size and latency.

    All models are timed in this one process, interleaved, so their speed ratios are honest.

    \b
    Example:
      kdcache eval --model ViT-B-32 --pretrained openai --model exported/ --model runs/img \\
          --data 'cifar10-test-{000..009}.tar' --task zeroshot --classes cifar10 --out reports/cifar10
    """
    from kdcache.cache.reader import CacheError
    from kdcache.eval.models import ModelError
    from kdcache.eval.run import EvalConfig, EvalError, run
    from kdcache.eval.tasks import get_task

    kw["progress"] = not kw.pop("no_progress")
    cfg = EvalConfig(models=tuple(kw.pop("models")), data=tuple(kw.pop("data")), subset=options.subset_from(kw), **kw)
    try:
        report = run(cfg)
    except (EvalError, ModelError, CacheError) as e:  # CacheError: a damaged --cache or run's cache (reads fail closed)
        raise click.ClickException(str(e)) from None
    task = get_task(report["task"])
    for m in report["models"]:
        met = m["metrics"]
        score = task.score_text(met)
        click.echo(f"{m['label']}{' (teacher)' if m['is_teacher'] else ''}: {score}, "
                   f"{m['latency']['ms_per_image_b1']:.2f} ms/img")
    out = Path(cfg.out)
    click.echo(f"report: {out / 'report.md'}  ({out / 'report.json'})")
    pngs = [out / name for m in report["models"] for name in (m["metrics"].get("plots") or {}).values()]
    if pngs:
        click.echo("plots: " + ", ".join(str(p) for p in pngs))


@click.command("compare", context_settings=CONTEXT)
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, metavar="FILE.md",
              help="Markdown file to write (plots go next to it); '-' prints only. [default: REPORT_DIR/../compare.md "
                   "of the first report]")
@click.option("--remeasure", is_flag=True,
              help="Reload every model and re-time them all side by side in this process (else ratios between "
                   "models timed in separate evals are marked †).")
@options.device("Device for --remeasure.")
@click.option("--run", "runs", multiple=True, type=click.Path(exists=True, file_okay=False), metavar="RUN",
              help="Extra training run whose curves to plot (repeatable); runs evaluated directly are plotted anyway.")
@click.option("--latency-batch", default=None, type=click.IntRange(1),
              help="Throughput batch for --remeasure [default: the first report's].")
@click.option("--latency-repeats", default=10, type=click.IntRange(1), help="Timed calls per model for --remeasure.")
@click.option("--latency-warmup", default=2, type=click.IntRange(0), help="Warm-up calls per model for --remeasure.")
@click.option("--paired-ci", is_flag=True,
              help="Zero-shot: each model's top-1 minus the reference's on the same images, with a 95%% "
                   "paired-bootstrap confidence interval over images and McNemar's exact p.")
@click.option("--reference", default=None, metavar="NAME",
              help="The model --paired-ci compares against, by its row name [default: the teacher, else the first].")
def compare_cmd(reports: tuple[str, ...], out: str | None, remeasure: bool, device: str, runs: tuple[str, ...],
                latency_batch: int | None, latency_repeats: int, latency_warmup: int, paired_ci: bool,
                reference: str | None) -> None:
    """Compare eval reports: one table, teacher first, with ×smaller, ×faster, Δ top-1 and Δ macro-F1, plus two
    PNG plots next to --out (training curves, accuracy vs latency). Rows get short names; the full specs are listed
    under the table.

    \b
    Example:
      kdcache compare reports/seed001 reports/seed002 --out reports/compare.md
    """
    from kdcache.eval.compare import CompareError, write_compare
    from kdcache.eval.models import ModelError

    if out is None:
        out = str(Path(reports[0]).resolve().parent / "compare.md")
    try:
        text, written = write_compare(list(reports), out=None if out == "-" else out, remeasure=remeasure, runs=runs,
                                      device=device, latency_batch=latency_batch, latency_repeats=latency_repeats,
                                      latency_warmup=latency_warmup, paired_ci=paired_ci, reference=reference)
    except (CompareError, ModelError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(text)
    for p in written:
        click.echo(f"wrote {p}")
