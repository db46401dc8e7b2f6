"""Click settings and options that several commands share, defined once (help texts may differ per command, the
name, type, default and choices may not)."""

from __future__ import annotations

import click

from kdcache.constants import DEFAULT_MAX_PIXELS, EMBED_DTYPES, PRECISIONS, TOWERS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 120, "show_default": True}


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
