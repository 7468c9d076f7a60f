"""Image pipelines: a train augmentation per ``dataset_kind`` (fisvl-method.md §5) and the bicubic test
resize, all ending in CLIP normalisation."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torchvision.transforms import InterpolationMode, v2

from .gridmask import GridMask
from .randaugment import RandomAugment

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # odd, covers 3 sigma of the largest sigma


def _to_tensor() -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def _crop_flip(res: int) -> list[Callable]:
    return [v2.RandomResizedCrop(res, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip()]


def train_transform(config: dict[str, Any]) -> Callable:
    """The train pipeline of ``config["dataset_kind"]``.

    ``re`` is X-VLM's crop + flip; ``re_rsitmd`` adds RandomAugment(2, 7); ``re_rsicd`` (also UCM and
    Sydney) adds a Gaussian blur before it and random erasing and GridMask on the [0, 1] tensor after it.
    """
    kind, res = config["dataset_kind"], config["image_res"]
    normalise = v2.Normalize(CLIP_MEAN, CLIP_STD)
    if kind == "re":
        steps = [*_crop_flip(res), *_to_tensor()]
    elif kind == "re_rsitmd":
        steps = [*_crop_flip(res), RandomAugment(2, 7), *_to_tensor()]
    elif kind in ("re_rsicd", "re_ucm", "re_sydney"):
        steps = [*_crop_flip(res),
                 v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA)], p=0.5),
                 RandomAugment(2, 7),
                 *_to_tensor(),
                 v2.RandomErasing(p=0.5, scale=(0.10, 0.20)),
                 v2.RandomApply([GridMask()], p=0.5)]
    else:
        raise ValueError(f"unknown dataset_kind {kind!r}; expected re, re_rsitmd, re_rsicd, re_ucm or re_sydney")
    return v2.Compose([*steps, normalise])


def test_transform(config: dict[str, Any]) -> Callable:
    res = config["image_res"]
    return v2.Compose([v2.Resize((res, res), interpolation=InterpolationMode.BICUBIC), *_to_tensor(),
                       v2.Normalize(CLIP_MEAN, CLIP_STD)])


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resnet_train_transform(resize: int, crop: int, degrees: tuple[float, float]) -> Callable:
    """AMFMN's train pipeline: square resize, a random rotation in ``degrees`` (AMFMN's ``RandomRotation(0, 90)``
    meant (0, 90) but rotated by 0 degrees; GaLR's fix is used), a random ``crop``, ImageNet normalisation."""
    return v2.Compose([v2.Resize((resize, resize)), v2.RandomRotation(list(degrees)), v2.RandomCrop(crop),
                       *_to_tensor(), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def resnet_eval_transform(res: int) -> Callable:
    """AMFMN's test pipeline: square resize to ``res``, ImageNet normalisation."""
    return v2.Compose([v2.Resize((res, res)), *_to_tensor(), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
