"""Image pipelines: a train augmentation per ``dataset_kind`` and the bicubic test resize, CLIP normalisation."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision.transforms import InterpolationMode, v2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_normalised_tensor() -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)]


def train_transform(config: dict[str, Any]) -> Callable:
    """X-VLM's retrieval pipeline (``re``): random resized crop (scale 0.5-1, bicubic) and horizontal flip."""
    res = config["image_res"]
    return v2.Compose([
        v2.RandomResizedCrop(res, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
        *_to_normalised_tensor(),
    ])


def test_transform(config: dict[str, Any]) -> Callable:
    res = config["image_res"]
    return v2.Compose([v2.Resize((res, res), interpolation=InterpolationMode.BICUBIC), *_to_normalised_tensor()])
