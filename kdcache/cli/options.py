"""Click settings and options that several commands share, defined once (help texts may differ per command, the
name, type, default and choices may not)."""

from __future__ import annotations

import math

import click

from kdcache.constants import DEFAULT_MAX_PIXELS, EMBED_DTYPES, PRECISIONS, TOWERS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 120, "show_default": True}


class FiniteFloat(click.FloatRange):
    """A float option that refuses NaN and ±inf (click's FloatRange lets them through: NaN compares false with every
    bound), then checks the range. Every float option of every command takes this type."""

    name = "finite float"

    def convert(self, value, param, ctx):
        v = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number (NaN and inf are refused).", param, ctx)
        return super().convert(v, param, ctx)


def finite(min: float | None = None, max: float | None = None, *, min_open: bool = False,
           max_open: bool = False) -> FiniteFloat:
    """A finite float in [min, max] (open ends with min_open/max_open); --help shows the range."""
    return FiniteFloat(min, max, min_open=min_open, max_open=max_open)


def classes(help: str):
    return click.option("--classes", default=None, metavar="NAME|FILE", help=help)


def templates(help: str):
    return click.option("--templates", default=None, metavar="NAME|FILE", help=help + " [default: simple]")


def device(help: str = "cpu, cuda, cuda:1, ..."):
    return click.option("--device", default="cpu", help=help)


def precision(help: str):
    return click.option("--precision", default="fp32", type=click.Choice(PRECISIONS), help=help)


def threads(help: str = "torch CPU threads [default: torch's]."):
    return click.option("--threads", default=None, type=click.IntRange(1), help=help)


def pretrained(help: str):
    return click.option("--pretrained", default=None, metavar="TAG|PATH", help=help)


def allow_random_init(help: str, flag: str = "--allow-random-init"):
    return click.option(flag, is_flag=True, help=help)


def no_progress(help: str = "No progress bar."):
    return click.option("--no-progress", is_flag=True, help=help)


def tower(help: str):
    return click.option("--tower", required=True, type=click.Choice(TOWERS), help=help)


def embed_dtype(help: str):
    return click.option("--embed-dtype", default="fp16", type=click.Choice(EMBED_DTYPES), help=help)


def max_pixels(help: str):
    return click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, type=click.IntRange(1), help=help)


def subset(what: str, note: str = "", labels_note: str = ""):
    """--include, --exclude and --labels (kdcache.subset), which `subset_from` turns into a Subset."""
    rule = ("matching the __key__ or the shard file name: a glob matches the whole name (fnmatch, case-sensitive), "
            "re:REGEX anywhere in it (re.search)")

    def wrap(f):
        f = click.option("--labels", "labels", multiple=True, metavar="L,...",
                         help=f"Keep only {what} of these classes: ids or names of the vocabulary (repeatable, comma "
                              f"separated).{labels_note}")(f)
        f = click.option("--exclude", "exclude", multiple=True, metavar="GLOB|re:REGEX",
                         help=f"Drop {what} that a pattern matches (repeatable; see --include).")(f)
        return click.option("--include", "include", multiple=True, metavar="GLOB|re:REGEX",
                            help=f"Keep only {what} that some pattern matches (repeatable), {rule}.{note}")(f)
    return wrap


def subset_from(kw: dict):
    """Pop the `subset` options from a command's keywords as a Subset (a bad pattern or label is a usage error)."""
    from kdcache.subset import Subset, SubsetError, parse_labels

    try:
        return Subset(include=kw.pop("include"), exclude=kw.pop("exclude"), labels=parse_labels(kw.pop("labels")))
    except SubsetError as e:
        raise click.UsageError(str(e)) from None
