"""Loss terms on tiny hand-made tensors: each value is checked against a formula written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.train.losses import (
    LOSSES,
    PRESETS,
    LossInputs,
    WeightedLoss,
    default_losses,
    parse_loss_args,
)


def unit(rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


@pytest.fixture
def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    b, c, d = 6, 5, 4
    return dict(student=F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1),
                teacher=F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1),
                head=F.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=-1))


def manual_kl(student, teacher, head, scale, t) -> torch.Tensor:
    """sum_c p_t (log p_t - log p_s), averaged over rows, times T^2, written out with exp/log."""
    zs, zt = scale * student @ head.T / t, scale * teacher @ head.T / t
    pt = zt.exp() / zt.exp().sum(-1, keepdim=True)
    ps = zs.exp() / zs.exp().sum(-1, keepdim=True)
    return (pt * (pt.log() - ps.log())).sum(-1).mean() * t * t


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_kl_matches_manual_and_scales_by_t_squared(batch, t):
    kl = LOSSES["kl"]()
    x = LossInputs(**batch, logit_scale=10.0, temperature=t)
    assert torch.allclose(kl(x), manual_kl(batch["student"], batch["teacher"], batch["head"], 10.0, t), atol=1e-12)
    # Without the T^2 factor the gradients would shrink as 1/T^2; with it the value is T^2 times the plain KL.
    plain = manual_kl(batch["student"], batch["teacher"], batch["head"], 10.0, t) / (t * t)
    assert torch.allclose(kl(x), plain * t * t)
    same = LossInputs(student=batch["teacher"], teacher=batch["teacher"], head=batch["head"], temperature=t)
    assert kl(same).abs().item() < 1e-12


def test_kl_at_high_temperature_is_mse_on_centred_logits(batch):
    # Hinton et al.: as T grows, T^2 * KL -> (1 / 2C) * sum_c (dz_c - mean_c dz)^2, averaged over rows.
    x = LossInputs(**batch, logit_scale=10.0, temperature=1000.0)
    dz = 10.0 * (batch["student"] - batch["teacher"]) @ batch["head"].T
    centred = dz - dz.mean(-1, keepdim=True)
    c = batch["head"].shape[0]
    expected = (centred ** 2).sum(-1).mean() / (2 * c)
    assert LOSSES["kl"]()(x).item() == pytest.approx(expected.item(), rel=1e-2)


def test_kl_two_classes_by_hand():
    # The teacher is uniform over two classes, the student prefers one: KL(u || p_s) = sum_c 0.5 (log 0.5 - log p_s).
    head = unit([[1, 0], [0, 1]])
    teacher = unit([[1, 1]])
    student = unit([[1, 0]])
    x = LossInputs(student=student, teacher=teacher, head=head, logit_scale=1.0)
    ps = torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), 0)
    expected = (0.5 * (math.log(0.5) - ps.log())).sum()
    assert LOSSES["kl"]()(x).item() == pytest.approx(expected.item(), abs=1e-12)


def test_ce_ignores_unlabelled_rows(batch):
    labels = torch.tensor([-1, 2, 0, -1, 4, -1])
    x = LossInputs(**batch, logit_scale=10.0, labels=labels)
    keep = labels >= 0
    expected = F.cross_entropy(10.0 * batch["student"][keep] @ batch["head"].T, labels[keep])
    assert torch.allclose(LOSSES["ce"]()(x), expected)


def test_ce_without_any_label_is_zero_with_a_graph(batch):
    student = batch["student"].clone().requires_grad_(True)
    x = LossInputs(student=student, teacher=batch["teacher"], head=batch["head"], labels=torch.full((6,), -1))
    value = LOSSES["ce"]()(x)
    assert value.item() == 0.0
    value.backward()
    assert student.grad is not None and not student.grad.any()


def test_feature_losses_by_hand():
    s, t = unit([[1, 0], [1, 0]]), unit([[0, 1], [1, 0]])
    x = LossInputs(student=s, teacher=t)
    # Row 0 differs by (1, -1), row 1 by 0: |.| sums to 2 over 4 entries, squares likewise; cos is 0 and 1.
    assert LOSSES["l1"]()(x).item() == pytest.approx(0.5)
    assert LOSSES["mse"]()(x).item() == pytest.approx(0.5)
    assert LOSSES["cosine"]()(x).item() == pytest.approx(0.5)


def test_icl_uses_only_paired_rows():
    s = unit([[1, 0], [5, 5], [0, 1]])
    other = torch.tensor([[1, 0], [float("nan")] * 2, [0, 1]], dtype=torch.float64)
    has = torch.tensor([True, False, True])
    x = LossInputs(student=s, teacher=s, other=other, has_other=has, logit_scale=1.0)
    # Rows 0 and 2: logits [[1, 0], [0, 1]], targets the diagonal -> both rows log(1 + e^-1).
    assert LOSSES["icl"]()(x).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # has_other absent: NaN rows alone mark the missing pairs.
    x2 = LossInputs(student=s, teacher=s, other=other, logit_scale=1.0)
    assert LOSSES["icl"]()(x2).item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_affinity_by_hand():
    teacher = unit([[1, 0], [0, 1]])
    other = unit([[1, 0], [0, 1]])
    student = unit([[0, 1], [1, 0]])  # each row's similarity distribution is the teacher's mirrored
    x = LossInputs(student=student, teacher=teacher, other=other, has_other=torch.tensor([True, True]),
                   logit_scale=1.0)
    # p_t = (s, 1 - s), p_s = (1 - s, s), s = sigmoid(1): KL = (2s - 1) * log(s / (1 - s)) = tanh(1/2) per row.
    assert LOSSES["affinity"]()(x).item() == pytest.approx(math.tanh(0.5))
    same = LossInputs(student=teacher, teacher=teacher, other=other, has_other=torch.tensor([True, True]))
    assert abs(LOSSES["affinity"]()(same).item()) < 1e-12


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_the_student(batch, name):
    student = batch["student"].clone().requires_grad_(True)
    other = batch["teacher"].flip(0).clone()
    other[1] = float("nan")
    x = LossInputs(student=student, teacher=batch["teacher"], head=batch["head"], logit_scale=10.0, temperature=2.0,
                   labels=torch.tensor([0, -1, 1, 2, 3, 4]), other=other,
                   has_other=torch.tensor([True, False, True, True, True, True]),
                   hints=((student * 3, batch["teacher"]),))  # `hint`: a student feature that is not unit-norm
    value = LOSSES[name]()(x)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_weighted_loss_formula_and_terms(batch):
    loss = WeightedLoss(parse_loss_args(["seed001"]), tower="image")
    assert loss.formula == "0.6*l1 + 0.35*ce + 0.05*kl"
    assert loss.needs == ("logits", "labels")
    assert loss.names == ("l1", "ce", "kl") and loss.needs_of("ce") == ("logits", "labels")
    x = LossInputs(**batch, labels=torch.tensor([0, 1, 2, 3, 4, -1]), temperature=2.0)
    out = loss(x)
    assert set(out) == {"l1_loss", "ce_loss", "kl_loss", "loss"}
    expected = 0.6 * out["l1_loss"] + 0.35 * out["ce_loss"] + 0.05 * out["kl_loss"]
    assert torch.allclose(out["loss"], expected)


def test_weighted_loss_refusals():
    with pytest.raises(ValueError, match="unknown loss 'nope'.*kl.*cosine"):
        WeightedLoss({"nope": 1.0}, tower="image")
    with pytest.raises(ValueError, match="'kl' applies to the image tower only, not text.*cosine"):
        WeightedLoss({"kl": 1.0}, tower="text")
    with pytest.raises(ValueError, match="weight"):
        WeightedLoss({"l1": -1.0}, tower="image")
    with pytest.raises(ValueError, match="'ce' needs labels"):
        WeightedLoss({"ce": 1.0}, tower="image").check({"logits"})
    WeightedLoss({"icl": 1.0, "cosine": 1.0}, tower="text").check({"pairs"})


def test_parse_loss_args():
    assert parse_loss_args(["l1=0.6", "ce=0.35", "kl=0.05"]) == PRESETS["seed001"]
    assert parse_loss_args(["l1=0.6,kl=.5"]) == {"l1": 0.6, "kl": 0.5}
    assert parse_loss_args(["seed001"]) == PRESETS["seed001"]
    assert parse_loss_args([]) == {}
    for bad in ("l1", "l1=abc", "l1=0.6=1", "=3"):
        with pytest.raises(ValueError, match="e.g. --loss l1=0.6"):
            parse_loss_args([bad])
    with pytest.raises(ValueError, match="unknown loss 'foo'"):
        parse_loss_args(["foo=1"])
    with pytest.raises(ValueError, match="given twice"):
        parse_loss_args(["seed001", "kl=1"])


def test_default_losses_are_label_free():
    assert default_losses("image", {"logits", "labels"}, has_labels=True) == {"cosine": 1.0, "kl": 1.0}
    assert default_losses("image", set(), has_labels=False) == {"cosine": 1.0}
    assert default_losses("text", {"logits", "pairs"}, has_labels=True) == {"cosine": 1.0}
    for tower in ("image", "text"):
        WeightedLoss(default_losses(tower, {"logits"}, has_labels=False), tower=tower).check({"logits"})


def test_hint_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[3.0, 0.0], [1.0, 0.0]])  # row 0 aligned (scale does not matter), row 1 orthogonal
    x = LossInputs(student=s, teacher=s, hints=((s, t), (s, s)))
    assert LOSSES["hint"]()(x).item() == pytest.approx(((0 + 1) / 2 + 0) / 2)
    with pytest.raises(ValueError, match="hint-map"):
        LOSSES["hint"]()(LossInputs(student=s, teacher=s, hints=()))
