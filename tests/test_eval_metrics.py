"""Evaluation metrics against values worked out by hand on tiny fixed predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache.eval.metrics import (
    agreement,
    class_logits,
    classification_report,
    confusion_matrix,
    retrieval_recall,
    topk_accuracy,
)

# 6 samples, 3 classes; class 2 is never predicted.
LABELS = [0, 0, 0, 1, 1, 2]
PREDS = [0, 0, 1, 1, 0, 1]


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(PREDS, LABELS, num_classes=3)
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([3], [0], num_classes=3)


def test_precision_recall_f1_by_hand():
    r = classification_report(PREDS, LABELS, num_classes=3)
    pc = r["per_class"]
    # precision: 2/3, 1/3, and 0 for the never-predicted class (undefined -> 0); recall: 2/3, 1/2, 0.
    assert pc["precision"] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert pc["recall"] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert pc["f1"] == pytest.approx([2 / 3, 2 / 5, 0.0])
    assert pc["support"] == [3, 2, 1]
    assert r["macro_precision"] == pytest.approx(1 / 3)
    assert r["macro_recall"] == pytest.approx(7 / 18)
    assert r["macro_f1"] == pytest.approx(16 / 45)
    # weighted by support 3, 2, 1 out of 6
    assert r["weighted_precision"] == pytest.approx(4 / 9)
    assert r["weighted_recall"] == pytest.approx(1 / 2)
    assert r["weighted_f1"] == pytest.approx(7 / 15)
    assert r["accuracy"] == pytest.approx(1 / 2)
    assert r["averaged_classes"] == 3


def test_macro_ignores_vocabulary_classes_absent_from_labels_and_predictions():
    wide = classification_report(PREDS, LABELS, num_classes=5)
    narrow = classification_report(PREDS, LABELS, num_classes=3)
    assert wide["averaged_classes"] == 3
    for k in ("macro_precision", "macro_recall", "macro_f1", "weighted_f1"):
        assert wide[k] == pytest.approx(narrow[k])
    assert wide["confusion"].shape == (5, 5)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.2],    # label 2: 2nd best
                           [0.9, 0.0, 0.05, 0.01],  # label 0: best
                           [0.2, 0.1, 0.3, 0.4]])   # label 1: worst
    labels = torch.tensor([2, 0, 1])
    assert [topk_accuracy(logits, labels, k=k) for k in (1, 2, 3, 4)] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0])
    with pytest.raises(ValueError, match="k <= number of classes"):
        topk_accuracy(logits, labels, k=5)


# Row i of IMG goes with row i of TXT. Captions 0 and 2 have the same text but different embeddings.
IMG = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]], dtype=np.float32)
TXT = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]], dtype=np.float32)


def test_retrieval_counts_a_caption_with_the_same_text_as_a_hit():
    r = retrieval_recall(IMG, TXT, ["a", "b", "a", "c"], ks=(1, 2, 3))
    # image 0's best caption is row 2, whose text "a" is its own caption's: a hit at rank 1. Images 1 and 2 find
    # their caption behind two better ones (ties with it count as hits), image 3 first.
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == pytest.approx((0.5, 0.5, 1.0))
    # caption 2 ("a") retrieves image 0 first, whose caption is also "a"; captions 0 and 1 have rank 2.
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == pytest.approx((0.5, 0.5, 1.0))


def test_retrieval_without_duplicates_is_row_matching():
    r = retrieval_recall(IMG, TXT, ["a", "b", "a2", "c"], ks=(1, 2, 3))
    # Now image 0's own caption (row 0) scores 0, behind row 2 only: rank 1.
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == pytest.approx((0.25, 0.5, 1.0))
    # Small query blocks give the same result as one block.
    assert retrieval_recall(IMG, TXT, ["a", "b", "a2", "c"], ks=(1, 2, 3), block=1) == r


def test_retrieval_needs_paired_rows():
    with pytest.raises(ValueError, match="paired"):
        retrieval_recall(IMG, TXT[:3], ["a", "b", "c", "d"])


def test_agreement_by_hand():
    teacher = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])   # p = [.5, .5], [.75, .25]
    student = torch.tensor([[0.0, 0.0], [0.0, 1.0]])           # p = [.5, .5], [1/(1+e), e/(1+e)]
    a = agreement(student, teacher, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert a["top1_agreement"] == pytest.approx(0.5)
    e = math.e
    kl1 = 0.75 * math.log(0.75 * (1 + e)) + 0.25 * math.log(0.25 * (1 + e) / e)
    assert a["kl"] == pytest.approx(kl1 / 2)
    assert a["cosine"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert set(agreement(student_emb=IMG, teacher_emb=IMG)) == {"cosine"}


def test_class_logits_scale_cosines():
    emb = torch.tensor([[1.0, 0.0]])
    head = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert class_logits(emb, head, logit_scale=100.0).tolist() == [[100.0, 0.0]]


def test_paired_difference_by_hand():
    from kdcache.eval.metrics import paired_difference

    a = np.array([1, 1, 1, 0, 1, 0, 1, 1, 0, 1] * 20, dtype=bool)   # 70%
    b = np.array([1, 0, 1, 0, 0, 0, 1, 1, 0, 1] * 20, dtype=bool)   # 50%
    d = paired_difference(a, b, resamples=4000, seed=1)
    assert d["diff"] == pytest.approx(0.2) and d["lo"] < 0.2 < d["hi"] and d["lo"] > 0
    assert (d["a_only"], d["b_only"], d["n"]) == (40, 0, 200)
    assert d["p_mcnemar"] == pytest.approx(2 * 0.5 ** 40)
    same = paired_difference(a, a)
    assert same["diff"] == same["lo"] == same["hi"] == 0 and same["p_mcnemar"] == 1.0
    # symmetric discordance: p = 1 for 1 vs 1, and the CI straddles 0
    x, y = np.array([1, 0, 1, 1], bool), np.array([0, 1, 1, 1], bool)
    d = paired_difference(x, y)
    assert d["p_mcnemar"] == 1.0 and d["lo"] < 0 < d["hi"]
    with pytest.raises(ValueError):
        paired_difference(a, b[:-1])
