"""The evaluation protocol: embed a split once (images and texts sharded over processes), score all pairs
with the model's ``similarity``, optionally re-rank the scores, compute R@K; for a model that also segments,
on a split with masks, the segmentation metrics too."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from dataset import EvalSplit
from utils.config import ConfigError, Key, register_keys
from utils.distributed import gather_uneven, shard_range
from utils.metrics import retrieval_metrics
from utils.precision import autocast
from utils.rerank import multivariate_rerank
from utils.seg_metrics import SegmentationMeter

from .base import RetrievalModel
from .inference import embed_image_batches, embed_texts, similarity_matrix

log = logging.getLogger(__name__)

register_keys("Evaluation: re-ranking (every model)", {
    "rerank": Key((str,), "none", "test-time re-rank of the val/test scores before R@K: none, or galr_mr = GaLR's "
                  "multivariate re-rank (utils/rerank.py)", choices=("none", "galr_mr")),
    "rerank_k": Key((int,), 30, "galr_mr: each query re-scores its max(10, rerank_k) best candidates (GaLR's K)"),
    "rerank_wp1": Key((float,), 0.3, "galr_mr: weight of p1, the pair's share of the candidate's score mass"),
    "rerank_wp2": Key((float,), 1.1, "galr_mr: weight of p3, the candidate's rank in the reverse direction"),
})


def check_rerank(config: dict[str, Any], source: str) -> None:
    """Fail before any data or model is built on a re-rank setting that evaluation would refuse."""
    if config["rerank"] != "none" and config["rerank_k"] < 1:
        raise ConfigError(f"{source}: key 'rerank_k': expected a number of candidates >= 1, got {config['rerank_k']}")


def embed_split(model: RetrievalModel, split: EvalSplit, config: dict[str, Any],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every image and every caption of ``split``, gathered on every process."""
    # batches are (images, indices), or (images, indices, masks) with mask_root
    images = embed_image_batches(model, (batch[0] for batch in split.image_loader), device, config["precision"])
    mine = shard_range(len(split.annotations.texts))
    texts = embed_texts(model, split.annotations.texts[mine.start:mine.stop], config["batch_size_test_text"],
                        device, config["precision"])
    # a process with an empty shard still gathers rows of the embedding width
    images, texts = (t if t.numel() else t.new_empty(0, config["embed_dim"]) for t in (images, texts))
    return gather_uneven(images), gather_uneven(texts)


def score_split(model: RetrievalModel, split: EvalSplit, config: dict[str, Any],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``[n_images, n_texts]`` scores of every pair of ``split`` (after the config's ``rerank``), and the
    scores text -> image ranks when a re-rank gives them apart (else ``None``); on every process."""
    image_emb, text_emb = embed_split(model, split, config, device)
    sims = similarity_matrix(model, image_emb, text_emb)
    if config["rerank"] != "galr_mr":
        return sims, None
    log.info("%s: scores re-ranked by GaLR's multivariate re-rank (k %d, wp1 %g, wp2 %g)", split.name,
             config["rerank_k"], config["rerank_wp1"], config["rerank_wp2"])
    return multivariate_rerank(sims, config["rerank_k"], config["rerank_wp1"], config["rerank_wp2"])


def evaluate_scores(model: RetrievalModel, split: EvalSplit, config: dict[str, Any],
                    device: torch.device) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor | None]]:
    """R@1/5/10 both ways and ``r_mean`` of ``model`` on ``split`` (plus ``eval_time_s``, and the segmentation
    metrics of a model that segments on a split with masks), and the scores they were computed from."""
    start = time.time()
    sims, t2i_sims = score_split(model, split, config, device)
    metrics = retrieval_metrics(sims, split.annotations.img2txt, split.annotations.txt2img, t2i_sims)
    if model.seg_classes and split.annotations.mask_paths is not None:
        metrics.update(segmentation_metrics(model, split, config, device))
    metrics["eval_time_s"] = time.time() - start
    return metrics, (sims, t2i_sims)


def evaluate_split(model: RetrievalModel, split: EvalSplit, config: dict[str, Any],
                   device: torch.device) -> dict[str, float]:
    """The metrics of :func:`evaluate_scores` alone."""
    return evaluate_scores(model, split, config, device)[0]


@torch.no_grad()
def segmentation_metrics(model: RetrievalModel, split: EvalSplit, config: dict[str, Any],
                         device: torch.device) -> dict[str, float]:
    """Pixel accuracy, mean class accuracy, mIoU and FWIoU (``seg_*``, in %) of the model's segmentation of the
    split's images against their masks: one confusion matrix summed over batches and processes."""
    meter = SegmentationMeter(model.seg_classes, device)
    model.eval()
    with autocast(config["precision"], device):
        for images, _, masks in split.image_loader:
            meter.update(model.segment(images.to(device, non_blocking=True)), masks.to(device, non_blocking=True))
    return meter.compute()
