"""The build's third step, the teacher pass: run the frozen teacher on the stream's batches and on caption blocks,
and assemble each finished unit's arrays and status for the writer.

Nothing here writes: a finished unit comes back as (data, status), host arrays filled to the schema plus the status
object that will be written after them. The teacher is only ever loaded here, for the build.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdcache import tokens as cache_tokens
from kdcache.cache import schema
from kdcache.cache.captions import CaptionRow, iter_caption_records
from kdcache.cache.config import BuildConfig, BuildError, view_policy
from kdcache.cache.schema import CAPTIONS, IMAGES, Unit
from kdcache.cache.stream import ShardMeta
from kdcache.hints import HintError, HintHooks
from kdcache.shards import Reject

if TYPE_CHECKING:
    from kdcache.teacher import Teacher

# One teacher batch's outputs for a shard: (positions, views, emb, topk idx, topk values, lse, hints); topk and lse
# are None without a class vocabulary, hints ({name: [B, C]}) empty without --hints.
BatchOutputs = tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                     torch.Tensor | None, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Vocab:
    """The class vocabulary the cache records next to the teacher's zero-shot head (host float32 [C, D])."""

    classes: list[str]
    templates: list[str]
    head: np.ndarray
    classes_source: str
    templates_source: str


@dataclass
class HostOutputs:
    """A batch's teacher outputs on their way to the host. On CUDA the copies go to pinned memory without waiting, so
    the build launches (and, with --decode gpu, decodes and renders) the next batch while this one's forward runs,
    and reads these one batch later; `get` waits for them. On the CPU they are there at once."""

    values: tuple             # (emb, idx, val, lse) host tensors, None where absent
    hints: dict               # {name: float [B, C]} host tensors
    event: torch.cuda.Event | None = None

    @classmethod
    def start(cls, values: tuple, hints: dict) -> HostOutputs:
        if not any(t is not None and t.is_cuda for t in (*values, *hints.values())):
            return cls(tuple(None if t is None else t.cpu() for t in values), {n: f.cpu() for n, f in hints.items()})

        def host(t):
            if t is None:
                return None
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        out = cls(tuple(host(t) for t in values), {n: host(f) for n, f in hints.items()}, torch.cuda.Event())
        out.event.record()
        return out

    def get(self) -> tuple:
        if self.event is not None:
            self.event.synchronize()
        return (*self.values, self.hints)


class TeacherPass:
    """The teacher with what the cache asks of it: a zero-shot head and top-k (with --classes), the embedding dtype,
    the tokens to store, and the array specs of image and caption units."""

    def __init__(self, teacher: Teacher, *, head: torch.Tensor | None, topk: int, vocab: Vocab | None,
                 cfg: BuildConfig):
        self.teacher, self.head, self.topk, self.vocab = teacher, head, topk, vocab
        self.embed_dtype, self.batch_size = cfg.embed_dtype, cfg.batch_size
        self.tokens = cache_tokens.describe(teacher.tokenizer)  # None: this tokenizer's tokens are not stored
        dim = teacher.embed_dim
        self.policy = view_policy(cfg)
        # Hints: hooks stay on the frozen teacher for the whole build; a probe forward gives each pooled width.
        try:
            self.hooks = HintHooks(teacher.model, cfg.hints, mode=cfg.hint_pool).__enter__() if cfg.hints else None
        except HintError as e:
            raise BuildError(f"--hints: {e}") from None
        self.hints = self._probe_hints(cfg) if cfg.hints else None  # build["hints"]
        self.image_specs = schema.image_arrays(views=cfg.views, dim=dim, topk=topk, embed_dtype=cfg.embed_dtype,
                                               tokens=self.tokens, policy=self.policy, hints=self.hints)
        self.caption_specs = schema.caption_arrays(dim=dim, embed_dtype=cfg.embed_dtype, tokens=self.tokens)

    def _probe_hints(self, cfg: BuildConfig) -> dict:
        h, w = self.teacher.preprocess["size"]
        self.teacher.encode_images(torch.zeros(1, 3, h, w, dtype=torch.uint8))
        feats = self.hooks.take()
        try:
            layers = [{"name": n, "dim": int(feats[n].shape[-1])} for n in cfg.hints]
        except KeyError as e:
            raise BuildError(f"--hints {e}: the module did not run in the image tower") from None
        return {"pool": cfg.hint_pool, "layers": layers}

    # -- teacher outputs
    def image_outputs(self, pixels: torch.Tensor) -> HostOutputs:
        """Embeddings, with a vocabulary top-k logits and log-sum-exp, and with --hints the pooled hint features
        ({name: float [B, C]}): all computed on the teacher's device (a [B, C] logits matrix never crosses to the
        host), then copied back once, without waiting on CUDA: `.get()` returns (emb, idx, val, lse, hints)."""
        emb = self.teacher.encode_images(pixels, on_device=True)
        hints = self.hooks.take() if self.hooks is not None else {}
        if self.head is None:
            return HostOutputs.start((emb, None, None, None), hints)
        with torch.inference_mode():
            logits = self.teacher.logit_scale * emb @ self.head.T
            val, idx = logits.topk(self.topk, dim=1)
            lse = torch.logsumexp(logits, dim=1)
        return HostOutputs.start((emb, idx.to(torch.int32), val, lse), hints)

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Teacher text embeddings (float32 [N, D]) and, when the cache stores them, the tokens they came from."""
        bs = self.batch_size
        tokens = [self.teacher.tokenizer(texts[i:i + bs]) for i in range(0, len(texts), bs)]
        emb = [self.teacher.encode_tokens(t) for t in tokens]
        emb = torch.cat(emb).numpy() if emb else np.empty((0, self.teacher.embed_dim), np.float32)
        if self.tokens is None:
            return emb, None
        return emb, cache_tokens.store(torch.cat(tokens), self.tokens) if tokens else None

    # -- finished units
    def shard_unit(self, meta: ShardMeta, parts: list[BatchOutputs]) -> tuple[dict, dict]:
        """An image shard's arrays and status, from its ShardMeta and the teacher outputs of all its batches (paired
        captions are encoded here, once the shard is complete)."""
        unit = meta.unit
        if self.vocab is not None:
            reject_unknown_labels(meta, len(self.vocab.classes))
        data = schema.empty_unit_data(self.image_specs, meta.rows)
        data["key"][:] = meta.keys
        data["valid"][:] = meta.valid
        data["label"][:] = meta.labels
        data["caption"][:] = meta.captions
        data["src_size"][:] = meta.src_size
        for name, records in meta.records.items():
            data[name][:] = records
        for pos, view, emb, idx, val, lse, hints in parts:
            keep = meta.valid[pos]  # rows rejected after the teacher saw them (reject_unknown_labels) stay unwritten
            if not keep.all():
                k = torch.from_numpy(keep)
                pos, view, emb, hints = pos[keep], view[keep], emb[k], {n: h[k] for n, h in hints.items()}
                idx, val, lse = (None if t is None else t[k] for t in (idx, val, lse))
            data["emb"][pos, view] = schema.encode_embeddings(emb.numpy(), self.embed_dtype)
            for i, layer in enumerate((self.hints or {}).get("layers", [])):
                data[schema.hint_array(i)][pos, view] = hints[layer["name"]].numpy().astype(np.float16)
            if idx is not None:
                data["topk_idx"][pos, view] = idx.numpy()
                data["topk_val"][pos, view] = val.numpy()
                data["lse"][pos, view] = lse.numpy()
        cap_rows = [i for i, c in enumerate(meta.captions) if c and meta.valid[i]]
        if cap_rows:
            cap_emb, cap_tokens = self.encode_texts([meta.captions[i] for i in cap_rows])
            data["caption_emb"][cap_rows] = schema.encode_embeddings(cap_emb, self.embed_dtype)
            if cap_tokens is not None:
                data["caption_tokens"][cap_rows] = cap_tokens
        rejected = Counter(r.reason for r in meta.rejects)
        cut = 0 if meta.caption_truncated is None else int((meta.caption_truncated & meta.valid).sum())
        failed = meta.report.truncated or meta.report.error is not None
        status = {
            "unit": unit.name, "kind": IMAGES, "source": unit.source, "state": schema.STATUS_FAILED if failed
            else schema.STATUS_DONE, "rows": meta.rows, "valid": int(meta.valid.sum()), "rejected": dict(rejected),
            "rejects": [asdict(r) for r in meta.rejects], "digest": meta.report.digest,
            "truncated": meta.report.truncated, "error": meta.report.error, "labels": int((meta.labels >= 0).sum()),
            "captions": len(cap_rows), "captions_truncated": cut, "limited": meta.limited,
            "timing": {"finished": time.time()},
        }
        if meta.decode is not None:  # --decode gpu: how many samples the device decoded, and PIL's by reason
            status["decode"] = meta.decode
        return data, status

    def caption_unit(self, unit: Unit, corpus: dict, quota: int | None) -> tuple[dict, dict]:
        """A caption block's arrays and status: its records read from the corpus (the first `quota` under --limit;
        the rest stay unwritten rows) and their teacher text embeddings."""
        n = unit.stop - unit.start
        stop = unit.stop if quota is None else unit.start + max(0, min(n, quota))
        data = schema.empty_unit_data(self.caption_specs, n)
        data["index"][:] = np.arange(unit.start, unit.stop)
        rejects: list[Reject] = []
        rows, texts, cut = [], [], 0
        for item in iter_caption_records(corpus["kind"], corpus["path"], start=unit.start, stop=stop):
            if isinstance(item, CaptionRow):
                r = item.index - unit.start
                data["text"][r], data["ref"][r], data["valid"][r] = item.text, item.ref, True
                rows.append(r), texts.append(item.text)
                cut += item.truncated
            else:
                rejects.append(item)
        if texts:
            emb, tokens = self.encode_texts(texts)
            data["emb"][rows] = schema.encode_embeddings(emb, self.embed_dtype)
            if tokens is not None:
                data["tokens"][rows] = tokens
        rejected = Counter(r.reason for r in rejects)
        status = {"unit": unit.name, "kind": CAPTIONS, "source": unit.source, "state": schema.STATUS_DONE,
                  "rows": n, "valid": len(rows), "rejected": dict(rejected), "rejects": [asdict(r) for r in rejects],
                  "captions_truncated": cut, "start": unit.start, "stop": unit.stop, "limited": stop < unit.stop,
                  "timing": {"finished": time.time()}}
        return data, status


def reject_unknown_labels(meta: ShardMeta, classes: int) -> None:
    """With a class vocabulary, a `.cls` label is an index into it: a valid row whose label is not below `classes`
    would make cross-entropy fail mid-training, so it becomes a reject (`label_out_of_range`), in place."""
    bad = np.flatnonzero(meta.valid & (meta.labels >= classes))
    if not bad.size:
        return
    for p in bad.tolist():
        meta.rejects.append(Reject(p, meta.keys[p], "label_out_of_range",
                                   f".cls {int(meta.labels[p])} is not a class index of the --classes vocabulary "
                                   f"(0..{classes - 1})"))
        meta.captions[p] = ""
    meta.rejects.sort(key=lambda r: r.position)
    meta.valid[bad], meta.labels[bad], meta.src_size[bad] = False, -1, 0
    for a in meta.records.values():
        a[bad] = 0


def load_teacher_pass(cfg: BuildConfig) -> TeacherPass:
    """Load the teacher cfg names and, with --classes, its zero-shot head over the class vocabulary."""
    from kdcache.teacher import load_teacher  # the teacher is only ever imported by the build
    from kdcache.vocab import load_classes, load_templates

    teacher = load_teacher(cfg.teacher, pretrained=cfg.pretrained, allow_random_init=cfg.allow_random_init,
                           device=cfg.device, precision=cfg.precision)
    head, topk, vocab = None, 0, None
    if cfg.classes:
        classes, classes_src = load_classes(cfg.classes)
        templates, templates_src = load_templates(cfg.templates, classes_spec=cfg.classes)
        # float32 [C, D], kept on the teacher's device where the logits are computed
        head = teacher.zero_shot_head(classes, templates).to(teacher.device, torch.float32)
        topk = min(cfg.topk, len(classes))
        vocab = Vocab(classes=classes, templates=templates, head=head.cpu().numpy(), classes_source=classes_src,
                      templates_source=templates_src)
    elif cfg.templates:
        raise BuildError("--templates needs --classes")
    return TeacherPass(teacher, head=head, topk=topk, vocab=vocab, cfg=cfg)
