"""Scene labels of images from their file names (data-and-protocol.md §4); never predicted.

``prefix``: ``denseresidential_12.tif`` -> ``denseresidential``; a name without a prefix (RSICD's
``00017.jpg``) is a scene of its own. ``ucm``: UCM-captions names are numbers whose blocks of 100 are
the 21 UC Merced classes in alphabetical order. ``singleton``: every image its own scene (Sydney, whose
names carry no class). Label ids follow the order of first appearance in train, then val, then test.
"""
from __future__ import annotations

import os

from ..annotations import DataError, scene_label_name

UCM_CLASSES = ("agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
               "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
               "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
               "sparseresidential", "storagetanks", "tenniscourt")
LABEL_SCHEMES = ("prefix", "ucm", "singleton")


def ucm_label_name(name: str) -> str:
    stem = os.path.splitext(os.path.basename(name))[0]
    if not stem.isdigit() or not 1 <= int(stem) <= 100 * len(UCM_CLASSES):
        raise DataError(f"image {name!r}: the 'ucm' label scheme needs names 1 to {100 * len(UCM_CLASSES)} "
                        f"(e.g. 1001.tif)")
    return UCM_CLASSES[(int(stem) - 1) // 100]


def label_name(name: str, scheme: str) -> str:
    if scheme == "prefix":
        return scene_label_name(name)
    if scheme == "ucm":
        return ucm_label_name(name)
    if scheme == "singleton":
        return os.path.basename(name)
    raise ValueError(f"label scheme must be one of {', '.join(LABEL_SCHEMES)}, got {scheme!r}")


def is_singleton(name: str, label: str) -> bool:
    """Whether the image got a scene of its own (its label name is its file name)."""
    return label == os.path.basename(name)
