"""Segmentation masks in the RSITMD-SS format (SIRS): file names, the value encoding, reading with checks, and
the class statistics of a set of masks.

One 8-bit grayscale PNG per image, named ``mask_<image name with its extension replaced by .png>``; a pixel
stores 10 x its class index (15 classes), and 255 marks pixels to ignore. Every problem names the mask file.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from .images import candidate_paths, image_size

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("Background", "Plane", "Boat", "StorageTank", "Pond", "River", "Beach", "Playground",
                                "SwimmingPool", "Court", "BaseballField", "Center", "Church", "Stadium", "Bridge")
NUM_CLASSES = len(CLASS_NAMES)
VALUE_STEP = 10  # stored value = VALUE_STEP x class index
IGNORE_INDEX = 255  # stored and decoded as is: the loss skips these pixels

_VALID = np.zeros(256, dtype=bool)
_VALID[[VALUE_STEP * c for c in range(NUM_CLASSES)] + [IGNORE_INDEX]] = True
_CLASS_OF_VALUE = np.where(_VALID, np.arange(256) // VALUE_STEP, 0).astype(np.uint8)
_CLASS_OF_VALUE[IGNORE_INDEX] = IGNORE_INDEX


class MaskError(ValueError):
    """A mask is missing, unreadable, wrongly encoded or of another size than its image; the message names it."""


def mask_name(image: str) -> str:
    """The RSITMD-SS name of ``image``'s mask, in the image's folder: ``test/airport_4691.tif`` ->
    ``test/mask_airport_4691.png``."""
    folder, name = os.path.split(image)
    return os.path.join(folder, f"mask_{os.path.splitext(name)[0]}.png")


def mask_candidates(mask_root: str, image: str, mask: str | None = None) -> list[str]:
    """Where ``image``'s mask may be: ``mask_root/<mask>`` when an entry names it, else the RSITMD-SS name;
    each also by its base name (a flat mask folder for JSONs with ``train/``... prefixes), as images are."""
    return candidate_paths(mask_root, mask if mask is not None else mask_name(image))


def resolve_mask_path(mask_root: str, image: str, mask: str | None = None) -> str | None:
    """The first existing candidate of :func:`mask_candidates`, or ``None``."""
    return next((p for p in mask_candidates(mask_root, image, mask) if os.path.isfile(p)), None)


def _stored_values(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The stored values (height, width) and their 256-bin histogram, checked against the encoding."""
    try:
        with Image.open(path) as img:
            if img.mode != "L":
                raise MaskError(f"mask {path}: expected an 8-bit grayscale image (mode L), got mode {img.mode}")
            values = np.asarray(img)
    except FileNotFoundError:
        raise MaskError(f"mask not found: {path}") from None
    except MaskError:
        raise
    except Exception as err:  # Pillow raises several types for corrupt files
        raise MaskError(f"cannot read mask {path}: {err}") from err
    counts = np.bincount(values.ravel(), minlength=256)
    bad = np.flatnonzero((counts > 0) & ~_VALID)
    if bad.size:
        listed = ", ".join(f"{v} ({counts[v]} px)" for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise MaskError(f"mask {path}: values {listed} are not {VALUE_STEP} x a class index 0..{NUM_CLASSES - 1} "
                        f"or {IGNORE_INDEX} (ignore)")
    return values, counts


def _check_size(path: str, mask_size: tuple[int, int], image_path: str | None,
                expected: tuple[int, int] | None) -> None:
    if expected is not None and mask_size != expected:
        raise MaskError(f"mask {path} is {mask_size[0]}x{mask_size[1]} pixels but its image {image_path} is "
                        f"{expected[0]}x{expected[1]}")


def load_mask(path: str, image_path: str | None = None, image_wh: tuple[int, int] | None = None) -> np.ndarray:
    """Class indices (uint8, height x width; 255 = ignore) of the mask at ``path``; with ``image_wh`` (width,
    height), a mask of another size than its image ``image_path`` is an error too."""
    values, _ = _stored_values(path)
    _check_size(path, (values.shape[1], values.shape[0]), image_path, image_wh)
    return _CLASS_OF_VALUE[values]


def _header_size(image_path: str) -> tuple[int, int] | None:
    """The image's (width, height), or ``None`` when it does not open: the image check reports that file."""
    try:
        return image_size(image_path)
    except Exception:  # Pillow and rasterio raise several types for corrupt files
        return None


def mask_class_counts(path: str, image_path: str | None = None) -> np.ndarray:
    """Pixels of each class (``NUM_CLASSES`` int64; ignored pixels not counted) in the mask at ``path``,
    checked; with ``image_path`` its size is checked against that image's (read from the file's header)."""
    values, counts = _stored_values(path)
    if image_path is not None:
        _check_size(path, (values.shape[1], values.shape[0]), image_path, _header_size(image_path))
    return counts[:VALUE_STEP * NUM_CLASSES:VALUE_STEP]


def mask_problem(path: str, image_path: str | None = None) -> str | None:
    """Why the mask at ``path`` is unusable (for its image ``image_path``, when given), or ``None``: the one
    message every mask check gives."""
    try:
        mask_class_counts(path, image_path)
    except MaskError as err:
        return str(err)
    return None


def count_mask_classes(paths: Iterable[str], workers: int = 0) -> np.ndarray:
    """Per-class pixel counts of every mask in ``paths``, shape (masks, ``NUM_CLASSES``), read by ``workers``
    threads (0 or 1: this one; Pillow decodes without the interpreter lock)."""
    paths = list(paths)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            rows = list(pool.map(mask_class_counts, paths))
    else:
        rows = [mask_class_counts(path) for path in paths]
    return np.stack(rows) if rows else np.zeros((0, NUM_CLASSES), dtype=np.int64)


def class_weights(pixels: np.ndarray) -> np.ndarray:
    """SIRS's weight of class c: max_k(pixels_k) / pixels_c; a class with no pixel gets 0 (it cannot occur
    in a training target, and an infinite weight would poison the loss)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    return np.divide(pixels.max(), pixels, out=np.zeros_like(pixels), where=pixels > 0)


def mask_class_weights(paths: Iterable[str], workers: int = 0) -> torch.Tensor:
    """The pixel cross-entropy's class weights (float32, ``NUM_CLASSES``) over the masks of ``paths`` (each
    distinct file counted once, ignored pixels left out), by :func:`class_weights`. Counted once at start-up
    and logged with the class names; a class with no pixel in any mask gets weight 0, with a warning."""
    unique = list(dict.fromkeys(paths))
    pixels = count_mask_classes(unique, workers).sum(axis=0)
    weights = class_weights(pixels)
    log.info("segmentation class weights over %d training masks: %s", len(unique),
             ", ".join(f"{name} {w:.3g} ({n} px)" for name, w, n in zip(CLASS_NAMES, weights, pixels)))
    absent = [name for name, n in zip(CLASS_NAMES, pixels) if n == 0]
    if absent:
        log.warning("no training mask has a pixel of class(es) %s: their weight is 0", ", ".join(absent))
    return torch.tensor(weights, dtype=torch.float32)


def class_shares(counts: np.ndarray) -> dict[str, dict[str, float]]:
    """``{class: {"pixels": share of all counted pixels, "images": share of masks that contain it}}`` in
    percent, from the rows of :func:`count_mask_classes`."""
    counts = np.asarray(counts).reshape(-1, NUM_CLASSES)
    pixels = 100 * counts.sum(axis=0) / max(int(counts.sum()), 1)
    images = 100 * (counts > 0).sum(axis=0) / max(len(counts), 1)
    return {name: {"pixels": round(float(p), 3), "images": round(float(i), 2)}
            for name, p, i in zip(CLASS_NAMES, pixels, images)}
