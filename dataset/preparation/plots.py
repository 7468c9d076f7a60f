"""PNG figures of a converted dataset, sized for the README's assets/: images per scene and caption lengths."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from utils.figures import save_figure

from .labels import is_singleton

SPLIT_COLOURS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}


def plot_scene_counts(name: str, splits: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Stacked horizontal bars of images per scene and split; images without a scene prefix form one bar."""
    own = "(a scene per image)"
    scene_of_image = {split: {e["image"]: own if is_singleton(e["image"], e["label_name"]) else e["label_name"]
                              for e in entries} for split, entries in splits.items()}
    counts = {split: Counter(scenes.values()) for split, scenes in scene_of_image.items()}
    total = sum(counts.values(), Counter())
    scenes = sorted(total, key=lambda scene: (-total[scene], scene))
    figure = Figure(figsize=(7, max(2.6, 1.2 + 0.22 * len(scenes))))
    axes = figure.add_subplot()
    left = np.zeros(len(scenes))
    for split, counter in counts.items():
        values = np.array([counter[scene] for scene in scenes], dtype=float)
        axes.barh(scenes, values, left=left, color=SPLIT_COLOURS[split], label=f"{split} ({sum(counter.values())})")
        left += values
    axes.invert_yaxis()
    axes.set_xlabel("images")
    axes.set_title(f"{name}: images per scene")
    axes.legend(loc="best")
    axes.tick_params(axis="y", labelsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def plot_caption_lengths(name: str, words: dict[str, np.ndarray], path: Path) -> None:
    """Histogram of words per caption (as the loader cleans them), one outline per split, as fractions."""
    figure = Figure(figsize=(7, 3.5))
    axes = figure.add_subplot()
    bins = np.arange(0, max(int(w.max()) for w in words.values()) + 2) - 0.5
    for split, counts in words.items():
        axes.hist(counts, bins=bins, histtype="step", linewidth=1.5, color=SPLIT_COLOURS[split],
                  weights=np.full(len(counts), 1 / len(counts)),
                  label=f"{split}: mean {counts.mean():.1f}, {len(counts)} captions")
    axes.set_xlabel("words per caption")
    axes.set_ylabel("fraction of captions")
    axes.set_title(f"{name}: caption lengths")
    axes.legend()
    figure.tight_layout()
    save_figure(figure, path)
