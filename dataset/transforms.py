"""Image pipelines: a train augmentation per ``dataset_kind`` (fisvl-method.md §5) and the bicubic test
resize, all ending in CLIP normalisation; AMFMN's ResNet pipelines.

Called with ``(image, tv_tensors.Mask)`` the v2 pipelines transform a segmentation mask jointly with the image:
geometric steps move it (nearest neighbour), photometric ones, ``ToDtype(float32)`` and ``Normalize`` leave it
as it is. Two kinds of step need care, and the pipelines here take it: resizing (:class:`Resize`,
:class:`RandomResizedCrop`) and the fill of a rotation (:func:`mask_fill`).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from .gridmask import GridMask
from .masks import IGNORE_INDEX
from .randaugment import RandomAugment

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # odd, covers 3 sigma of the largest sigma


class Resize(v2.Resize):
    """``v2.Resize`` that resizes masks by NEAREST_EXACT: v2 resizes them by NEAREST, which takes output pixel i
    from input pixel floor(i x in / out), up to a pixel up and left of where the image's bilinear or bicubic
    resampling (pixel centres) takes it; NEAREST_EXACT uses pixel centres too. Images are resized as before."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, self.size, interpolation=InterpolationMode.NEAREST_EXACT, max_size=self.max_size)
        return super().transform(inpt, params)


class RandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` that resizes a mask's crop by NEAREST_EXACT, as :class:`Resize` does."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            crop = F.crop(inpt, params["top"], params["left"], params["height"], params["width"])
            return F.resize(crop, self.size, interpolation=InterpolationMode.NEAREST_EXACT)
        return super().transform(inpt, params)


def mask_fill(image_fill: float = 0.0) -> dict[Any, float]:
    """``fill`` of a geometric v2 step (rotation, affine, padding): ``image_fill`` for the image, 255 (ignore)
    for a mask, whose default fill 0 would label the new corners background. A fresh dict each time: v2
    converts it in place."""
    return {tv_tensors.Mask: IGNORE_INDEX, "others": image_fill}


def _to_tensor() -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def _crop_flip(res: int) -> list[Callable]:
    return [RandomResizedCrop(res, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
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
    return v2.Compose([Resize((res, res), interpolation=InterpolationMode.BICUBIC), *_to_tensor(),
                       v2.Normalize(CLIP_MEAN, CLIP_STD)])


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resnet_train_transform(resize: int, crop: int, degrees: tuple[float, float]) -> Callable:
    """AMFMN's train pipeline: square resize, a random rotation in ``degrees`` (AMFMN's ``RandomRotation(0, 90)``
    meant (0, 90) but rotated by 0 degrees; GaLR's fix is used), a random ``crop``, ImageNet normalisation.
    A mask's corners left by the rotation are 255 (ignore)."""
    return v2.Compose([Resize((resize, resize)), v2.RandomRotation(list(degrees), fill=mask_fill()),
                       v2.RandomCrop(crop), *_to_tensor(), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def resnet_eval_transform(res: int) -> Callable:
    """AMFMN's test pipeline: square resize to ``res``, ImageNet normalisation."""
    return v2.Compose([Resize((res, res)), *_to_tensor(), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
