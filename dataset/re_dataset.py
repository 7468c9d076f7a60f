"""Datasets for retrieval training (one item per caption) and evaluation (images; texts are tokenised in chunks),
with each image's segmentation mask transformed jointly with it when masks are configured."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .annotations import DataError, EvalAnnotations, TrainAnnotations
from .captions import delete_words
from .images import ImageDecoding, load_rgb
from .masks import MaskError, load_mask


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch, random and numpy for one sample, restoring the caller's generators afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _load(path: str, where: str, decoding: ImageDecoding | None):
    try:
        return load_rgb(path, decoding)
    except Exception as err:  # Pillow raises several types for corrupt files
        raise DataError(f"{where}: cannot decode image {path}: {err}") from err


def _load_mask(path: str, image: Image.Image, image_path: str, where: str) -> tv_tensors.Mask:
    try:
        return tv_tensors.Mask(torch.from_numpy(load_mask(path, image_path, image.size)))
    except MaskError as err:
        raise DataError(f"{where}: {err}") from err


def _joint(transform: Callable, image: Image.Image, mask: tv_tensors.Mask, where: str) -> tuple[Any, torch.Tensor]:
    """``transform`` applied to the image and its mask together (v2 pipelines move both alike): the image's
    tensor and the mask as a LongTensor (height, width) of class indices, 255 = ignore."""
    try:
        pixels, out = transform(image, mask)
    except TypeError as err:  # a step that takes one input (RandomAugment, GridMask)
        raise DataError(f"{where}: the image transform cannot transform a segmentation mask with its image "
                        f"({err}); a model that reads 'mask' needs a torchvision.transforms.v2 pipeline of steps "
                        f"that take (image, mask)") from err
    if not isinstance(out, tv_tensors.Mask) or out.shape != pixels.shape[-2:]:
        raise DataError(f"{where}: the image transform turned a mask into {type(out).__name__} of shape "
                        f"{tuple(out.shape)} for an image of shape {tuple(pixels.shape)}; it must keep a "
                        f"tv_tensors.Mask of the image's height and width")
    return pixels, out.as_subclass(torch.Tensor).long()


class RetrievalTrainDataset(Dataset):
    """Items are ``(index, sample_seed)`` keys from :class:`SeededShardSampler`, or plain indices.

    An item is a dict: ``image``, ``caption`` and the requested ``fields`` (:data:`SAMPLE_FIELDS`, and ``mask``:
    the image's segmentation mask through the same transform, a LongTensor (height, width) of class indices,
    255 = ignore). The image augmentation and the caption's random word deletion both draw from generators
    seeded by the sample seed, so an item is a pure function of its key; a mask does not change the image.
    """

    def __init__(self, annotations: TrainAnnotations, transform: Callable, deletion_rate: float = 0.0,
                 decoding: ImageDecoding | None = None, fields: Iterable[str] = ("image_idx",)) -> None:
        if not 0.0 <= deletion_rate <= 1.0:
            raise ValueError(f"deletion_rate must be in [0, 1], got {deletion_rate}")
        fields = tuple(fields)
        known = [*SAMPLE_FIELDS, "mask"]
        unknown = [f for f in fields if f not in known]
        if unknown:
            raise DataError(f"no data provides the sample field(s) {unknown}; known: {sorted(known)}")
        if "mask" in fields and annotations.mask_paths is None:
            raise DataError("the sample field 'mask' needs segmentation masks, and the config sets no mask_root "
                            "(the folder of RSITMD-SS masks, mask_<image stem>.png)")
        self.ann = annotations
        self.transform = transform
        self.deletion_rate = deletion_rate
        self.decoding = decoding
        self.with_mask = "mask" in fields
        self.fields = tuple(f for f in fields if f != "mask")

    def __len__(self) -> int:
        return len(self.ann.captions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        where, path = f"train caption {index}", self.ann.image_paths[index]
        image = _load(path, where, self.decoding)
        extra: dict[str, Any] = {}
        mask = _load_mask(self.ann.mask_paths[index], image, path, where) if self.with_mask else None
        with seeded_rng(seed):
            if mask is None:
                pixels = self.transform(image)
            else:
                pixels, extra["mask"] = _joint(self.transform, image, mask, where)
            caption = delete_words(self.ann.captions[index], self.deletion_rate)  # after the image: same crops
        return {"image": pixels, "caption": caption, **extra,
                **{name: SAMPLE_FIELDS[name](self.ann, index) for name in self.fields}}


# Per-sample fields the training data can carry, by name: what models and losses may declare.
SAMPLE_FIELDS: dict[str, Callable[[TrainAnnotations, int], Any]] = {
    "image_idx": lambda ann, i: ann.image_index[i],
    "label": lambda ann, i: ann.labels[i],
    "caption_weight": lambda ann, i: ann.caption_weights[i],
    "caption_idx": lambda ann, i: i,
}


class TrainCollator:
    """Stacks images, runs the model's text processor on the captions (``text``) and stacks every other
    field into a tensor (floats as float32)."""

    def __init__(self, text_processor: Callable[[list[str]], dict[str, torch.Tensor]]) -> None:
        self.text_processor = text_processor

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"images": torch.stack([item["image"] for item in items]),
                                 "text": self.text_processor([item["caption"] for item in items])}
        for name in items[0].keys() - {"image", "caption"}:
            values = [item[name] for item in items]
            batch[name] = (torch.stack(values) if isinstance(values[0], torch.Tensor) else
                           torch.tensor(values, dtype=torch.float32 if isinstance(values[0], float) else None))
        return batch


class EvalImageDataset(Dataset):
    """The images of one val/test split (a shard of them when ``indices`` is given), with their indices: items
    are ``(image, index)``, or ``(image, index, mask)`` when the annotations have masks (the mask through the
    same transform, a LongTensor (height, width) of class indices, 255 = ignore)."""

    def __init__(self, annotations: EvalAnnotations, transform: Callable, indices: range | None = None,
                 decoding: ImageDecoding | None = None) -> None:
        self.ann = annotations
        self.transform = transform
        self.indices = indices if indices is not None else range(len(annotations.image_paths))
        self.decoding = decoding

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        index = self.indices[i]
        where, path = f"eval image {index}", self.ann.image_paths[index]
        image = _load(path, where, self.decoding)
        if self.ann.mask_paths is None:
            return self.transform(image), index
        pixels, mask = _joint(self.transform, image, _load_mask(self.ann.mask_paths[index], image, path, where), where)
        return pixels, index, mask
