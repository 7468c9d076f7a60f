"""Generate the procedural demo dataset (images/, their segmentation masks in masks/, the split JSONs and a
vocabulary) into a folder, and optionally draw a sheet of sample images or write a geo-referenced scene.

    python tools/make_demo_data.py --root .cache/demo --montage assets/demo_samples.png
    python tools/make_demo_data.py --root .cache/demo --scene .cache/demo/scene.tif   # for tools/search.py
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.synthetic import SCENE_CLASSES, DemoSpec, ensure_demo_dataset  # noqa: E402


def draw_montage(root: Path, output: Path, tile: int = 128) -> None:
    """One test image per scene class, upscaled without smoothing, five per row."""
    entries = json.loads((root / "demo_test.json").read_text(encoding="utf-8"))
    first = {}
    for entry in entries:
        first.setdefault(entry["label_name"], entry)
    picks = [first[name] for name in SCENE_CLASSES if name in first]
    columns = 5
    sheet = Image.new("RGB", (tile * columns, tile * ((len(picks) + columns - 1) // columns)), "white")
    for i, entry in enumerate(picks):
        with Image.open(root / "images" / entry["image"]) as img:
            sheet.paste(img.convert("RGB").resize((tile, tile), Image.NEAREST), ((i % columns) * tile, (i // columns) * tile))
    output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(output)
    for entry in picks:
        print(f"{entry['image']}: {entry['caption'][0]}")


def round_robin_test_entries(root: Path, count: int) -> list[dict]:
    """``count`` test entries taking the scene classes in turn (the split lists them class by class)."""
    by_class: dict[str, list[dict]] = {}
    for entry in json.loads((root / "demo_test.json").read_text(encoding="utf-8")):
        by_class.setdefault(entry["label_name"], []).append(entry)
    turns = [entries[i] for i in range(max(map(len, by_class.values()))) for entries in by_class.values()
             if i < len(entries)]
    return turns[:count]


def write_scene(root: Path, output: Path, grid: int = 4) -> list[tuple[dict, tuple[int, int, int, int]]]:
    """A GeoTIFF (EPSG:32633, 0.5 m pixels) of ``grid`` x ``grid`` demo test images side by side, each exactly
    at its window: a small scene to tile with ``tools/search.py index --tile SIZE --stride SIZE`` and find by
    its images' captions. Returns each entry with its window ``(col_off, row_off, width, height)``."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    entries = round_robin_test_entries(root, grid * grid)
    if len(entries) < grid * grid:
        raise ValueError(f"{root / 'demo_test.json'} has {len(entries)} test images, fewer than {grid} x {grid}")
    with Image.open(root / "images" / entries[0]["image"]) as first:
        size = first.width
    mosaic = np.zeros((3, grid * size, grid * size), dtype=np.uint8)
    placed = []
    for k, entry in enumerate(entries):
        row, col = divmod(k, grid)
        with Image.open(root / "images" / entry["image"]) as img:
            pixels = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
        mosaic[:, row * size:(row + 1) * size, col * size:(col + 1) * size] = pixels
        placed.append((entry, (col * size, row * size, size, size)))
    output.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(output, "w", driver="GTiff", width=grid * size, height=grid * size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000.0, 4600000.0, 0.5, 0.5)) as dst:
        dst.write(mosaic)
    return placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DemoSpec()
    parser.add_argument("--root", default=".cache/demo", help="output folder")
    parser.add_argument("--train-per-class", type=int, default=defaults.train_per_class)
    parser.add_argument("--val-per-class", type=int, default=defaults.val_per_class)
    parser.add_argument("--test-per-class", type=int, default=defaults.test_per_class)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--montage", type=Path, default=None, help="also save a PNG sheet of sample images here")
    parser.add_argument("--scene", type=Path, default=None,
                        help="also write a geo-referenced GeoTIFF of 4 x 4 test images here (index it with --tile "
                             "and --stride equal to the image size)")
    args = parser.parse_args()
    spec = DemoSpec(args.train_per_class, args.val_per_class, args.test_per_class, args.image_size, args.seed)
    root = ensure_demo_dataset(args.root, spec)
    print(f"demo dataset in {root}")
    if args.montage is not None:
        draw_montage(root, args.montage)
    if args.scene is not None:
        for entry, window in write_scene(root, args.scene):
            print(f"window {list(window)}: {entry['image']}: {entry['caption'][0]}")
        print(f"scene in {args.scene}")


if __name__ == "__main__":
    main()
