"""What `kdcache eval` was asked, and the error for what cannot run as asked.

Its own module so that the tasks (`kdcache.eval.tasks`) can check and raise without importing the orchestration in
`kdcache.eval.run`, which imports them; `kdcache.eval.run` re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.subset import Subset


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the option."""


@dataclass(frozen=True)
class EvalConfig:
    """What `kdcache eval` was asked (one field per option); see the CLI's --help for each."""

    models: tuple[str, ...]
    data: tuple[str, ...]
    task: str
    out: str
    classes: str | None = None
    templates: str | None = None              # None: the build's default ("simple")
    cache: str | None = None
    pretrained: str | None = None             # for the one --model that is a built-in name or JSON config
    allow_random_init: bool = False
    limit: int | None = None
    batch_size: int = 64
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    latency_batch: int = 32
    latency_repeats: int = 10
    latency_warmup: int = 2
    progress: bool = True
    subset: Subset = Subset()                 # --include/--exclude/--labels (kdcache.subset): which samples count
