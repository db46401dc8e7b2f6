"""The text tower's rows of a teacher cache (`TextRows`, a `kdcache.train.rows.Rows`): the paired captions of image
shards and the caption corpora's records, served from the cache as blocks of arrays (`CaptionBlock`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kdcache import tokens as cache_tokens
from kdcache.cache import schema
from kdcache.cache.reader import Cache, CacheError
from kdcache.cache.schema import CAPTIONS, IMAGES, Unit
from kdcache.subset import Subset
from kdcache.train.dataspec import DataError, DataSpec
from kdcache.train.order import caption_key, split_of
from kdcache.train.rows import Rows, keyed_split, selected_rows, unit_name, usable_units

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class CaptionBlock:
    """The text tower's rows of one unit (a caption block, or an image shard's paired captions) for one split, as
    arrays in their stored dtype. The text tower's order stream passes rows as (block, j) pairs: per row it makes a
    tuple, not a RawRow with copied arrays (that per-row work was most of the text loader's time); a block is freed
    once no pair in the shuffle buffer or a pending batch refers to it, so a pass holds a few units at a time."""

    shard: int                     # image shard index, -1 for a caption block
    corpus: int                    # caption corpus index, -1 for an image shard
    position: np.ndarray           # int64 [n] position in the shard, or record index in the corpus
    label: np.ndarray              # int64 [n], -1 when none
    texts: list[str] | None        # None when nothing needs them (tokens reused and no return_texts)
    teacher: np.ndarray            # [n, D] the caption's teacher embedding
    other: np.ndarray | None       # [n, D] the paired image's view-0 embedding; None for corpus rows
    tokens: np.ndarray | None      # [n, C] the stored tokens, when the student's tokenizer reuses them


class TextRows(Rows[tuple[CaptionBlock, int]]):
    """The text tower: the paired captions of image shards that have any, then the caption corpora's blocks, all from
    the cache. A batch tokenises with the student's tokenizer, or, when that tokenizer provably gives the tokens the
    build stored (`token_context` is then their context), cuts the stored tokens instead."""

    split_arrays = {IMAGES: ("key", "valid", "caption"), CAPTIONS: ("index", "valid")}

    def __init__(self, spec: DataSpec, cache: Cache, *, tokenizer: Callable | None = None,
                 return_texts: bool = False, teacher_preprocess: dict | None = None,
                 student_preprocess: dict | None = None, device_decode: bool = False):
        del student_preprocess  # the text tower has no pixels
        if teacher_preprocess is not None:
            raise DataError("teacher_preprocess renders teacher views of images; the text tower has none")
        if device_decode:
            raise DataError("device_decode replays image views on the device; the text tower has none")
        if tokenizer is None:
            raise DataError("the text tower needs the student's tokenizer (tokenizer=open_clip.get_tokenizer(...))")
        self.spec = spec
        self.tokenizer = tokenizer
        self.return_texts = return_texts
        # The build's stored tokens replace the tokenizer when they are provably what it would give.
        recorded = cache.attrs["build"].get("tokens")
        self.token_context = cache_tokens.reusable_context(recorded, tokenizer)
        self.eot = recorded["eot"] if self.token_context else None
        if recorded and self.token_context is None:
            log.info("the student's tokenizer differs from the teacher's: captions are tokenised while loading")

    @classmethod
    def check(cls, cache: Cache) -> None:
        if not {schema.CAP_CAPTIONS, schema.CAP_PAIRED} & set(cache.capabilities):
            raise CacheError(f"{cache.path}: the text tower needs caption corpora or paired captions; the cache has "
                             f"neither (capabilities {cache.capabilities})")

    @classmethod
    def units(cls, cache: Cache) -> list[Unit]:
        return usable_units(cache, IMAGES, captioned=True) + usable_units(cache, CAPTIONS)

    @classmethod
    def check_labels(cls, cache: Cache, subset: Subset) -> None:
        super().check_labels(cache, subset)
        corpora = sorted({unit_name(u) for u in cls.units(cache) if u.kind == CAPTIONS
                          and not subset.excludes_shard(unit_name(u))})
        if corpora:
            raise DataError(f"--labels: the text tower reads caption corpora {corpora}, whose rows have no labels; "
                            "exclude them by file name (--exclude NAME) to train on the labelled paired captions")

    @staticmethod
    def in_split(a: dict[str, np.ndarray], unit: Unit, split: str, val_fraction: float, *,
                 subset: Subset) -> np.ndarray:
        if unit.kind == CAPTIONS:  # a corpus record is keyed by its address in the inputs
            keys = [caption_key(unit.index, i) for i in a["index"].tolist()]
            rows = np.flatnonzero(a["valid"] & selected_rows(a, unit, subset, keys))
            return rows[[split_of(keys[r], val_fraction) == split for r in rows.tolist()]]
        # a paired caption by its image's __key__, so that a pair never straddles the split
        return keyed_split(np.flatnonzero(a["valid"] & (a["caption"] != "") & selected_rows(a, unit, subset, a["key"])),
                      a["key"], split, val_fraction)

    @property
    def _need_texts(self) -> bool:
        return self.return_texts or self.token_context is None

    def unit_rows(self, cache: Cache, unit: Unit, *, split: str, epoch: int) -> Iterator[tuple[CaptionBlock, int]]:
        make = self._corpus_block if unit.kind == CAPTIONS else self._paired_block
        block = make(cache, unit, split)
        for j in range(len(block.position)):
            yield block, j

    def _corpus_block(self, cache: Cache, unit: Unit, split: str) -> CaptionBlock:
        reuse, texts = self.token_context is not None, self._need_texts
        a = cache.read(unit, [*self.split_arrays[CAPTIONS], "emb"] + (["tokens"] if reuse else [])
                       + (["text"] if texts else []))
        rows = self.in_split(a, unit, split, self.spec.val_fraction, subset=self.spec.subset)
        return CaptionBlock(shard=-1, corpus=unit.index, position=a["index"][rows].astype(np.int64),
                            label=np.full(len(rows), -1, np.int64), texts=a["text"][rows].tolist() if texts else None,
                            teacher=a["emb"][rows], other=None, tokens=a["tokens"][rows] if reuse else None)

    def _paired_block(self, cache: Cache, unit: Unit, split: str) -> CaptionBlock:
        reuse, texts = self.token_context is not None, self._need_texts
        a = cache.read(unit, [*self.split_arrays[IMAGES], "label", "caption_emb", "emb"]
                       + (["caption_tokens"] if reuse else []))
        rows = self.in_split(a, unit, split, self.spec.val_fraction, subset=self.spec.subset)
        return CaptionBlock(shard=unit.index, corpus=-1, position=rows.astype(np.int64),
                            label=a["label"][rows].astype(np.int64),
                            texts=a["caption"][rows].tolist() if texts else None, teacher=a["caption_emb"][rows],
                            other=a["emb"][rows, 0], tokens=a["caption_tokens"][rows] if reuse else None)

    def batch(self, rows: list[tuple[CaptionBlock, int]]) -> dict:
        # Rows grouped by block, so each array is gathered with one fancy index per block rather than row by row.
        groups: dict[int, tuple[CaptionBlock, list[int], list[int]]] = {}
        for i, (blk, j) in enumerate(rows):
            g = groups.get(id(blk))
            if g is None:
                g = groups[id(blk)] = (blk, [], [])
            g[1].append(i)
            g[2].append(j)

        def gather(get: Callable[[CaptionBlock], np.ndarray | int | None], tail: tuple[int, ...], fill,
                   dtype) -> torch.Tensor:
            out = np.full((len(rows), *tail), fill, dtype)
            for blk, ii, jj in groups.values():
                v = get(blk)
                if v is not None:
                    out[ii] = v[jj] if isinstance(v, np.ndarray) else v
            return torch.from_numpy(out)

        dim = rows[0][0].teacher.shape[1]
        texts = [blk.texts[j] for blk, j in rows] if self._need_texts else None
        if self.token_context is not None:
            stored = gather(lambda b: b.tokens, rows[0][0].tokens.shape[1:], 0, np.int64).numpy()
            tokens = torch.from_numpy(cache_tokens.fit(stored, self.token_context, eot=self.eot))
        else:
            tokens = torch.as_tensor(self.tokenizer(texts), dtype=torch.int64)
        return {
            "tokens": tokens,
            "teacher": gather(lambda b: b.teacher, (dim,), np.nan, np.float32),
            "other": gather(lambda b: b.other, (dim,), np.nan, np.float32),
            "has_other": gather(lambda b: b.other is not None, (), False, bool),
            "labels": gather(lambda b: b.label, (), -1, np.int64),
            "shard": gather(lambda b: b.shard, (), -1, np.int64),
            "position": gather(lambda b: b.position, (), -1, np.int64),
            "corpus": gather(lambda b: b.corpus, (), -1, np.int64),
            **({"texts": texts} if self.return_texts else {}),
        }
