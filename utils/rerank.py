"""GaLR's multivariate re-rank (MR; Yuan et al., TGRS 2022): a test-time post-process of any model's scores.

Each query keeps its K1 = max(10, k) best candidates; candidate c at 0-based rank r gets p1 + p2 + p3 and
every other candidate 0:

* p1 = wp1 * s(q, c) / sum over all queries q' of s(q', c): how much of the candidate's score mass is q's;
* p2 = exp(-0.05 (r + 1)): the original rank;
* p3 = wp2 * exp(-0.05 (r' + 1)), r' the candidate's position once the K1 candidates are re-sorted by q's
  rank when c is the query (the reverse direction: a candidate that also retrieves q first moves up).

Image -> text re-ranks the rows of S, text -> image the rows of S^T, as GaLR's ``postprocessing/rerank.py``
does. Where that code differs: every sort here is stable (ties go to the lower index, as in
``utils.metrics``), where numpy's default argsort breaks them arbitrarily, and ties of r' (two candidates
for which q has the same reverse rank) are common; K1 is capped at the number of candidates, where the
published loop fails with an IndexError; it runs on the scores' device with no loop over queries.
"""
from __future__ import annotations

import torch

from utils.metrics import check_finite

MIN_CANDIDATES = 10  # GaLR's floor on K1: the recalls go up to R@10
RANK_DECAY = 0.05


def _decay(ranks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(-0.05 (rank + 1)): GaLR's weight of a 0-based rank."""
    return torch.exp(-RANK_DECAY * (ranks + 1).to(dtype))


def _rerank_rows(scores: torch.Tensor, k: int, wp1: float, wp2: float) -> torch.Tensor:
    """MR scores of ``[n_queries, n_candidates]`` scores: each row's candidates re-scored, the rest 0."""
    n_queries, n_candidates = scores.shape
    k1 = min(max(MIN_CANDIDATES, k), n_candidates)
    candidates = scores.sort(dim=1, descending=True, stable=True).indices[:, :k1]
    # reverse[q, c]: q's 0-based rank among all queries when candidate c is the query
    by_column = scores.sort(dim=0, descending=True, stable=True).indices
    reverse = torch.empty_like(by_column).scatter_(
        0, by_column, torch.arange(n_queries, device=scores.device)[:, None].expand(n_queries, n_candidates))
    resorted = reverse.gather(1, candidates).argsort(dim=1, stable=True)
    position = torch.empty_like(resorted).scatter_(
        1, resorted, torch.arange(k1, device=scores.device).expand(n_queries, k1))
    mass = scores.sum(0)[candidates]
    if bool((mass == 0).any()):
        raise ValueError("multivariate re-rank: a candidate's scores sum to 0 over all queries, so its p1 "
                         "(score / that sum) is undefined")
    p1 = wp1 * scores.gather(1, candidates) / mass
    p2 = _decay(torch.arange(k1, device=scores.device), scores.dtype)
    p3 = wp2 * _decay(position, scores.dtype)
    return torch.zeros_like(scores).scatter_(1, candidates, p1 + p2 + p3)


def multivariate_rerank(scores: torch.Tensor, k: int = 30, wp1: float = 0.3,
                        wp2: float = 1.1) -> tuple[torch.Tensor, torch.Tensor]:
    """GaLR's MR of ``[n_images, n_texts]`` scores: (image -> text scores, text -> image scores).

    Both come back ``[n_images, n_texts]``, as ``utils.metrics.retrieval_metrics(i2t, ..., t2i_sims=t2i)``
    reads them: the first is ranked along rows, the second along columns (GaLR's ``t2i_rerank_optim``
    transposes back the same way). Defaults are GaLR's published K = 30, Wp1 = 0.30, Wp2 = 1.1.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n_images, n_texts], got shape {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"multivariate re-rank: k must be >= 1, got {k}")
    check_finite(scores)
    i2t = _rerank_rows(scores, k, wp1, wp2)
    t2i = _rerank_rows(scores.T, k, wp1, wp2).T.contiguous()
    return i2t, t2i
