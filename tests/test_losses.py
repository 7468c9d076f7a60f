"""The losses of models/losses.py against fisvl-method.md §3 and baselines.md §1.5: hand-worked tiny examples,
plain-Python loop references, the published telltales, the thresholded softmax, gradients, the local-loss row split and dtypes,
and the registered loss modules that stages name."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import get_loss, list_losses
from models.losses import (SOFT_TARGET_EPS, AffiliationLoss, ContrastiveLoss, LossInputs, SceneAdaptiveLoss,
                           TripletLoss, affiliation_centres, affiliation_loss, contrastive_loss, scene_adaptive_loss,
                           scene_weights, thresholded_softmax, triplet_loss)


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


# ---------------------------------------------------------------------------------------------------------
# Plain-Python helpers (lists of floats, no torch): used to write the spec's formulas out by hand.

EPS = SOFT_TARGET_EPS
BETA1, BETA2 = -0.0015, 0.02  # RSITMD


def tensor(rows: list[tuple[float, ...]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def dot(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...]) -> float:
    return sum(x * y for x, y in zip(a, b))


def combine(weights: list[float], xs: list[tuple[float, ...]]) -> list[float]:
    """sum_k w_k x_k / sum_k w_k."""
    total = sum(weights)
    return [sum(w * x[c] for w, x in zip(weights, xs)) / total for c in range(len(xs[0]))]


def xent(q: list[float], logits: list[float]) -> float:
    """-sum_j q_j log softmax_j(logits)."""
    lse = math.log(sum(math.exp(x) for x in logits))
    return -sum(qj * (lj - lse) for qj, lj in zip(q, logits))


def nll(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target]."""
    return math.log(sum(math.exp(x) for x in logits)) - logits[target]


# ---------------------------------------------------------------------------------------------------------
# §3.1 / §3.2 L_con and L_wcon by hand.
# 3 pairs: captions 0 and 1 describe image A, caption 2 describes image B; tau = 0.5.
# s = V T^T = [[1, .6, 0], [1, .6, 0], [0, .8, 1]]; logits = 2 s.

CON_V = [(1.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
CON_T = [(1.0, 0.0), (0.6, 0.8), (0.0, 1.0)]
CON_IDS = [0, 0, 1]
Q_A = [(1 + EPS) / (2 + 3 * EPS), (1 + EPS) / (2 + 3 * EPS), EPS / (2 + 3 * EPS)]  # a query of image A
Q_B = [EPS / (1 + 3 * EPS), EPS / (1 + 3 * EPS), (1 + EPS) / (1 + 3 * EPS)]  # a query of image B


def test_con_hand_worked_soft_multi_positive_targets() -> None:
    """L_con (§3.1) on 3 pairs with two captions of one image, eps = 6e-5, tau = 0.5, worked by hand."""
    i2t = xent(Q_A, [2, 1.2, 0]) + xent(Q_A, [2, 1.2, 0]) + xent(Q_B, [0, 1.6, 2])  # rows of 2 s
    t2i = xent(Q_A, [2, 2, 0]) + xent(Q_A, [1.2, 1.2, 1.6]) + xent(Q_B, [0, 0, 2])  # columns of 2 s
    expected = (i2t / 3 + t2i / 3) / 2
    got = contrastive_loss(tensor(CON_V), tensor(CON_T), torch.tensor(CON_IDS), 0.5)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_wcon_hand_worked_caption_weights_scale_columns_and_rows() -> None:
    """L_wcon (§3.2): w_j scales caption j's column in i2t and caption-query j's whole row in t2i (w = 1, .5, 1)."""
    w = [1.0, 0.5, 1.0]
    i2t = xent(Q_A, [2, 0.6, 0]) + xent(Q_A, [2, 0.6, 0]) + xent(Q_B, [0, 0.8, 2])  # column 1 halved
    t2i = xent(Q_A, [2, 2, 0]) + xent(Q_A, [0.6, 0.6, 0.8]) + xent(Q_B, [0, 0, 2])  # caption-query 1 halved
    expected = (i2t / 3 + t2i / 3) / 2
    got = contrastive_loss(tensor(CON_V), tensor(CON_T), torch.tensor(CON_IDS), 0.5,
                           caption_weights=torch.tensor(w, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    ones = contrastive_loss(tensor(CON_V), tensor(CON_T), torch.tensor(CON_IDS), 0.5,
                            caption_weights=torch.ones(3, dtype=torch.float64))
    plain = contrastive_loss(tensor(CON_V), tensor(CON_T), torch.tensor(CON_IDS), 0.5)
    assert ones.item() == pytest.approx(plain.item(), rel=1e-14)


# ---------------------------------------------------------------------------------------------------------
# §3.3 L_aff by hand. 4 pairs with labels [0, 1, 0, 1] (scenes alternate, so per-chunk centres of 2 rows are
# nearly the rows themselves while whole-batch centres are scene means); tau_2 = 0.5.

AFF_V = [(1.0, 0.0), (0.0, 1.0), (0.6, 0.8), (0.8, 0.6)]
AFF_T = [(0.8, 0.6), (0.28, 0.96), (0.6, 0.8), (1.0, 0.0)]  # T V^T is not symmetric
AFF_Y = [0, 1, 0, 1]


def aff_centres_by_hand(x: list[tuple[float, float]], chunk: int) -> list[list[float]]:
    """c_i = sum_k w_ik x_k / sum_k w_ik with w_ik = 1[y_i = y_k] + eps, within the chunk, for labels 0 1 0 1."""
    same, other = 1 + EPS, EPS
    if chunk == 0:  # all four rows; rows 0, 2 share scene 0 and rows 1, 3 scene 1
        even = combine([same, other, same, other], x)
        odd = combine([other, same, other, same], x)
        return [even, odd, even, odd]
    assert chunk == 2  # blocks {0, 1} and {2, 3}, each with one row of each scene
    return [combine([same, other], x[0:2]), combine([other, same], x[0:2]),
            combine([same, other], x[2:4]), combine([other, same], x[2:4])]


def aff_by_hand(chunk: int, symmetric: bool, tau: float = 0.5) -> float:
    c_t, c_v = aff_centres_by_hand(AFF_T, chunk), aff_centres_by_hand(AFF_V, chunk)
    v, t = AFF_V, AFF_T
    # term 1: each image a against all text centres b, target b = a
    first = sum(nll([dot(v[a], c_t[b]) / tau for b in range(4)], a) for a in range(4)) / 4
    if symmetric:  # intended: each text a against all image centres b, target b = a
        second = sum(nll([dot(t[a], c_v[b]) / tau for b in range(4)], a) for a in range(4)) / 4
    else:  # published: each image centre b against all texts a, target a = b
        second = sum(nll([dot(t[a], c_v[b]) / tau for a in range(4)], b) for b in range(4)) / 4
    return (first + second) / 2


@pytest.mark.parametrize("chunk", [0, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_aff_hand_worked(chunk: int, symmetric: bool) -> None:
    """L_aff (§3.3), published and symmetric second term, whole-batch and 2-row centres, worked by hand."""
    got = affiliation_loss(tensor(AFF_V), tensor(AFF_T), torch.tensor(AFF_Y), 0.5, chunk=chunk, symmetric=symmetric)
    assert got.item() == pytest.approx(aff_by_hand(chunk, symmetric), rel=1e-12)


def test_aff_hand_worked_variants_really_differ() -> None:
    """The hand example separates the four variants, and the centres match the hand-built ones."""
    values = {(c, s): aff_by_hand(c, s) for c in (0, 2) for s in (False, True)}
    assert len({round(x, 6) for x in values.values()}) == 4
    for chunk in (0, 2):
        got = affiliation_centres(tensor(AFF_T), torch.tensor(AFF_Y), chunk=chunk)
        assert torch.allclose(got, tensor([tuple(r) for r in aff_centres_by_hand(AFF_T, chunk)]), rtol=0, atol=1e-14)
    # chunk = N is the whole batch
    assert affiliation_loss(tensor(AFF_V), tensor(AFF_T), torch.tensor(AFF_Y), 0.5, chunk=4).item() == \
        pytest.approx(aff_by_hand(0, False), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# §3.4 L_scene by hand. 3 pairs (3 distinct images), labels [0, 0, 1], tau = 0.5, alpha_m = 1.3.
#   v = (1,0), (.6,.8), (0,1);  t = (1,0), (.8,.6), (0,1)
#   S = V T^T = [[1, .8, 0], [.6, .96, .8], [0, .6, 1]]
#   published (no masking): every image's top text is its own caption and every text's top image its own image:
#       h_T = h_I = [0, 1, 2]
#   intended (positives masked):  h_T = [1, 2, 1],  h_I = [1, 0, 1]
#   Gram(t) off-diagonal: t0t1 = .8, t0t2 = 0, t1t2 = .6;  Gram(v): v0v1 = .6, v0v2 = 0, v1v2 = .8
#   logits G = Gram / tau = 2 Gram; entries < 1.3 become 0 (so 1.2 -> 0).

SC_V = [(1.0, 0.0), (0.6, 0.8), (0.0, 1.0)]
SC_T = [(1.0, 0.0), (0.8, 0.6), (0.0, 1.0)]
SC_IDS = [0, 1, 2]
SC_Y = [0, 0, 1]
E = math.exp


def scene_published_by_hand(intra: float, inter: float) -> float:
    # text side, columns t0 t1 t2, y_h = [0, 0, 1]; kept logits per anchor row:
    #   row0 [2, 1.6, 0], row1 [1.6, 2, 0 (was 1.2)], row2 [0, 0 (was 1.2), 2]
    m0, m1 = [intra, intra, inter], [inter, inter, intra]  # weights of rows with y = 0 / y = 1
    text = ((m0[0] * E(2) + m0[1] * E(1.6) + m0[2] * E(0)) / (E(2) + E(1.6) + E(0) + EPS)
            + (m0[0] * E(1.6) + m0[1] * E(2) + m0[2] * E(0)) / (E(1.6) + E(2) + E(0) + EPS)
            + (m1[0] * E(0) + m1[1] * E(0) + m1[2] * E(2)) / (E(0) + E(0) + E(2) + EPS))
    # image side, columns v0 v1 v2, y_h = [0, 0, 1]; kept: row0 [2, 0 (1.2), 0], row1 [0 (1.2), 2, 1.6],
    #   row2 [0, 1.6, 2]
    image = ((m0[0] * E(2) + m0[1] * E(0) + m0[2] * E(0)) / (E(2) + E(0) + E(0) + EPS)
             + (m0[0] * E(0) + m0[1] * E(2) + m0[2] * E(1.6)) / (E(0) + E(2) + E(1.6) + EPS)
             + (m1[0] * E(0) + m1[1] * E(1.6) + m1[2] * E(2)) / (E(0) + E(1.6) + E(2) + EPS))
    return (text / 3 + image / 3) / 2


def scene_intended_by_hand(intra: float, inter: float) -> float:
    # text side, columns t1 t2 t1, y_h = [0, 1, 0]; raw logits row0 [1.6, 0, 1.6], row1 [2, 1.2, 2],
    #   row2 [1.2, 2, 1.2] -> kept row0 [1.6, 0, 1.6], row1 [2, 0, 2], row2 [0, 2, 0]
    m0, m1 = [intra, inter, intra], [inter, intra, inter]
    text = ((m0[0] * E(1.6) + m0[1] * E(0) + m0[2] * E(1.6)) / (E(1.6) + E(0) + E(1.6) + EPS)
            + (m0[0] * E(2) + m0[1] * E(0) + m0[2] * E(2)) / (E(2) + E(0) + E(2) + EPS)
            + (m1[0] * E(0) + m1[1] * E(2) + m1[2] * E(0)) / (E(0) + E(2) + E(0) + EPS))
    # image side, columns v1 v0 v1, y_h = [0, 0, 0]; raw row0 [1.2, 2, 1.2], row1 [2, 1.2, 2], row2 [1.6, 0, 1.6]
    #   -> kept row0 [0, 2, 0], row1 [2, 0, 2], row2 [1.6, 0, 1.6]; rows 0, 1 all intra, row 2 all inter
    image = (intra * (E(0) + E(2) + E(0)) / (E(0) + E(2) + E(0) + EPS)
             + intra * (E(2) + E(0) + E(2)) / (E(2) + E(0) + E(2) + EPS)
             + inter * (E(1.6) + E(0) + E(1.6)) / (E(1.6) + E(0) + E(1.6) + EPS))
    return (text / 3 + image / 3) / 2


def scene_hand(mode: str, epoch: int, rows: slice | None = None, beta2: float = BETA2) -> torch.Tensor:
    return scene_adaptive_loss(tensor(SC_V), tensor(SC_T), torch.tensor(SC_IDS), torch.tensor(SC_Y), 0.5, epoch,
                               1.3, BETA1, beta2, mode=mode, rows=rows)


def test_scene_hand_example_top1_is_the_positive() -> None:
    """Sanity of the hand example: published h is each item's own positive, intended h is not."""
    s = tensor(SC_V) @ tensor(SC_T).t()
    assert s.argmax(1).tolist() == [0, 1, 2] and s.argmax(0).tolist() == [0, 1, 2]
    masked = s.masked_fill(torch.eye(3, dtype=torch.bool), float("-inf"))
    assert masked.argmax(1).tolist() == [1, 2, 1] and masked.argmax(0).tolist() == [1, 0, 1]


@pytest.mark.parametrize("epoch, weights", [(0, (1.0, 1.0)), (5, (1.0, 0.0)), (9, (1.0, 0.0))])
def test_scene_published_hand_worked(epoch: int, weights: tuple[float, float]) -> None:
    """L_scene as published (§3.4): h = top-1 (own positive), integer weights (1,1) at e=0 and (1,0) for e=1..9."""
    assert scene_hand("published", epoch).item() == pytest.approx(scene_published_by_hand(*weights), rel=1e-12)


def test_scene_published_hand_worked_late_epoch_integer_weight_two() -> None:
    """Published weights at e = 40 with beta2 = 0.02: int(exp(0.8)) = 2 intra, int(exp(-0.06)) = 0 inter."""
    assert scene_hand("published", 40).item() == pytest.approx(scene_published_by_hand(2.0, 0.0), rel=1e-12)


@pytest.mark.parametrize("epoch", [0, 5, 40])
def test_scene_intended_hand_worked(epoch: int) -> None:
    """L_scene intended (§3.4): positives masked when choosing h, float weights exp(beta2 e), exp(beta1 e)."""
    expected = scene_intended_by_hand(math.exp(BETA2 * epoch), math.exp(BETA1 * epoch))
    assert scene_hand("intended", epoch).item() == pytest.approx(expected, rel=1e-12)


def test_scene_modes_differ_and_bad_mode_rejected() -> None:
    """Published and intended disagree on the hand example at e = 5; an unknown mode raises."""
    assert abs(scene_hand("published", 5).item() - scene_hand("intended", 5).item()) > 0.05
    with pytest.raises(ValueError):
        scene_hand("bogus", 0)


# ---------------------------------------------------------------------------------------------------------
# Published telltales and the scene weights.

@pytest.mark.parametrize("epoch, integer, expected", [
    (0, True, (1.0, 1.0)), (1, True, (1.0, 0.0)), (5, True, (1.0, 0.0)), (9, True, (1.0, 0.0)),
    (34, True, (1.0, 0.0)), (35, True, (2.0, 0.0)),  # exp(0.68) = 1.97, exp(0.70) = 2.01
    (0, False, (1.0, 1.0)), (1, False, (math.exp(0.02), math.exp(-0.0015))),
    (9, False, (math.exp(0.18), math.exp(-0.0135))), (35, False, (math.exp(0.7), math.exp(-0.0525))),
])
def test_scene_weights_rsitmd(epoch: int, integer: bool, expected: tuple[float, float]) -> None:
    """(intra, inter) = (exp(beta2 e), exp(beta1 e)), truncated to integers as published (beta = -0.0015, 0.02)."""
    got = scene_weights(epoch, BETA1, BETA2, integer)
    assert got == pytest.approx(expected, rel=1e-15)
    if integer:
        assert all(float(int(x)) == x for x in got)


def test_scene_weights_q4_negative_beta2_zeroes_both() -> None:
    """§11 Q4: with beta2 = -0.001 the truncated weights are (0, 0) from e = 1, so L_scene would be 0."""
    assert scene_weights(0, -0.001, -0.001, True) == (1.0, 1.0)
    assert all(scene_weights(e, -0.002, -0.001, True) == (0.0, 0.0) for e in range(1, 10))
    assert scene_hand("published", 3, beta2=-0.001).item() == 0.0


def random_batch(n: int = 12, d: int = 8, seed: int = 0, noise: float = 0.6, image_noise: float = 0.0,
                 dtype=torch.float64):
    """Pairs with repeated images (same image -> same label, identical feature unless ``image_noise`` > 0, as
    with two augmentations) and captions near them."""
    ids = [0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 6][:n] if n <= 12 else [i // 2 for i in range(n)]
    scene_of_image = [0, 1, 0, 2, 1, 2, 0] + [i % 3 for i in range(7, n)]
    labels = [scene_of_image[i] for i in ids]
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(max(ids) + 1, d, generator=gen, dtype=torch.float64), dim=-1)
    v = F.normalize(images[ids] + image_noise * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    t = F.normalize(v + noise * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    return v.to(dtype), t.to(dtype), torch.tensor(ids), torch.tensor(labels)


def test_scene_published_is_one_at_epoch_zero() -> None:
    """Telltale: at e = 0 the published L_scene is a softmax summed with unit weights, 1.0 up to eps."""
    for seed in range(3):
        v, t, ids, y = random_batch(seed=seed)
        got = scene_adaptive_loss(v, t, ids, y, 0.07, 0, 2.0, BETA1, BETA2).item()
        assert 1.0 - 1e-3 < got <= 1.0


# ---------------------------------------------------------------------------------------------------------
# Plain-Python loop references, written from §3.3 / §3.4.

def ref_centres(x: list[list[float]], y: list[int], eps: float, chunk: int) -> list[list[float]]:
    n, d = len(x), len(x[0])
    out = []
    for i in range(n):
        num, den = [0.0] * d, 0.0
        for k in range(n):
            if chunk and i // chunk != k // chunk:
                continue  # centres are built per process from its own rows
            w = (1.0 if y[i] == y[k] else 0.0) + eps
            num = [num[c] + w * x[k][c] for c in range(d)]
            den += w
        out.append([c / den for c in num])
    return out


def ref_aff(v, t, y, tau, chunk, symmetric, eps=EPS) -> float:
    v, t, y = v.tolist(), t.tolist(), y.tolist()
    n = len(y)
    c_t, c_v = ref_centres(t, y, eps, chunk), ref_centres(v, y, eps, chunk)
    first = sum(nll([dot(v[a], c_t[b]) / tau for b in range(n)], a) for a in range(n)) / n
    if symmetric:
        second = sum(nll([dot(t[a], c_v[b]) / tau for b in range(n)], a) for a in range(n)) / n
    else:
        second = sum(nll([dot(t[a], c_v[b]) / tau for a in range(n)], b) for b in range(n)) / n
    return (first + second) / 2


def ref_hard(v, t, ids, mask_positives: bool) -> tuple[list[int], list[int]]:
    """h_T(b) = first argmax_j S_bj, h_I(b) = first argmax_j S_jb, skipping same-image items if asked."""
    n = len(ids)
    s = [[dot(v[i], t[j]) for j in range(n)] for i in range(n)]
    h_t, h_i = [], []
    for b in range(n):
        cand = [j for j in range(n) if not (mask_positives and ids[j] == ids[b])]
        h_t.append(max(cand, key=lambda j: (s[b][j], -j)))
        h_i.append(max(cand, key=lambda j: (s[j][b], -j)))
    return h_t, h_i


def ref_scene(v, t, ids, y, tau, alpha_m, mode, weights, eps=EPS) -> float:
    """(1/2N) sum over both modalities of sum_a sum_b p_ab M_ab with the thresholded softmax."""
    v, t, ids, y = v.tolist(), t.tolist(), ids.tolist(), y.tolist()
    n = len(ids)
    h_t, h_i = ref_hard(v, t, ids, mode == "intended")
    intra, inter = weights
    total = 0.0
    for feat, hard in ((t, h_t), (v, h_i)):
        for a in range(n):
            g = [dot(feat[a], feat[hard[b]]) / tau for b in range(n)]
            g = [x if x >= alpha_m else 0.0 for x in g]
            den = sum(math.exp(x) for x in g) + eps
            total += sum(math.exp(g[b]) / den * (intra if y[a] == y[hard[b]] else inter) for b in range(n))
    return total / (2 * n)


@pytest.mark.parametrize("chunk", [0, 4, 6])
@pytest.mark.parametrize("symmetric", [False, True])
def test_aff_matches_loop_reference(chunk: int, symmetric: bool) -> None:
    """Vectorised L_aff equals the per-sample loop of §3.3 on 12 pairs (whole-batch and per-chunk centres)."""
    v, t, _, y = random_batch(seed=4)
    got = affiliation_loss(v, t, y, 0.07, chunk=chunk, symmetric=symmetric)
    assert got.item() == pytest.approx(ref_aff(v, t, y, 0.07, chunk, symmetric), rel=1e-10)


@pytest.mark.parametrize("mode", ["published", "intended"])
@pytest.mark.parametrize("epoch", [0, 3, 9, 35])
def test_scene_matches_loop_reference(mode: str, epoch: int) -> None:
    """Vectorised L_scene equals the per-sample loop of §3.4 on 12 pairs with repeated images."""
    v, t, ids, y = random_batch(seed=5)
    h_pub = ref_hard(v.tolist(), t.tolist(), ids.tolist(), False)
    h_int = ref_hard(v.tolist(), t.tolist(), ids.tolist(), True)
    assert h_pub != h_int  # the batch exercises the positive masking
    intra, inter = math.exp(BETA2 * epoch), math.exp(BETA1 * epoch)
    weights = (float(int(intra)), float(int(inter))) if mode == "published" else (intra, inter)
    got = scene_adaptive_loss(v, t, ids, y, 0.07, epoch, 2.0, BETA1, BETA2, mode=mode)
    assert got.item() == pytest.approx(ref_scene(v, t, ids, y, 0.07, 2.0, mode, weights), rel=1e-10)


def test_scene_published_epochs_1_to_9_is_same_scene_mass() -> None:
    """Telltale: for e = 1..9 published L_scene is the softmax mass on same-scene top-1 items only."""
    v, t, ids, y = random_batch(seed=6)
    same_scene_mass = ref_scene(v, t, ids, y, 0.07, 2.0, "published", (1.0, 0.0))
    assert 0.0 < same_scene_mass < 0.99
    for epoch in range(1, 10):
        got = scene_adaptive_loss(v, t, ids, y, 0.07, epoch, 2.0, BETA1, BETA2, mode="published")
        assert got.item() == pytest.approx(same_scene_mass, rel=1e-10)


# ---------------------------------------------------------------------------------------------------------
# §3.4 step 4: the thresholded softmax.

def test_thresholded_softmax_below_threshold_counts_as_exp_zero() -> None:
    """Logits below the margin become 0 (e^0 = 1 in the denominator), not -inf; eps is added to it."""
    logits = torch.tensor([[3.0, -1.0, 0.5, 1.0]], dtype=torch.float64)
    den = E(3.0) + E(0) + E(0) + E(1.0) + EPS  # -1 and 0.5 < 1 -> 0; 1.0 >= 1 is kept
    expected = [E(3.0) / den, 1 / den, 1 / den, E(1.0) / den]
    assert thresholded_softmax(logits, 1.0).squeeze(0).tolist() == pytest.approx(expected, rel=1e-14)


def test_thresholded_softmax_eps_in_denominator() -> None:
    """With eps = 0.5 a row of two kept zeros gives 1 / 2.5 each, so the row sums to 0.8, not 1."""
    got = thresholded_softmax(torch.zeros(1, 2, dtype=torch.float64), 0.0, eps=0.5)
    assert got.squeeze(0).tolist() == pytest.approx([0.4, 0.4], rel=1e-14)
    got = thresholded_softmax(torch.tensor([[2.0, 3.0]], dtype=torch.float64), 0.0, eps=0.0)
    assert got.sum().item() == pytest.approx(1.0, rel=1e-14)


def test_thresholded_softmax_zero_gradient_below_threshold() -> None:
    """Entries below the margin get exactly zero gradient; kept entries get the softmax gradient."""
    logits = torch.tensor([[3.0, -1.0, 0.5, 1.0]], dtype=torch.float64, requires_grad=True)
    coeff = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    (thresholded_softmax(logits, 1.0) * coeff).sum().backward()
    den = E(3.0) + 2 + E(1.0) + EPS
    p = [E(3.0) / den, 1 / den, 1 / den, E(1.0) / den]
    mean_coeff = sum(c * q for c, q in zip([1, 2, 3, 4], p))
    # d/dG_k sum_j c_j p_j = p_k (c_k - sum_j c_j p_j) for kept k, 0 for thresholded k
    expected = [p[0] * (1 - mean_coeff), 0.0, 0.0, p[3] * (4 - mean_coeff)]
    assert logits.grad.squeeze(0).tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert logits.grad[0, 1].item() == 0.0 and logits.grad[0, 2].item() == 0.0


def test_thresholded_softmax_stable_for_large_logits() -> None:
    """Logits of 200 in float32 (e^200 overflows there) match the direct float64 formula; 800 in float64."""
    got = thresholded_softmax(torch.tensor([[200.0, 199.0, 0.5]]), 1.0)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    den = E(200.0) + E(199.0) + E(0.0) + EPS  # finite in float64
    expected = [E(200.0) / den, E(199.0) / den, 1 / den]
    assert got.squeeze(0).tolist() == pytest.approx(expected, rel=1e-6, abs=1e-30)
    # 800 overflows even float64 directly; divide numerator and denominator by e^800 by hand
    got64 = thresholded_softmax(torch.tensor([[800.0, 799.0, 0.5]], dtype=torch.float64), 1.0)
    den = 1 + E(-1.0) + E(-800.0) + EPS * E(-800.0)
    assert got64.squeeze(0).tolist() == pytest.approx([1 / den, E(-1.0) / den, 0.0], rel=1e-14, abs=1e-300)


# ---------------------------------------------------------------------------------------------------------
# Gradients.

def test_scene_gradient_reaches_anchor_and_hard_item_not_thresholded_entries() -> None:
    """L_scene on anchor row 0 of the hand example: grad to anchor t0/v0 and hard item t1, none below alpha_m."""
    y = torch.tensor([0, 1, 0])  # so the thresholded item 2 has weight 1 and the kept item 1 weight 0 at e = 5
    for alpha_m, zero_text, zero_image in ((1.3, [2], [1, 2]), (-10.0, [], [])):
        v, t = tensor(SC_V).requires_grad_(True), tensor(SC_T).requires_grad_(True)
        # published h_T = h_I = [0, 1, 2]; text logits row0 [2, 1.6, 0], image logits row0 [2, 1.2, 0]
        loss = scene_adaptive_loss(v, t, torch.tensor(SC_IDS), y, 0.5, 5, alpha_m, BETA1, BETA2, rows=slice(0, 1))
        loss.backward()
        text_norms, image_norms = t.grad.norm(dim=1).tolist(), v.grad.norm(dim=1).tolist()
        assert text_norms[0] > 1e-3 and image_norms[0] > 1e-3  # anchors
        assert text_norms[1] > 1e-3  # t1 only enters as the hard item h_T(1): the second factor
        for k in range(3):
            assert (text_norms[k] == 0.0) == (k in zero_text)
            assert (image_norms[k] == 0.0) == (k in zero_image)


@pytest.mark.parametrize("mode, epoch", [("published", 5), ("intended", 5), ("intended", 0)])
def test_scene_gradient_matches_finite_differences(mode: str, epoch: int) -> None:
    """Autograd of L_scene (through both factors of G) equals finite differences at fixed h and threshold set."""
    v, t, ids, y = random_batch(seed=7, image_noise=0.2)  # no duplicate features: no argmax ties (kinks)
    v, t = v.requires_grad_(True), t.requires_grad_(True)
    # alpha_m = 2 with tau = 0.07; no logit lies within 1e-3 of the margin, so a 1e-6 step flips nothing
    g = torch.cat([t @ t.t(), v @ v.t()]) / 0.07
    assert ((g - 2.0).abs() > 1e-3).all()
    assert torch.autograd.gradcheck(
        lambda a, b: scene_adaptive_loss(a, b, ids, y, 0.07, epoch, 2.0, BETA1, BETA2, mode=mode), (v, t), fast_mode=True)


@pytest.mark.parametrize("symmetric", [False, True])
def test_aff_gradient_matches_finite_differences(symmetric: bool) -> None:
    """Autograd of L_aff (through the centres) equals finite differences, per-chunk centres."""
    v, t, _, y = random_batch(n=8, d=4, seed=8)
    v, t = v.requires_grad_(True), t.requires_grad_(True)
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: affiliation_loss(a, b, y, c, chunk=4, symmetric=symmetric), (v, t, temp), fast_mode=True)


def test_aff_gradient_reaches_features_only_through_centres() -> None:
    """Row 0's published L_aff: v1..v3 enter only via the image centre c^V_0, so only its chunk gets gradient."""
    labels = torch.tensor([0, 0, 1, 1])
    for chunk, nonzero in ((2, [0, 1]), (0, [0, 1, 2, 3])):
        v, t = tensor(AFF_V).requires_grad_(True), tensor(AFF_T).requires_grad_(True)
        affiliation_loss(v, t, labels, 0.5, chunk=chunk, rows=slice(0, 1)).backward()
        norms = v.grad.norm(dim=1).tolist()
        for k in range(4):
            assert (norms[k] > 0.0) == (k in nonzero), (chunk, norms)
        assert (t.grad.norm(dim=1) > 0).all()  # texts: via the text centres (term 1) and directly (term 2)
    # with eps = 0 and whole-batch centres, row 0's centre ignores the other scene entirely
    v, t = tensor(AFF_V).requires_grad_(True), tensor(AFF_T)
    affiliation_loss(v, t, labels, 0.5, eps=0.0, rows=slice(0, 1)).backward()
    assert v.grad[1].norm() > 0 and v.grad[2].norm() == 0 and v.grad[3].norm() == 0


# ---------------------------------------------------------------------------------------------------------
# Local-loss row split and dtypes.

LOSSES = {
    "con": lambda v, t, ids, y, rows: contrastive_loss(v, t, ids, 0.07, rows=rows),
    "wcon": lambda v, t, ids, y, rows: contrastive_loss(
        v, t, ids, 0.07, caption_weights=torch.linspace(0.9, 1.0, len(ids), dtype=v.dtype), rows=rows),
    "aff published": lambda v, t, ids, y, rows: affiliation_loss(v, t, y, 0.07, rows=rows),
    "aff published chunk 4": lambda v, t, ids, y, rows: affiliation_loss(v, t, y, 0.07, chunk=4, rows=rows),
    "aff symmetric chunk 6": lambda v, t, ids, y, rows: affiliation_loss(v, t, y, 0.07, chunk=6, symmetric=True,
                                                                         rows=rows),
    "scene published e0": lambda v, t, ids, y, rows: scene_adaptive_loss(v, t, ids, y, 0.07, 0, 2.0, BETA1, BETA2,
                                                                         rows=rows),
    "scene published e5": lambda v, t, ids, y, rows: scene_adaptive_loss(v, t, ids, y, 0.07, 5, 2.0, BETA1, BETA2,
                                                                         rows=rows),
    "scene intended e5": lambda v, t, ids, y, rows: scene_adaptive_loss(v, t, ids, y, 0.07, 5, 2.0, BETA1, BETA2,
                                                                        mode="intended", rows=rows),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("parts", [2, 4])
def test_rows_slices_average_to_full_loss(name: str, parts: int) -> None:
    """The mean of the losses over equal row slices (one per process) equals the full-batch loss."""
    v, t, ids, y = random_batch(seed=9)
    loss = LOSSES[name]
    full = loss(v, t, ids, y, None).item()
    size = len(ids) // parts
    pieces = [loss(v, t, ids, y, slice(k * size, (k + 1) * size)).item() for k in range(parts)]
    assert sum(pieces) / parts == pytest.approx(full, rel=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_inputs_give_float32_close_to_fp32(name: str) -> None:
    """bf16 features give a float32 loss within bf16 rounding of the fp32 loss."""
    v, t, ids, y = random_batch(seed=10, noise=0.3, dtype=torch.float32)
    loss = LOSSES[name]
    ref = loss(v, t, ids, y, None)
    got = loss(v.bfloat16(), t.bfloat16(), ids, y, None)
    assert ref.dtype == torch.float32 and got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=3e-2, abs=1e-2)


# ---------------------------------------------------------------------------------------------------------
# The registered loss modules: each reads its flat config keys and calls its function above.


def test_loss_modules_compute_their_functions_with_their_config_keys() -> None:
    """contr at the model's ``temp`` (weighted when the stage says so), affil at its own learnable temperature
    (initialised from ``temp2``, per-process centres by default), scene at ``temp`` with its keys."""
    assert list_losses() == ["affil", "contr", "scene", "seg", "triplet"]
    assert [get_loss(name) for name in ("contr", "affil", "scene")] == [ContrastiveLoss, AffiliationLoss,
                                                                        SceneAdaptiveLoss]
    config = {"soft_target_eps": 1e-4, "temp2": 0.05, "affil_symmetric": True, "affil_center_chunk": 0,
              "scene_mode": "intended", "alpha_m": 2.0, "beta1": BETA1, "beta2": BETA2}
    v, t, ids, y = random_batch(seed=11)
    weights = torch.linspace(0.9, 1.0, len(ids), dtype=v.dtype)
    fields = {"image_idx": ids, "label": y, "caption_weight": weights}
    rows = slice(0, 6)
    inputs = LossInputs(v, t, fields, {"temp": torch.tensor(0.07)}, rows, local_batch=6, epoch=5)
    torch.testing.assert_close(ContrastiveLoss(config)(inputs), contrastive_loss(v, t, ids, 0.07, None, 1e-4, rows))
    weighted = LossInputs(v, t, fields, {"temp": torch.tensor(0.07)}, rows, 6, 5, caption_weights=True)
    torch.testing.assert_close(ContrastiveLoss(config)(weighted),
                               contrastive_loss(v, t, ids, 0.07, weights, 1e-4, rows))
    affil = AffiliationLoss(config).double()
    assert [(n, p.item()) for n, p in affil.named_parameters()] == [("temp", pytest.approx(0.05))]
    torch.testing.assert_close(affil(inputs), affiliation_loss(v, t, y, 0.05, 1e-4, chunk=6, symmetric=True,
                                                               rows=rows))
    torch.testing.assert_close(SceneAdaptiveLoss(config)(inputs),
                               scene_adaptive_loss(v, t, ids, y, 0.07, 5, 2.0, BETA1, BETA2, "intended", 1e-4, rows))
    assert ContrastiveLoss.sample_fields == ("caption_weight",)
    assert AffiliationLoss.sample_fields == SceneAdaptiveLoss.sample_fields == ("label",)


# ---------------------------------------------------------------------------------------------------------
# The triplet loss (PIR's use_triplet_loss; VSE++'s hinge): against its formula written as loops.


def triplet_formula(s: list[list[float]], ids: list[int], margin, max_violation: bool) -> float:
    """sum_i sum_{j: id_j != id_i} [m_ij + s_ij - s_ii]+  +  sum_j sum_{i: id_i != id_j} [m_ij + s_ij - s_jj]+,
    or with max_violation each anchor's largest violation only (0 when it has none)."""
    n = len(ids)
    m = (lambda i, j: margin[i][j]) if isinstance(margin, list) else (lambda i, j: margin)
    captions = [[max(0.0, m(i, j) + s[i][j] - s[i][i]) for j in range(n) if ids[j] != ids[i]] for i in range(n)]
    images = [[max(0.0, m(i, j) + s[i][j] - s[j][j]) for i in range(n) if ids[i] != ids[j]] for j in range(n)]
    pick = (lambda costs: max(costs, default=0.0)) if max_violation else sum
    return sum(pick(row) for row in captions) + sum(pick(column) for column in images)


@pytest.mark.parametrize("max_violation", [False, True])
@pytest.mark.parametrize("margin_kind", ["float", "matrix"])
def test_triplet_matches_loop_formula(max_violation: bool, margin_kind: str) -> None:
    """Multi-caption images (ids 0, 1, 5 have several captions): their captions are not negatives of each other."""
    v, t, ids, _ = random_batch(seed=21, noise=0.9)
    scores = v @ t.T
    margin = 0.2 if margin_kind == "float" else torch.rand(len(ids), len(ids), generator=torch.Generator().manual_seed(4),
                                                           dtype=torch.float64) * 0.5
    expected = triplet_formula(scores.tolist(), ids.tolist(), margin if margin_kind == "float" else margin.tolist(),
                               max_violation)
    got = triplet_loss(scores, ids, margin, max_violation)
    assert expected > 0 and got.item() == pytest.approx(expected, rel=1e-12)


def test_triplet_hand_worked_and_same_image_captions_are_not_negatives() -> None:
    """s = [[0.9, 0.8, 0.1], [0.85, 0.7, 0.3], [0.2, 0.6, 0.5]], margin 0.2. Distinct images: caption costs
    row 0: 0.1 + 0 = 0.1; row 1: 0.35 + 0 = 0.35; row 2: 0 + 0.3 = 0.3; image costs column 0: 0.15 + 0 = 0.15;
    column 1: 0.3 + 0.1 = 0.4; column 2: 0 + 0 = 0; total 1.3. With items 0 and 1 one image, only the pairs
    with item 2 count: rows 0, 0, 0.3 and columns 0, 0.1, 0, total 0.4."""
    s = torch.tensor([[0.9, 0.8, 0.1], [0.85, 0.7, 0.3], [0.2, 0.6, 0.5]], dtype=torch.float64)
    assert triplet_loss(s, torch.tensor([0, 1, 2])).item() == pytest.approx(1.3)
    assert triplet_loss(s, torch.tensor([0, 0, 2])).item() == pytest.approx(0.4)
    # hardest negatives: rows 0.1, 0.35, 0.3; columns 0.15, 0.3, 0
    assert triplet_loss(s, torch.tensor([0, 1, 2]), max_violation=True).item() == pytest.approx(1.2)


@pytest.mark.parametrize("max_violation", [False, True])
def test_triplet_row_slices_sum_to_the_full_loss_and_gradients_flow(max_violation: bool) -> None:
    """The loss is a sum: each process's anchors give a part, and the parts add up to the full loss."""
    v, t, ids, _ = random_batch(seed=22, noise=0.9)
    v.requires_grad_(True)
    full = triplet_loss(v @ t.T, ids, 0.2, max_violation)
    parts = [triplet_loss(v @ t.T, ids, 0.2, max_violation, rows=slice(k, k + 4)) for k in (0, 4, 8)]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-12)
    full.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_triplet_module_reads_its_keys_and_scales_its_part_by_the_process_count() -> None:
    """``triplet_margin`` and ``triplet_max_violation``; with local rows (2 processes x 6) each process returns
    twice its part, so that the processes' mean is the full loss and DDP's averaged gradients are its gradients."""
    v, t, ids, _ = random_batch(seed=23, noise=0.9)
    config = {"triplet_margin": 0.3, "triplet_max_violation": True, "triplet_margin_mode": "fixed",
              "adaptive_margin_gamma": 0.6, "adaptive_margin_beta": 5.0, "triplet_normalise": False}
    loss = TripletLoss(config)
    assert get_loss("triplet") is TripletLoss and TripletLoss.model_outputs == () and not list(loss.parameters())
    whole = LossInputs(v, t, {"image_idx": ids}, {}, None, local_batch=12, epoch=0)
    torch.testing.assert_close(loss(whole), triplet_loss(v @ t.T, ids, 0.3, True))
    halves = [loss(LossInputs(v, t, {"image_idx": ids}, {}, slice(k, k + 6), local_batch=6, epoch=0)) for k in (0, 6)]
    torch.testing.assert_close(halves[0], 2 * triplet_loss(v @ t.T, ids, 0.3, True, rows=slice(0, 6)))
    torch.testing.assert_close((halves[0] + halves[1]) / 2, loss(whole))


def test_triplet_bf16_scores_give_float32() -> None:
    v, t, ids, _ = random_batch(seed=24, noise=0.9, dtype=torch.float32)
    ref = triplet_loss(v @ t.T, ids)
    got = triplet_loss((v.bfloat16() @ t.bfloat16().T), ids)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=3e-2)
