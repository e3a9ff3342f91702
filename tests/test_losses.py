"""Losses (method.md sections 3-4) against a direct, independent computation written with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from icthp.losses import (
    hp_loss,
    ict_hp_loss,
    ict_hp_scores,
    ict_loss,
    ict_targets,
    margin_ranking,
    negative_weight,
)


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def reference_ict_loss(img, te, tr, labels, neg_weight=0.5, alpha=20.0, beta=6.0, s=1.0, e2_from_r1=False):
    """The formulas of method.md section 3 spelled out over Python floats (float64), one pair at a time."""
    img, te, tr, labels = img.double().tolist(), te.double().tolist(), tr.double().tolist(), labels.double().tolist()
    b = len(img)
    reg_e = reg_r = 0.0
    for i in range(b):
        e1, e2, r1, r2 = labels[i]
        targets_e = [e1, r1 if e2_from_r1 else e2, 1.0]
        targets_r = [r1, r2, 1.0]
        for k in range(3):
            reg_e += (_cos(te[i], img[i][k]) - targets_e[k]) ** 2
            reg_r += (_cos(tr[i], img[i][k]) - targets_r[k]) ** 2
    regression = reg_e / (3 * b) + reg_r / (3 * b)

    def w(x):
        return 1.0 / (1.0 + math.exp(min(700.0, alpha * (abs(s * x) - beta))))

    neg_e = neg_r = 0.0
    count = 0
    for i in range(b):
        for j in range(b):
            if i == j:
                continue
            for k in range(3):
                x = _cos(te[i], img[j][k])
                y = _cos(tr[i], img[j][k])
                neg_e += w(x) * x * x
                neg_r += w(y) * y * y
                count += 1
    negatives = (neg_e / count + neg_r / count) if count else 0.0
    return regression + neg_weight * negatives, regression, negatives


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    b, d = 5, 8
    img = torch.randn(b, 3, d, generator=g)
    te, tr = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    e1, e2 = torch.rand(b, generator=g) * 0.5, 0.5 + torch.rand(b, generator=g) * 0.5
    t = torch.rand(b, generator=g)
    labels = torch.stack([e1, e2, e1 * t, e2 * t], -1)
    return img, te, tr, labels


@pytest.mark.parametrize("s", [1.0, 90.0])
@pytest.mark.parametrize("e2_from_r1", [False, True])
def test_ict_loss_equals_the_formula(batch, s, e2_from_r1):
    out = ict_loss(*batch, neg_logit_scale=s, e2_from_r1=e2_from_r1)
    total, regression, negatives = reference_ict_loss(*batch, s=s, e2_from_r1=e2_from_r1)
    assert out.loss.item() == pytest.approx(total, abs=1e-5)
    assert out.regression.item() == pytest.approx(regression, abs=1e-5)
    assert out.negatives.item() == pytest.approx(negatives, abs=1e-5)


def test_negative_weight_is_inert_as_released_and_active_at_scale_90(batch):
    x = torch.linspace(-1, 1, 201)
    assert torch.all(negative_weight(x, logit_scale=1.0) == 1.0)  # released: w == 1 everywhere
    w90 = negative_weight(x, logit_scale=90.0)
    assert w90[100] == 1.0 and w90[0] < 1e-30 and w90[-1] < 1e-30  # |90 x| > 6 is switched off
    # ... so at s = 90 the negatives term really differs from s = 1 on data with |cos| > 6/90.
    assert ict_loss(*batch, neg_logit_scale=90.0).negatives < ict_loss(*batch).negatives


def test_gradients_equal_the_float64_formula(batch):
    img, te, tr, labels = (t.clone().double() for t in batch)
    img.requires_grad_(True)
    ours_img = batch[0].clone().requires_grad_(True)
    ict_loss(ours_img, batch[1], batch[2], batch[3], neg_logit_scale=90.0).loss.backward()
    # float64 autograd through a plain re-implementation (vectorised here, checked against the loops above)
    n = torch.nn.functional.normalize
    imn, ten, trn = n(img, dim=-1), n(te, dim=-1), n(tr, dim=-1)
    e = torch.einsum("bd,bkd->bk", ten, imn)
    r = torch.einsum("bd,bkd->bk", trn, imn)
    et, rt = ict_targets(labels)
    reg = ((e - et.double()) ** 2).mean() + ((r - rt.double()) ** 2).mean()
    se = torch.einsum("id,jkd->ijk", ten, imn)
    sr = torch.einsum("id,jkd->ijk", trn, imn)
    mask = ~torch.eye(img.shape[0], dtype=torch.bool)
    def neg(x):
        return (torch.sigmoid(-20 * ((90 * x).abs() - 6)) * x**2).mean()
    total = reg + 0.5 * (neg(se[mask]) + neg(sr[mask]))
    assert total.item() == pytest.approx(reference_ict_loss(*batch, s=90.0)[0], abs=1e-9)
    total.backward()
    assert torch.allclose(ours_img.grad.double(), img.grad, atol=1e-5)
    assert torch.isfinite(ours_img.grad).all()


def test_global_batch_negatives_span_processes(batch):
    """Two simulated processes: the loss of the gathered global batch is the formula over all triplets,
    not the mean of per-process losses (negatives across processes count)."""
    img, te, tr, labels = batch
    halves = [(img[:2], te[:2], tr[:2], labels[:2]), (img[2:], te[2:], tr[2:], labels[2:])]
    gathered = [torch.cat([h[i] for h in halves]) for i in range(4)]
    global_loss = ict_loss(*gathered).loss.item()
    assert global_loss == pytest.approx(reference_ict_loss(*batch)[0], abs=1e-5)
    local_mean = sum(ict_loss(*h).loss.item() for h in halves) / 2
    assert abs(global_loss - local_mean) > 1e-3


def test_losses_stay_fp32_under_bf16_autocast(batch):
    ref = ict_loss(*batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ict_loss(*batch)
        h = torch.randn(4, 3)
        mr = hp_loss(h)
    assert out.loss.dtype == torch.float32 and mr.dtype == torch.float32
    assert out.loss.item() == ref.loss.item()


def test_one_triplet_has_no_negatives(batch):
    out = ict_loss(*(t[:1] for t in batch))
    assert out.negatives.item() == 0.0
    assert out.loss.item() == pytest.approx(reference_ict_loss(*(t[:1] for t in batch))[0], abs=1e-6)


def _mrl(better, worse, m):
    return max(0.0, m - (better - worse))


def test_hp_and_ict_hp_losses_equal_the_formula():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 3, generator=g)
    ict = torch.rand(6, 3, generator=g)
    m = 0.3
    rows_h = h.tolist()
    expected_hp = sum(_mrl(r[1], r[0], m) for r in rows_h) / 6 + sum(_mrl(r[2], r[1], m) for r in rows_h) / 6
    assert hp_loss(h).item() == pytest.approx(expected_hp, abs=1e-6)
    assert hp_loss(h, reduction="sum").item() == pytest.approx(expected_hp * 6, abs=1e-5)
    s = []
    for hi, ii in zip(rows_h, ict.tolist(), strict=True):
        z = sum(math.exp(x) for x in hi)
        s.append([ii[k] * math.exp(hi[k]) / z for k in range(3)])
    assert torch.allclose(ict_hp_scores(ict, h).double(), torch.tensor(s, dtype=torch.float64), atol=1e-6)
    expected_sum = sum(_mrl(r[1], r[0], m) + _mrl(r[2], r[1], m) for r in s)
    assert ict_hp_loss(ict, h).item() == pytest.approx(expected_sum, abs=1e-6)  # released: summed
    assert ict_hp_loss(ict, h, reduction="mean").item() == pytest.approx(expected_sum / 6, abs=1e-6)


def test_margin_ranking_matches_torch_and_checks_reduction():
    a, b = torch.randn(10), torch.randn(10)
    ref = torch.nn.functional.margin_ranking_loss(a, b, torch.ones(10), margin=0.3)
    assert margin_ranking(a, b).item() == pytest.approx(ref.item(), abs=1e-7)
    with pytest.raises(ValueError, match="reduction"):
        margin_ranking(a, b, reduction="max")
