"""Retrieval losses as pure, vectorised functions of already-gathered, L2-normalised features.

Each training item is one (image, caption) pair; ``image_ids`` says which pairs share an image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SOFT_TARGET_EPS = 6e-5


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Softmax in fp32 under autocast; float64 inputs (tests against formulas) stay float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_targets(query_ids: torch.Tensor, key_ids: torch.Tensor, eps: float = SOFT_TARGET_EPS,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row-normalised multi-positive targets: every key of the query's image is a positive, plus ``eps`` everywhere."""
    same = (query_ids[:, None] == key_ids[None, :]).to(dtype)
    targets = same + eps
    return targets / targets.sum(1, keepdim=True)


def contrastive_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor,
                     temp: torch.Tensor | float, caption_weights: torch.Tensor | None = None,
                     eps: float = SOFT_TARGET_EPS, rows: slice | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with soft multi-positive targets (X-VLM's ITC with FISVL's epsilon).

    ``caption_weights`` (w_j per caption) turns it into the weighted contrastive loss: the logit of
    caption j is scaled by w_j, in both directions. ``rows`` restricts the queries to this process's
    pairs (local loss); the mean over all processes' rows equals the full loss.
    """
    rows = slice(None) if rows is None else rows
    logits_i2t = image_feat[rows] @ text_feat.t() / temp  # query images x all captions
    logits_t2i = text_feat[rows] @ image_feat.t() / temp  # query captions x all images
    if caption_weights is not None:
        logits_i2t = logits_i2t * caption_weights[None, :]
        logits_t2i = logits_t2i * caption_weights[rows, None]
    logits_i2t, logits_t2i = _at_least_fp32(logits_i2t), _at_least_fp32(logits_t2i)
    targets = soft_targets(image_ids[rows], image_ids, eps, logits_i2t.dtype)
    loss_i2t = -(F.log_softmax(logits_i2t, dim=1) * targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(logits_t2i, dim=1) * targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2
