"""What a build is asked to do (BuildConfig), what it answers (BuildResult) and how it refuses (BuildError).

The types the build's steps share (stream, teacher pass, writer and the orchestration in `kdcache.cache.build`) live
here, below all of them, so no step has to import the orchestration; like `kdcache.train.config` for training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdcache.augment import DEFAULT_POLICY, Policy, PolicyError, parse_policy
from kdcache.cache import schema
from kdcache.shards import DEFAULT_MAX_PIXELS


class BuildError(RuntimeError):
    """A build that cannot start or continue; the message says what to change."""


@dataclass(frozen=True)
class BuildConfig:
    """The options of `kdcache build`, frozen; `kdcache.cache.build.run(cfg)` carries them out."""

    out: str
    teacher: str
    images: tuple[str, ...] = ()
    captions: tuple[str, ...] = ()
    pretrained: str | None = None
    allow_random_init: bool = False
    views: int = 1
    classes: str | None = None
    templates: str | None = None
    topk: int = 10
    batch_size: int = 64
    workers: int = 0
    threads: int | None = None        # None: torch's default for this machine, recorded as resolved
    device: str = "cpu"
    precision: str = "fp32"
    embed_dtype: str = "fp16"
    augment: str | None = None        # kdcache.augment policy spec for views >= 1; None: today's crop + flip
    hints: tuple[str, ...] = ()       # image-tower module paths whose pooled outputs are cached per view
    hint_pool: str = "cls"            # how token outputs are pooled (kdcache.hints.POOLS); conv outputs: average
    decode: str = "cpu"               # JPEG decoder (kdcache.shards.gpudecode.DECODERS): PIL in workers, or nvjpeg
    decode_device: str | None = None  # internal: run the gpu decode path on this device instead (tests use "cpu")
    seed: int = 0
    limit: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    background: tuple[int, int, int] = (255, 255, 255)
    resume: bool = False
    overwrite: bool = False
    allow_incomplete: bool = False    # exit 0 even if some shards failed (they stay marked failed in the cache)
    progress: bool = True


def view_policy(cfg: BuildConfig) -> Policy | None:
    """The --augment policy, or None for the default crop + flip views (whose caches stay exactly as before)."""
    if not cfg.augment:
        return None
    try:
        policy = parse_policy(cfg.augment)
    except PolicyError as e:
        raise BuildError(f"--augment: {e}") from None
    return None if policy == parse_policy(DEFAULT_POLICY) else policy


@dataclass
class BuildResult:
    """Where the cache is, its status, the summary consolidation recorded, and the units that failed or are missing."""

    out: str
    status: str
    summary: dict
    failed_units: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == schema.CACHE_COMPLETE
