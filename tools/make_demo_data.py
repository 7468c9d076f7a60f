"""Generate the procedural demo dataset (images/, their segmentation masks in masks/, the split JSONs and a
vocabulary) into a folder, and optionally draw a sheet of sample images.

    python tools/make_demo_data.py --root .cache/demo --montage assets/demo_samples.png
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
    args = parser.parse_args()
    spec = DemoSpec(args.train_per_class, args.val_per_class, args.test_per_class, args.image_size, args.seed)
    root = ensure_demo_dataset(args.root, spec)
    print(f"demo dataset in {root}")
    if args.montage is not None:
        draw_montage(root, args.montage)


if __name__ == "__main__":
    main()
