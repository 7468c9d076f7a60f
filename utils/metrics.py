"""Recall@K for image-text retrieval with X-VLM's ``itm_eval`` semantics, vectorised on any device.

Ranks are 0-based positions in the candidate list sorted by descending score. Ties are broken by
candidate index (the earlier candidate ranks higher), i.e. a stable sort; X-VLM reverses an unstable
``np.argsort`` and so breaks ties arbitrarily. Duplicated captions (frequent in RSICD) make ties real.

* image -> text (``txt_r*``): an image's rank is the best rank among its ground-truth captions;
* text -> image (``img_r*``): a caption's rank is the rank of its single image;
* ``r_mean`` is the mean of the six recalls. All values are percentages.
"""
from __future__ import annotations

from typing import Sequence

import torch

RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


def _ranks_of_targets(scores: torch.Tensor, target_score: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """Rank of one target per row: candidates scoring higher, plus equal-scoring ones with a lower index."""
    candidates = torch.arange(scores.shape[1], device=scores.device)
    higher = (scores > target_score[:, None]).sum(1)
    tied_before = ((scores == target_score[:, None]) & (candidates[None, :] < target_index[:, None])).sum(1)
    return higher + tied_before


def _chunked_ranks(scores: torch.Tensor, positives: torch.Tensor, chunk: int) -> torch.Tensor:
    """Best rank among each row's positive candidates; rows are processed ``chunk`` at a time to bound memory."""
    ranks = []
    for start in range(0, scores.shape[0], chunk):
        rows, pos = scores[start:start + chunk], positives[start:start + chunk]
        best_score = rows.masked_fill(~pos, float("-inf")).max(1).values
        # the first positive reaching the best score is the best-ranked positive under the stable tie rule
        first_best = (pos & (rows == best_score[:, None])).int().argmax(1)
        ranks.append(_ranks_of_targets(rows, best_score, first_best))
    return torch.cat(ranks)


def retrieval_ranks(sims: torch.Tensor, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int],
                    chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks: (per image, best of its captions; per caption, of its image)."""
    if sims.dim() != 2:
        raise ValueError(f"sims must be [n_images, n_texts], got shape {tuple(sims.shape)}")
    n_img, n_txt = sims.shape
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"sims is {n_img} x {n_txt} but img2txt has {len(img2txt)} images "
                         f"and txt2img {len(txt2img)} texts")
    device = sims.device
    txt2img_t = torch.as_tensor(list(txt2img), dtype=torch.long, device=device)
    owner_rows = torch.as_tensor([i for i, caps in enumerate(img2txt) for _ in caps], dtype=torch.long)
    owner_cols = torch.as_tensor([c for caps in img2txt for c in caps], dtype=torch.long)
    positives = torch.zeros(n_img, n_txt, dtype=torch.bool, device=device)
    positives[owner_rows.to(device), owner_cols.to(device)] = True
    if not bool(positives.any(1).all()):
        raise ValueError("every image needs at least one caption in img2txt")
    i2t = _chunked_ranks(sims, positives, chunk)
    t2i_pos = torch.zeros(n_txt, n_img, dtype=torch.bool, device=device)
    t2i_pos[torch.arange(n_txt, device=device), txt2img_t] = True
    t2i = _chunked_ranks(sims.t(), t2i_pos, chunk)
    return i2t, t2i


def _recall(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * (ranks < k).double().mean().item()


def retrieval_metrics(sims: torch.Tensor, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> dict[str, float]:
    """R@1/5/10 both ways and their mean, in percent. ``sims`` is ``[n_images, n_texts]``."""
    i2t, t2i = retrieval_ranks(sims, img2txt, txt2img)
    metrics = {f"txt_r{k}": _recall(i2t, k) for k in RECALL_KS}
    metrics.update({f"img_r{k}": _recall(t2i, k) for k in RECALL_KS})
    metrics["r_mean"] = sum(metrics[key] for key in METRIC_KEYS[:-1]) / 6.0
    return metrics


def chance_metrics(img2txt: Sequence[Sequence[int]], n_texts: int) -> dict[str, float]:
    """Expected recalls of a random ranking: the baseline a trained model must beat."""
    n_img = len(img2txt)
    positives = torch.tensor([len(caps) for caps in img2txt], dtype=torch.float64)
    metrics = {}
    for k in RECALL_KS:
        # image -> text: 1 - P(none of an image's m captions among the top k of n_texts)
        j = torch.arange(min(k, n_texts), dtype=torch.float64)
        miss = ((n_texts - positives[:, None] - j).clamp(min=0) / (n_texts - j)).prod(1)
        metrics[f"txt_r{k}"] = 100.0 * (1.0 - miss.mean().item())
    metrics.update({f"img_r{k}": 100.0 * min(k, n_img) / n_img for k in RECALL_KS})
    metrics["r_mean"] = sum(metrics[key] for key in METRIC_KEYS[:-1]) / 6.0
    return metrics
