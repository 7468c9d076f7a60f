"""Embed a split once (images and texts sharded over processes), score all pairs, compute R@K."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from dataset import EvalSplit

from .distributed import gather_uneven, shard_range
from .metrics import retrieval_metrics
from .precision import autocast


@torch.no_grad()
def embed_split(model: nn.Module, split: EvalSplit, tokenizer: Any, config: dict[str, Any],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised embeddings of every image and every caption of ``split``, gathered on every process."""
    model.eval()
    image_feats = []
    with autocast(config["precision"], device):
        for images, _ in split.image_loader:
            image_feats.append(model.encode_image(images.to(device, non_blocking=True)).float())
        texts = split.annotations.texts
        mine = shard_range(len(texts))
        text_feats = []
        step = config["batch_size_test_text"]
        for start in range(mine.start, mine.stop, step):
            chunk = texts[start:min(start + step, mine.stop)]
            tokens = tokenizer(chunk, padding="longest", truncation=True, max_length=config["max_tokens"],
                               return_tensors="pt").to(device)
            text_feats.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float())
    width = config["embed_dim"]
    local_images = torch.cat(image_feats) if image_feats else torch.empty(0, width, device=device)
    local_texts = torch.cat(text_feats) if text_feats else torch.empty(0, width, device=device)
    return gather_uneven(local_images), gather_uneven(local_texts)


def evaluate_split(model: nn.Module, split: EvalSplit, tokenizer: Any, config: dict[str, Any],
                   device: torch.device) -> dict[str, float]:
    """R@1/5/10 both ways and ``r_mean`` of ``model`` on ``split``; adds ``eval_time_s``."""
    start = time.time()
    image_feats, text_feats = embed_split(model, split, tokenizer, config, device)
    metrics = retrieval_metrics(image_feats @ text_feats.t(), split.annotations.img2txt, split.annotations.txt2img)
    metrics["eval_time_s"] = time.time() - start
    return metrics
