"""Finding and decoding images (.tif, .jpg, .png, anything Pillow reads) with errors that name the file."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image


def candidate_paths(image_root: str, image: str) -> list[str]:
    """``image_root/image``, then ``image_root/basename(image)`` (public JSONs carry train/val/test prefixes
    that flat image folders do not have)."""
    first = os.path.join(image_root, image)
    second = os.path.join(image_root, os.path.basename(image))
    return [first] if first == second else [first, second]


def resolve_image_path(image_root: str, image: str) -> str | None:
    """The first existing candidate path, or ``None``."""
    return next((p for p in candidate_paths(image_root, image) if os.path.isfile(p)), None)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) and convert to 3-channel RGB."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")
