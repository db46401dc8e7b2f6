"""The data a run trains on, pinned when it starts: the cache's units and their statuses at that moment.

    cache = open_for_run(cfg)          # refuses a cache a build is writing; pinned (the old pin on --resume)
    spec = DataSpec(..., pin=cache.pin)  # every reader of the run (workers included) sees the pinned units only
    watch = CacheWatch.start(cfg, cache) # at each checkpoint: stop if a build starts extending the cache

A cache can grow under a run: `kdcache build --resume` with shards or corpora appended extends it in place. The run
must neither pick up the new units half way (its data order would change) nor be unable to continue (the cache's
fingerprint changes). So a run records, in config.json, a `CachePin`: the cache's fingerprint, status and capabilities
when it started, how many image and caption inputs it had (and a digest of them), and each unit that had a status then,
with a digest of that status. Readers given the pin see exactly those units (`PinnedCache`): the inputs cut back to the
pinned ones, units that had no status then left out, and each unit's status checked against its digest when read, so a
unit rewritten since (a failed shard redone, a cache rebuilt) is refused naming it. A `--resume` compares the pin, not
the whole-cache fingerprint: an extension is accepted (and logged), anything else is refused.

The stop rule: a run does not start while a build holds the cache's lock (`kdcache.locks`) unless --allow-incomplete
(then it trains on the units finished so far, pinned, and does not stop). A run that started on an idle cache checks,
after each checkpoint, whether a build took the lock or the cache's root changed; if so it stops with `CacheBusy`,
its checkpoint written, to be resumed with `--resume` once the build is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import zarr

from kdcache import locks
from kdcache.cache import schema
from kdcache.cache.reader import Cache, CacheError, fingerprint, open_cache
from kdcache.cache.schema import Unit
from kdcache.train import rundir
from kdcache.train.config import TrainConfig, TrainError

log = logging.getLogger(__name__)


class CacheBusy(TrainError):
    """A build started writing the run's cache: the run stopped after a checkpoint; resume once the build is done."""


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def status_digest(status: dict) -> str:
    """A unit status's digest, without its timing (equal for the same unit written twice identically)."""
    return _digest({k: v for k, v in status.items() if k not in schema.STATUS_NONDETERMINISTIC_KEYS})


def _identity_digest(attrs: dict) -> str:
    return _digest({k: attrs.get(k) for k in ("schema_version", "teacher", "preprocess", "build")})


def _cut_inputs(inputs: dict, images: int, captions: int) -> dict:
    return {**inputs, "images": list(inputs["images"][:images]), "captions": list(inputs["captions"][:captions]),
            "caption_records": list(inputs["caption_records"][:captions])}


@dataclass(frozen=True)
class CachePin:
    """What a run trains on (see the module docstring); JSON in config.json, hashable in a DataSpec."""

    fingerprint: str                        # the cache's fingerprint when the run started (config.json's)
    status: str                             # the cache's status then
    capabilities: tuple[str, ...]
    identity: str                           # digest of schema version, teacher, preprocessing and build settings
    images: int                             # image inputs then
    captions: int                           # caption corpora then
    inputs: str                             # digest of those inputs
    units: tuple[tuple[str, str], ...]      # (unit name, status digest) of every unit that had a status then

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "status": self.status, "capabilities": list(self.capabilities),
                "identity": self.identity, "images": self.images, "captions": self.captions, "inputs": self.inputs,
                "units": dict(self.units)}

    @classmethod
    def from_json(cls, d: dict) -> CachePin:
        return cls(fingerprint=d["fingerprint"], status=d["status"], capabilities=tuple(d["capabilities"]),
                   identity=d["identity"], images=int(d["images"]), captions=int(d["captions"]), inputs=d["inputs"],
                   units=tuple(sorted(d["units"].items())))


def make_pin(cache: Cache) -> CachePin:
    """The pin of a cache as it is now."""
    inputs = cache.attrs["inputs"]
    units = []
    for u in cache.all_units:
        st = cache.status(u)
        if st is not None:
            units.append((u.name, status_digest(st)))
    return CachePin(fingerprint=cache.fingerprint(), status=str(cache.attrs.get("status")),
                    capabilities=tuple(cache.capabilities), identity=_identity_digest(cache.attrs),
                    images=len(inputs["images"]), captions=len(inputs["captions"]),
                    inputs=_digest(_cut_inputs(inputs, len(inputs["images"]), len(inputs["captions"]))),
                    units=tuple(sorted(units)))


@dataclass
class PinnedCache(Cache):
    """A cache seen as it was when a run started (`apply_pin` builds it)."""

    pin: CachePin | None = field(default=None, repr=False)
    now: dict = field(default_factory=dict, repr=False)    # the cache's root attributes as they are now

    @cached_property
    def _digests(self) -> dict[str, str]:
        return dict(self.pin.units)

    def status(self, unit: Unit) -> dict | None:
        """The unit's status if it had one when the run started (None otherwise), checked unchanged since."""
        want = self._digests.get(unit.name)
        if want is None:
            return None
        st = super().status(unit)
        if st is None or status_digest(st) != want:
            now = "is gone" if st is None else f"is now {st.get('state')!r} with {st.get('rows')} rows"
            raise CacheError(f"{self.path}: unit {unit.name} changed since this run started (its status {now}): the "
                             "run's data no longer exists as it was; start a new run (another --out)")
        return st

    def fingerprint(self) -> str:
        return self.pin.fingerprint

    def gained_units(self) -> int:
        """Units the cache has now (with a status) that this run does not use: what extensions added."""
        return sum(1 for u in Cache(self.path, self.root, self.now).all_units
                   if u.name not in self._digests and schema.read_status(self.root, u) is not None)


def apply_pin(cache: Cache, pin: CachePin, *, allow_incomplete: bool, verify: bool = False) -> PinnedCache:
    """`cache` (opened with allow_incomplete=True) seen through `pin`; refused (CacheError) unless it is the cache the
    pin was taken from, possibly extended since. `verify`: check every pinned unit's status now (else on read)."""
    attrs, inputs = cache.attrs, cache.attrs["inputs"]
    if _identity_digest(attrs) != pin.identity:
        raise CacheError(f"{cache.path}: the cache was rebuilt with another teacher or other build settings since "
                         "this run started; start a new run (another --out)")
    if (len(inputs["images"]) < pin.images or len(inputs["captions"]) < pin.captions
            or _digest(_cut_inputs(inputs, pin.images, pin.captions)) != pin.inputs):
        raise CacheError(f"{cache.path}: the cache's inputs are no longer those this run started with (a rebuild, not "
                         "an extension with inputs appended at the end); start a new run (another --out)")
    if pin.status != schema.CACHE_COMPLETE and not allow_incomplete:
        raise CacheError(f"{cache.path}: this run started on a cache whose status was '{pin.status}'; pass "
                         "--allow-incomplete to continue it")
    pinned = PinnedCache(cache.path, cache.root,
                         {**attrs, "inputs": _cut_inputs(inputs, pin.images, pin.captions), "status": pin.status,
                          "capabilities": list(pin.capabilities)}, pin=pin, now=attrs)
    if verify:
        for u in pinned.all_units:
            pinned.status(u)
    return pinned


def open_pinned(path: str, pin: CachePin, *, allow_incomplete: bool, verify: bool = False) -> PinnedCache:
    """The cache at `path` seen through `pin` (what every reader of a run opens)."""
    return apply_pin(open_cache(path, allow_incomplete=True), pin, allow_incomplete=allow_incomplete, verify=verify)


def _busy_message(cache: str, holder: locks.Holder) -> str:
    return f"the cache {cache} is being written by {holder.describe()}"


def open_for_run(cfg: TrainConfig) -> PinnedCache:
    """The cache a run trains on, pinned: refused while a build holds its lock (unless --allow-incomplete); on
    --resume, seen through the pin the run recorded (an extension since is logged, anything else refused)."""
    holder = locks.live_holder(cfg.cache)
    if holder is not None and not cfg.allow_incomplete:
        raise TrainError(f"{_busy_message(cfg.cache, holder)}: wait for the build to finish, or pass "
                         "--allow-incomplete to train on the units it has finished so far")
    old = _recorded_pin(Path(cfg.out)) if cfg.resume else None
    if old is None:
        cache = open_cache(cfg.cache, allow_incomplete=cfg.allow_incomplete)
        return apply_pin(cache, make_pin(cache), allow_incomplete=cfg.allow_incomplete)
    cache = open_pinned(cfg.cache, old, allow_incomplete=cfg.allow_incomplete, verify=True)
    gained = cache.gained_units()
    if gained:
        log.info("resume: the cache gained %d unit(s) since this run started (an extension); this run keeps training "
                 "on the %d it started with and does not use them", gained, len(old.units))
    return cache


def _recorded_pin(run_dir: Path) -> CachePin | None:
    if not (run_dir / rundir.CONFIG).is_file():
        return None
    pin = rundir.read_config(run_dir).get("cache_pin")
    return CachePin.from_json(pin) if pin else None


def _root_state(path: str) -> str:
    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs).get(schema.ROOT_ATTR) or {}
    except Exception as e:  # gone or unreadable: a change all the same
        return f"unreadable: {type(e).__name__}"
    return f"{attrs.get('status')}:{fingerprint(attrs)}"


@dataclass
class CacheWatch:
    """Notices, at a checkpoint, that a build started writing the run's cache (see the module docstring)."""

    path: str
    baseline: str | None    # the cache root's status and fingerprint at the start; None: not watched

    @classmethod
    def start(cls, cfg: TrainConfig) -> CacheWatch:
        """A run that started while a build held the lock (--allow-incomplete) is not stopped: its data is pinned."""
        if locks.live_holder(cfg.cache) is not None:
            return cls(cfg.cache, None)
        return cls(cfg.cache, _root_state(cfg.cache))

    def changed(self) -> str | None:
        """Why the run must stop now (a build holds the cache's lock, or its root changed), or None."""
        if self.baseline is None:
            return None
        holder = locks.live_holder(self.path)
        if holder is not None:
            return _busy_message(self.path, holder)
        now = _root_state(self.path)
        if now != self.baseline:
            return f"the cache {self.path} changed since this run started (status now '{now.split(':', 1)[0]}')"
        return None

    def after_checkpoint(self, *, step: int, ranks=None, device=None) -> None:
        """Raise CacheBusy if the cache changed (all DDP ranks agree, so they stop together)."""
        reason = self.changed()
        if ranks is not None and ranks.world > 1:
            if ranks.sum([1.0 if reason else 0.0], device)[0] > 0 and reason is None:
                reason = f"the cache {self.path} is being written (another rank saw it)"
        if reason:
            raise CacheBusy(f"stopped at step {step}: {reason}. Checkpoint step {step} is written: rerun with --resume "
                            "once the build has finished; the run keeps training on the units it started with")
