"""Recall@K for image-text retrieval with X-VLM's ``itm_eval`` semantics, vectorised on any device.

Ranks are 0-based positions in the candidate list sorted by descending score. Ties are broken by
candidate index (the earlier candidate ranks higher), i.e. a stable sort; X-VLM reverses an unstable
``np.argsort`` and so breaks ties arbitrarily. Duplicated captions (frequent in RSICD) make ties real.

* image -> text (``txt_r*``): an image's rank is the best rank among its ground-truth captions;
* text -> image (``img_r*``): a caption's rank is the rank of its single image;
* ``r_mean`` is the mean of the six recalls. All values are percentages.

Both directions usually rank one score matrix; a test-time re-rank (``utils.rerank``) gives each direction
its own, passed as ``t2i_sims``.

Nothing is sorted: a target's rank is the number of candidates that outrank it (a higher score, or an equal
one with a lower index), counted in blocks of image rows against each row's and each column's target score.
Scores with NaN or inf raise ``NonFiniteScoresError`` instead of yielding recalls (NaN compares False, so a
diverged model would otherwise score 100 %).
"""
from __future__ import annotations

from typing import Sequence

import torch

RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


class NonFiniteScoresError(ValueError):
    """NaN/inf scores: every comparison with NaN is False, so NaN scores would put every target first (100 %)."""


def check_finite(sims: torch.Tensor) -> None:
    """Refuse NaN/inf scores. ``aminmax`` (one reduction, on the scores' device) propagates NaN and exposes
    +-inf, and costs a fraction of ``isfinite(sims).all()``; only the error path counts what is affected."""
    if sims.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(sims))).all()):
        return
    bad = ~torch.isfinite(sims)
    n_img, n_txt = sims.shape
    raise NonFiniteScoresError(
        f"{int(bad.sum())} of {sims.numel()} scores are non-finite (NaN or inf): {int(bad.any(1).sum())} of {n_img} "
        f"images have a non-finite score, as do {int(bad.any(0).sum())} of {n_txt} texts. The model's embeddings "
        f"are NaN/inf (a diverged model); no recall can be computed from them")


def _best_positives(sims: torch.Tensor, owner: torch.Tensor,
                    captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the best score among its captions and the first caption reaching it (its best-ranked one)."""
    scores = sims[owner, captions]
    best = torch.empty(sims.shape[0], dtype=sims.dtype, device=sims.device)
    best.scatter_reduce_(0, owner, scores, "amax", include_self=False)
    reached = scores == best[owner]
    first = torch.full((sims.shape[0],), sims.shape[1], dtype=torch.long, device=sims.device)
    first.scatter_reduce_(0, owner[reached], captions[reached], "amin")
    return best, first


def _outranking(block: torch.Tensor, target: torch.Tensor, target_index: torch.Tensor, candidates: torch.Tensor,
                dim: int, buffer: torch.Tensor) -> torch.Tensor:
    """Candidates along ``dim`` that outrank each target: a higher score, or an equal one and a lower index.

    ``target``/``target_index`` broadcast against ``block`` (one per row or per column); ``candidates`` holds the
    block's candidate indices along ``dim``. Two plain counts (``>`` and ``>=``) written as 0/1 into ``buffer`` (a
    reused float tensor: comparing into floats and summing them is faster than bool counts) beat one count of the
    combined condition; the tie term is added only where another candidate equals the target, which is rare
    except for duplicated captions.
    """
    above = torch.gt(block, target, out=buffer).sum(dim).int()
    equal = torch.ge(block, target, out=buffer).sum(dim).int() - above
    own = ((target_index >= candidates.min()) & (target_index <= candidates.max())).squeeze(dim).int()
    tied = (equal > own).nonzero().squeeze(1)  # another candidate of this block equals the target
    if tied.numel():
        other = 1 - dim
        ties = ((block.index_select(other, tied) == target.index_select(other, tied))
                & (candidates < target_index.index_select(other, tied)))
        above.index_add_(0, tied, ties.sum(dim, dtype=torch.int32))
    return above


def retrieval_ranks(sims: torch.Tensor, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int],
                    chunk: int = 128, t2i_sims: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks: (per image, best of its captions; per caption, of its image).

    Each score is compared with its row's target (the image's best caption) and its column's target (the
    caption's own image), ``chunk`` image rows at a time: no dense positive masks, no transposed copy.
    ``t2i_sims`` (same ``[n_images, n_texts]`` layout), when given, supplies the columns' scores instead.
    """
    if sims.dim() != 2:
        raise ValueError(f"sims must be [n_images, n_texts], got shape {tuple(sims.shape)}")
    n_img, n_txt = sims.shape
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"sims is {n_img} x {n_txt} but img2txt has {len(img2txt)} images "
                         f"and txt2img {len(txt2img)} texts")
    counts = torch.as_tensor([len(caps) for caps in img2txt], dtype=torch.long)
    if bool((counts == 0).any()):
        raise ValueError("every image needs at least one caption in img2txt")
    columns = sims if t2i_sims is None else t2i_sims
    if columns.shape != sims.shape:
        raise ValueError(f"t2i_sims must have the shape of sims {tuple(sims.shape)}, got {tuple(columns.shape)}")
    check_finite(sims)
    if t2i_sims is not None:
        check_finite(t2i_sims)
    device = sims.device
    owner = torch.repeat_interleave(torch.arange(n_img), counts).to(device)
    captions = torch.as_tensor([c for caps in img2txt for c in caps], dtype=torch.long, device=device)
    best, first = _best_positives(sims, owner, captions)
    own_image = torch.as_tensor(list(txt2img), dtype=torch.long, device=device)[None, :]
    own_score = columns.gather(0, own_image)
    texts = torch.arange(n_txt, device=device)[None, :]
    images = torch.arange(n_img, device=device)[:, None]
    rows = min(chunk, n_img)  # float32 sums of 0/1 are exact up to 2**24 candidates per count
    buffer = torch.empty(rows, n_txt, device=device,
                         dtype=torch.float32 if max(rows, n_txt) < 2 ** 24 else torch.float64)
    i2t = torch.empty(n_img, dtype=torch.int32, device=device)
    t2i = torch.zeros(n_txt, dtype=torch.int32, device=device)
    for start in range(0, n_img, chunk):
        stop = min(start + chunk, n_img)
        block, scratch = sims[start:stop], buffer[:stop - start]
        i2t[start:stop] = _outranking(block, best[start:stop, None], first[start:stop, None], texts, 1, scratch)
        t2i += _outranking(columns[start:stop], own_score, own_image, images[start:stop], 0, scratch)
    return i2t.long(), t2i.long()


def _recall(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * (ranks < k).double().mean().item()


def retrieval_metrics(sims: torch.Tensor, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int],
                      t2i_sims: torch.Tensor | None = None) -> dict[str, float]:
    """R@1/5/10 both ways and their mean, in percent. ``sims`` is ``[n_images, n_texts]``; ``t2i_sims``, in the
    same layout, when text -> image ranks other scores (a re-rank's)."""
    i2t, t2i = retrieval_ranks(sims, img2txt, txt2img, t2i_sims=t2i_sims)
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
