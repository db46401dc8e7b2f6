"""The build's first step, the plan: which units a cache is made of, which this rank writes, which are left to do.

A unit is an image shard or a block of caption records (`schema.Unit`). The units are a function of the cache's root
attributes alone (its inputs, in order), so the build and every reader agree on them; ranks take every world-th unit;
a unit whose status says done is skipped on --resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import zarr

from kdcache.cache import schema
from kdcache.cache.schema import CAPTIONS, IMAGES, Unit


def plan_units(attrs: dict) -> list[Unit]:
    """The units a cache with these root attributes is made of, in input order (the same plan the build used)."""
    inputs = attrs["inputs"]
    units = [Unit(IMAGES, i, url) for i, url in enumerate(inputs["images"])]
    for c, (spec, records) in enumerate(zip(inputs["captions"], inputs["caption_records"], strict=True)):
        units += schema.caption_units(c, spec, records)
    return units


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of the units, what of it is still to do, and the --limit quotas for that."""

    mine: list[Unit]                   # this rank's units, done or not
    images: list[Unit]                 # image shards still to do
    captions: list[Unit]               # caption blocks still to do
    image_limit: int | None            # image samples left under --limit (None: no limit)
    caption_quota: list[int | None]    # records each caption block may still take, one per block in `captions`

    @property
    def skipped(self) -> int:
        return len(self.mine) - len(self.images) - len(self.captions)


def plan_rank(root: zarr.Group, units: list[Unit], *, rank: int, world: int, limit: int | None) -> RankPlan:
    """Rank `rank` of `world` takes every world-th unit (disjoint units, hence disjoint chunks); units already done
    are left out."""
    mine = units[rank::world]
    todo = []
    for u in mine:
        st = schema.read_status(root, u)
        if st is None or st.get("state") != schema.STATUS_DONE:
            todo.append(u)
    images = [u for u in todo if u.kind == IMAGES]
    captions = [u for u in todo if u.kind == CAPTIONS]
    image_limit, caption_quota = _limits(root, mine, images, captions, limit)
    return RankPlan(mine=mine, images=images, captions=captions, image_limit=image_limit,
                    caption_quota=caption_quota)


def _limits(root: zarr.Group, mine: list[Unit], img_units: list[Unit], cap_units: list[Unit],
            limit: int | None) -> tuple[int | None, list[int | None]]:
    """--limit N: the first N image samples and the first N caption records, in input order. Units already done
    (on --resume) count against N."""
    if limit is None:
        return None, [None] * len(cap_units)
    done_img = sum(st["rows"] for u in mine if u.kind == IMAGES and u not in img_units
                   for st in [schema.read_status(root, u)] if st)
    left, cap_quota = limit - sum(u.stop - u.start for u in mine if u.kind == CAPTIONS
                                  and u not in cap_units), []
    for u in cap_units:
        cap_quota.append(max(0, left))
        left -= u.stop - u.start
    return max(0, limit - done_img), cap_quota
