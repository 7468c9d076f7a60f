"""The evaluation protocol: embed a split once (images and texts sharded over processes), score all pairs
with the model's ``similarity``, compute R@K."""
from __future__ import annotations

import time
from typing import Any

import torch

from dataset import EvalSplit
from utils.distributed import gather_uneven, shard_range
from utils.metrics import retrieval_metrics

from .base import RetrievalModel
from .inference import embed_image_batches, embed_texts, similarity_matrix


def embed_split(model: RetrievalModel, split: EvalSplit, config: dict[str, Any],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every image and every caption of ``split``, gathered on every process."""
    images = embed_image_batches(model, (batch for batch, _ in split.image_loader), device, config["precision"])
    mine = shard_range(len(split.annotations.texts))
    texts = embed_texts(model, split.annotations.texts[mine.start:mine.stop], config["batch_size_test_text"],
                        device, config["precision"])
    # a process with an empty shard still gathers rows of the embedding width
    images, texts = (t if t.numel() else t.new_empty(0, config["embed_dim"]) for t in (images, texts))
    return gather_uneven(images), gather_uneven(texts)


def evaluate_split(model: RetrievalModel, split: EvalSplit, config: dict[str, Any],
                   device: torch.device) -> dict[str, float]:
    """R@1/5/10 both ways and ``r_mean`` of ``model`` on ``split``; adds ``eval_time_s``."""
    start = time.time()
    image_emb, text_emb = embed_split(model, split, config, device)
    metrics = retrieval_metrics(similarity_matrix(model, image_emb, text_emb), split.annotations.img2txt,
                                split.annotations.txt2img)
    metrics["eval_time_s"] = time.time() - start
    return metrics
