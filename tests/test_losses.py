"""The contrastive loss against its formula written out with loops, and the local-loss row split."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import SOFT_TARGET_EPS, contrastive_loss


def formula(v: torch.Tensor, t: torch.Tensor, ids: list[int], tau: float, w: list[float] | None = None,
            eps: float = SOFT_TARGET_EPS) -> float:
    """L = (L_i2t + L_t2i) / 2 with Q_ij = (1[idx_i = idx_j] + eps) / sum_k (...), logits s_ij * w_j / tau."""
    n = len(ids)
    w = w or [1.0] * n
    s = [[float(v[i] @ t[j]) for j in range(n)] for i in range(n)]
    total_i2t = total_t2i = 0.0
    for a in range(n):
        q = [(1.0 if ids[a] == ids[b] else 0.0) + eps for b in range(n)]
        q = [x / sum(q) for x in q]
        i2t = [s[a][b] * w[b] / tau for b in range(n)]
        t2i = [s[b][a] * w[a] / tau for b in range(n)]
        lse_i2t = math.log(sum(math.exp(x) for x in i2t))
        lse_t2i = math.log(sum(math.exp(x) for x in t2i))
        total_i2t -= sum(q[b] * (i2t[b] - lse_i2t) for b in range(n))
        total_t2i -= sum(q[b] * (t2i[b] - lse_t2i) for b in range(n))
    return (total_i2t + total_t2i) / (2 * n)


def features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=gen), dim=-1).double(),
            F.normalize(torch.randn(n, d, generator=gen), dim=-1).double())


def test_matches_formula_with_multi_positives() -> None:
    v, t = features(6)
    ids = [0, 0, 1, 2, 2, 2]
    got = contrastive_loss(v, t, torch.tensor(ids), 0.07)
    assert got.item() == pytest.approx(formula(v, t, ids, 0.07), rel=1e-9)


def test_weighted_form_scales_each_captions_logits() -> None:
    v, t = features(5, seed=1)
    ids, w = [0, 1, 1, 2, 3], [1.0, 0.95, 1.0, 0.95, 1.0]
    got = contrastive_loss(v, t, torch.tensor(ids), 0.05, caption_weights=torch.tensor(w, dtype=torch.float64))
    assert got.item() == pytest.approx(formula(v, t, ids, 0.05, w), rel=1e-9)


def test_hand_worked_two_pairs() -> None:
    # s = [[1, 0], [0, 1]], tau = 1, eps = 0: each direction is -log(e / (e + 1)) per row
    v = t = torch.eye(2, dtype=torch.float64)
    got = contrastive_loss(v, t, torch.tensor([0, 1]), 1.0, eps=0.0)
    assert got.item() == pytest.approx(-math.log(math.e / (math.e + 1)))


def test_local_rows_average_to_the_full_loss() -> None:
    v, t = features(8, seed=2)
    ids = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4])
    full = contrastive_loss(v, t, ids, 0.07)
    halves = [contrastive_loss(v, t, ids, 0.07, rows=slice(0, 4)), contrastive_loss(v, t, ids, 0.07, rows=slice(4, 8))]
    assert (sum(halves) / 2).item() == pytest.approx(full.item(), rel=1e-12)


def test_gradient_reaches_features_and_temperature() -> None:
    v, t = features(4, seed=3)
    v.requires_grad_(True)
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    contrastive_loss(v, t, torch.tensor([0, 1, 2, 3]), temp).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0 and temp.grad is not None and temp.grad != 0
