"""What a search index holds: the image files under folders or globs, and the items they become.

A small image is one item. A large scene (a GeoTIFF or JPEG2000 file, ``SCENE_SUFFIXES``, wider or higher
than the tile size) is cut into ``tile x tile`` windows every ``stride`` pixels, and each window is one
item, read alone with rasterio (the scene never has to fit in memory). The last row and column of windows
are aligned to the scene's edge, so every pixel is covered and every tile has the full size. An item keeps
its file's size and modification time, which tell a later run whether the file changed, and, when the file
is geo-referenced, its CRS and map bounds.
"""
from __future__ import annotations

import glob
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from .images import ImageDecoding, Stretch, load_rgb, load_rgb_window, scene_stretch

SCENE_SUFFIXES = frozenset({".tif", ".tiff", ".jp2", ".j2k"})
Window = tuple[int, int, int, int]  # col_off, row_off, width, height
THUMB = 160  # pixels, the longer side of a preview


@dataclass(frozen=True)
class Item:
    """One searchable image: a whole file (``window`` None) or one tile of a scene."""

    path: str
    size: int
    mtime_ns: int
    window: Window | None = None
    crs: str | None = None
    bounds: tuple[float, float, float, float] | None = None  # left, bottom, right, top in the CRS's units
    stretch: Stretch | None = None  # a tile's percentile limits per band: its scene's, shared by all its tiles

    @property
    def key(self) -> tuple[str, Window | None]:
        return self.path, self.window

    def describe(self) -> dict[str, Any]:
        """What a search result shows of the item (its path, window, CRS and bounds), as JSON values."""
        return {"path": self.path, "window": None if self.window is None else list(self.window), "crs": self.crs,
                "bounds": None if self.bounds is None else list(self.bounds)}

    def record(self) -> dict[str, Any]:
        """As a JSON object (one line of an index's metadata)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Item:
        window, bounds, stretch = record.get("window"), record.get("bounds"), record.get("stretch")
        return cls(record["path"], record["size"], record["mtime_ns"], None if window is None else tuple(window),
                   record.get("crs"), None if bounds is None else tuple(bounds),
                   None if stretch is None else tuple(map(tuple, stretch)))


def image_suffixes() -> frozenset[str]:
    """Every suffix Pillow reads, and the scene formats rasterio reads."""
    return frozenset(Image.registered_extensions()) | SCENE_SUFFIXES


def find_images(sources: Sequence[str]) -> list[str]:
    """Absolute paths of the image files in ``sources`` (files, folders searched recursively, or globs with
    ``**``), sorted and without duplicates. A source that matches nothing is an error naming it."""
    suffixes = image_suffixes()
    found: set[str] = set()
    for source in sources:
        if os.path.isdir(source):
            matches = [str(p) for p in Path(source).rglob("*") if p.suffix.lower() in suffixes and p.is_file()]
        elif os.path.isfile(source):
            matches = [source]
        else:
            matches = [p for p in glob.glob(source, recursive=True)
                       if os.path.isfile(p) and Path(p).suffix.lower() in suffixes]
            if not matches:
                raise FileNotFoundError(f"--images {source}: no such file or folder, and no image matches it")
        found.update(os.path.abspath(p) for p in matches)
    return sorted(found)


def tile_offsets(size: int, tile: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride`` pixels, the last one aligned to the edge."""
    if size <= tile:
        return [0]
    offsets = list(range(0, size - tile + 1, stride))
    return offsets if offsets[-1] + tile == size else [*offsets, size - tile]


def plan_file(path: str, tile: int, stride: int, decoding: ImageDecoding | None = None) -> list[Item]:
    """The items of one file: its tiles when it is a scene larger than ``tile`` (``tile`` 0: never), else
    itself. A scene file that rasterio cannot open stays one whole item, so decoding reports why. Under a
    ``percentile`` ``decoding`` the tiles carry the scene's percentiles (``scene_stretch``)."""
    stat = os.stat(path)
    whole = Item(path, stat.st_size, stat.st_mtime_ns)
    if Path(path).suffix.lower() not in SCENE_SUFFIXES:
        return [whole]
    import rasterio  # only for scenes, as in dataset.images
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    from rasterio.windows import Window as RasterWindow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            source = rasterio.open(path)
        except RasterioIOError:
            return [whole]
        with source:
            crs = None if source.crs is None else source.crs.to_string()

            def item(window: Window | None, stretch: Stretch | None = None) -> Item:
                bounds = None if crs is None else tuple(
                    source.bounds if window is None else source.window_bounds(RasterWindow(*window)))
                return Item(path, stat.st_size, stat.st_mtime_ns, window, crs, bounds, stretch)

            width, height = source.width, source.height
            if tile <= 0 or (width <= tile and height <= tile):
                return [item(None)]
            stretch = scene_stretch(path, ImageDecoding() if decoding is None else decoding)
            return [item((col, row, min(tile, width), min(tile, height)), stretch)
                    for row in tile_offsets(height, tile, stride) for col in tile_offsets(width, tile, stride)]


def read_item(item: Item, decoding: ImageDecoding) -> Image.Image:
    """The item's pixels as 8-bit RGB: the whole file by ``load_rgb``, a tile by ``load_rgb_window``."""
    if item.window is None:
        return load_rgb(item.path, decoding)
    return load_rgb_window(item.path, item.window, decoding, item.stretch)


def thumbnail(image: Image.Image, size: int = THUMB) -> Image.Image:
    """The image scaled (up or down) to fit ``size`` pixels: the result pages' and the web page's previews."""
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


class ItemImages(torch.utils.data.Dataset):
    """Items decoded and transformed for a ``DataLoader``; a failure comes back as its message (naming the
    file and window) instead of a tensor, so one bad file never stops the others."""

    def __init__(self, items: Sequence[Item], decoding: ImageDecoding, transform: Callable) -> None:
        self.items, self.decoding, self.transform = items, decoding, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[index]
        try:
            return index, self.transform(read_item(item, self.decoding)), None
        except Exception as err:  # Pillow, rasterio and GDAL raise several types for corrupt files
            where = "" if item.window is None else f" (window {list(item.window)})"
            return index, None, f"cannot decode image {item.path}{where}: {err}"


def collate_items(batch: list[tuple[int, torch.Tensor | None, str | None]]
                  ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Positions and stacked tensors of the items that decoded, and (position, message) of those that did not."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    return ([i for i, _ in good], torch.stack([x for _, x in good]) if good else None,
            [(i, err) for i, _, err in batch if err is not None])
