"""Evaluation metrics as pure functions of predictions: no models, no files, no global state.

    acc = topk_accuracy(logits, labels, k=1)
    prf = classification_report(logits.argmax(1), labels, num_classes=10)   # per class + macro + weighted
    r = retrieval_recall(image_emb, text_emb, captions, ks=(1, 5, 10))      # duplicate-aware R@k both ways
    a = agreement(student_logits, teacher_logits, student_emb, teacher_emb)

Conventions (what a reader of a report needs to know):

- Precision, recall and F1 of a class are 0 when undefined (a class never predicted has no precision; a class with no
  true sample has no recall), as scikit-learn does with `zero_division=0`.
- Macro averages run over the classes that occur in the labels or in the predictions (scikit-learn's default label
  set), so a vocabulary class absent from a small eval set and never predicted does not drag the mean to 0. Weighted
  averages weight each class by its support (number of true samples).
- Retrieval: many captions repeat (templated captions, COCO near-duplicates), so a retrieved caption counts as a hit
  when its *text* equals the query image's own caption, and a retrieved image counts as a hit when *its* caption text
  equals the query caption. The gallery keeps every sample (duplicates included), and ties are broken in favour of the
  hit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def topk_accuracy(logits, labels, *, k: int) -> float:
    """Fraction of rows whose label is among the k highest logits ([N, C] scores, [N] integer labels).

    k must not exceed the number of classes (with k >= C every row is a hit, which says nothing)."""
    scores, y = torch.as_tensor(_np(logits)), torch.as_tensor(_np(labels)).long()
    n, c = scores.shape
    if k < 1 or k > c:
        raise ValueError(f"top-{k} accuracy needs 1 <= k <= number of classes ({c})")
    if n == 0:
        raise ValueError("top-k accuracy of an empty set")
    top = scores.topk(k, dim=1).indices
    return float((top == y[:, None]).any(dim=1).float().mean())


def confusion_matrix(pred, labels, *, num_classes: int) -> np.ndarray:
    """[C, C] int64 counts; row = true class, column = predicted class."""
    p, y = _np(pred).astype(np.int64).ravel(), _np(labels).astype(np.int64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in length")
    for name, v in (("prediction", p), ("label", y)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} outside 0..{num_classes - 1}")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def classification_report(pred, labels, *, num_classes: int) -> dict:
    """Per-class precision/recall/F1/support plus macro and weighted averages and the confusion matrix.

    Returns {"per_class": {"precision", "recall", "f1", "support"} lists of length C, "macro_precision",
    "macro_recall", "macro_f1", "weighted_precision", "weighted_recall", "weighted_f1", "accuracy",
    "averaged_classes" (how many classes the macro mean runs over), "confusion" [C, C]}. See the module docstring
    for the zero-division and label-set conventions."""
    cm = confusion_matrix(pred, labels, num_classes=num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted > 0)
    total = support.sum()
    if total == 0:
        raise ValueError("classification report of an empty set")

    def macro(v: np.ndarray) -> float:
        return float(v[present].mean())

    def weighted(v: np.ndarray) -> float:
        return float((v * support).sum() / total)

    return {
        "per_class": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                      "support": support.astype(np.int64).tolist()},
        "macro_precision": macro(precision), "macro_recall": macro(recall), "macro_f1": macro(f1),
        "weighted_precision": weighted(precision), "weighted_recall": weighted(recall), "weighted_f1": weighted(f1),
        "accuracy": float(tp.sum() / total), "averaged_classes": int(present.sum()), "confusion": cm,
    }


def _text_ids(texts: Sequence[str]) -> torch.Tensor:
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(t, len(ids)) for t in texts], dtype=torch.long)


def _hit_ranks(queries: torch.Tensor, gallery: torch.Tensor, q_ids: torch.Tensor, g_ids: torch.Tensor,
               block: int) -> torch.Tensor:
    """For each query, how many gallery items score strictly higher than its best-scoring matching item (0 = the
    best match is first; ties go to the match). Blocks of queries keep memory at block x gallery."""
    ranks = []
    for s in range(0, len(queries), block):
        sims = queries[s:s + block] @ gallery.T
        match = q_ids[s:s + block, None] == g_ids[None, :]
        best = sims.masked_fill(~match, float("-inf")).max(dim=1, keepdim=True).values
        ranks.append((sims > best).sum(dim=1))
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)


def retrieval_recall(image_emb, text_emb, captions: Sequence[str], *, ks: Sequence[int] = (1, 5, 10),
                     block: int = 1024) -> dict[str, float]:
    """Image->text and text->image recall@k for paired samples (row i of `image_emb` goes with row i of `text_emb`
    and `captions[i]`), by cosine similarity.

    A hit is decided by caption text, not by row: image i retrieving any caption whose text equals captions[i] is a
    hit, and caption j retrieving any image whose caption text equals captions[j] is a hit (see the module docstring).
    Returns {"i2t_r1", "i2t_r5", ..., "t2i_r1", ...} as fractions."""
    img = F.normalize(torch.as_tensor(_np(image_emb)).float(), dim=-1)
    txt = F.normalize(torch.as_tensor(_np(text_emb)).float(), dim=-1)
    if len(img) != len(txt) or len(img) != len(captions):
        raise ValueError(f"retrieval needs paired rows: {len(img)} images, {len(txt)} texts, {len(captions)} captions")
    if len(img) == 0:
        raise ValueError("retrieval on an empty set")
    ids = _text_ids(captions)
    # Each image is paired with its own caption's text, so query and gallery ids are the same vector both ways.
    i2t = _hit_ranks(img, txt, ids, ids, block)
    t2i = _hit_ranks(txt, img, ids, ids, block)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = float((ranks < k).float().mean())
    return out


def class_logits(emb, head, *, logit_scale: float) -> torch.Tensor:
    """Class logits at T=1 as CLIP computes them: logit_scale * emb @ head.T ([N, D] x [C, D] -> [N, C])."""
    return logit_scale * torch.as_tensor(_np(emb)).float() @ torch.as_tensor(_np(head)).float().T


def agreement(student_logits=None, teacher_logits=None, student_emb=None, teacher_emb=None) -> dict[str, float]:
    """How close a model is to the teacher on the same samples.

    - "top1_agreement": fraction of rows where both argmax classes are equal (needs logits);
    - "kl": mean over rows of KL(p_teacher || p_student) with p = softmax(logits) at T=1, in nats (the direction
      the distillation loss minimises);
    - "cosine": mean cosine similarity between the two embeddings of each row (needs embeddings of equal dim).
    Only the entries whose inputs are given are returned."""
    out: dict[str, float] = {}
    if student_logits is not None and teacher_logits is not None:
        s = torch.as_tensor(_np(student_logits)).double()
        t = torch.as_tensor(_np(teacher_logits)).double()
        if s.shape != t.shape:
            raise ValueError(f"logits differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        out["top1_agreement"] = float((s.argmax(1) == t.argmax(1)).double().mean())
        log_t, log_s = t.log_softmax(1), s.log_softmax(1)
        out["kl"] = float((log_t.exp() * (log_t - log_s)).sum(1).mean())
    if student_emb is not None and teacher_emb is not None:
        s = torch.as_tensor(_np(student_emb)).float()
        t = torch.as_tensor(_np(teacher_emb)).float()
        if s.shape != t.shape:
            raise ValueError(f"embeddings differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        out["cosine"] = float(F.cosine_similarity(s, t, dim=-1).mean())
    return out


def paired_difference(a, b, *, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Top-1 of model A minus model B on the same images (per-image correctness, bool [N] each), with a paired
    bootstrap confidence interval over images (percentile, `resamples` draws of N images with replacement, seeded)
    and McNemar's exact test on the discordant pairs (two-sided binomial on n01 vs n10).

    Returns {"diff", "lo", "hi", "n", "a_only" (A right, B wrong), "b_only", "p_mcnemar"}. Correctness may also be a
    float in [0, 1] per image (e.g. averaged over seeds); McNemar then counts images where A > B and B > A."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two equal-length per-image vectors, got {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    n = len(d)
    means = np.empty(resamples)
    for i in range(0, resamples, 1000):  # in blocks: bounded memory for big test sets
        k = min(1000, resamples - i)
        means[i:i + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1 - level) / 2
    a_only, b_only = int((d > 0).sum()), int((d < 0).sum())
    m = a_only + b_only
    # exact two-sided binomial test: P(X <= min) * 2 under X ~ Bin(m, 1/2)
    tail = sum(math.comb(m, j) for j in range(min(a_only, b_only) + 1)) / 2 ** m if m else 1.0
    return {"diff": float(d.mean()), "lo": float(np.quantile(means, alpha)), "hi": float(np.quantile(means, 1 - alpha)),
            "n": n, "a_only": a_only, "b_only": b_only, "p_mcnemar": float(min(1.0, 2 * tail))}
