"""From a public release's annotation files to the project's train/val/test JSON, checked and explained.

The order of work: read the source (``sources``), replace blank captions from a corrected copy, find every
problem (``problems``), stop on a hard one the user did not accept, carve a val split when the source has
none (``splits``), label scenes (``labels``), then write ``<name>_{train,val,test}.json``, the problem
report ``<name>_problems.tsv``, ``<name>_summary.json`` and two PNG figures. With a mask folder, every image's
segmentation mask is checked too, and the summary gives the share of each mask class.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils.checkpoint import write_text_atomic

from ..annotations import DEFAULT_CAPTION_WEIGHT, DataError, rule_weights
from ..captions import pre_caption
from . import problems as checks
from .labels import is_singleton, label_name
from .plots import plot_caption_lengths, plot_scene_counts
from .problems import HARD, Problem
from .sources import SPLITS, Source, SourceImage, read_coco, read_karpathy, read_precomp, read_xvlm, read_xvlm_file
from .splits import carve_val
from .summary import format_summary, mask_summary, split_word_counts, summarize

__all__ = ["HARD", "PrepareOptions", "Prepared", "PreparationError", "format_summary", "prepare_dataset",
           "read_coco", "read_karpathy", "read_precomp", "read_xvlm"]


class PreparationError(DataError):
    """Hard problems that the user did not accept; the report file lists each of them."""


@dataclass
class PrepareOptions:
    """How to convert; the command line of tools/prepare_data.py sets every field."""

    name: str
    source_format: str
    captions_per_image: int = 5
    label_scheme: str = "prefix"
    val_fraction: float = 0.2
    seed: int = 0
    image_root: str | None = None
    mask_root: str | None = None
    allow: frozenset[str] = frozenset()
    captions_from: str | None = None
    caption_weight: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CAPTION_WEIGHT))
    max_words: int = 30
    plots: bool = True
    plots_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.allow) - set(HARD)
        if unknown:
            raise ValueError(f"cannot allow {sorted(unknown)}: the kinds are {', '.join(HARD)}")


@dataclass
class Prepared:
    """The entries written per split, every problem found, the summary, and the files written."""

    splits: dict[str, list[dict[str, Any]]]
    problems: list[Problem]
    summary: dict[str, Any]
    files: dict[str, Path]


def _find_problems(source: Source, options: PrepareOptions
                   ) -> tuple[list[SourceImage], list[Problem], Counter, dict[str, np.ndarray]]:
    """The hard problems, and the images left once the accepted ones had their effect; also the image sizes and
    the class pixel counts of the masks (by entry image)."""
    images = source.images
    found = list(source.problems)
    if options.captions_from:
        found += checks.fix_blank_captions(images, read_xvlm_file(options.captions_from, None),
                                           Path(options.captions_from).name)
    found += checks.blank_captions(images)
    found += checks.caption_counts(images, options.captions_per_image)
    if "blank-caption" in options.allow:
        images = checks.drop_blank_captions(images)
    found += checks.split_overlap(images)
    sizes: Counter = Counter()
    if options.image_root:
        file_problems, sizes = checks.image_files(images, options.image_root)
        found += file_problems
        dropped = {(p.split, p.image) for p in file_problems if p.kind in options.allow}
        images = [image for image in images if (image.split, image.name) not in dropped]
    mask_counts: dict[str, np.ndarray] = {}
    if options.mask_root:
        mask_problems, mask_counts = checks.mask_files(images, options.mask_root, options.image_root)
        found += mask_problems
        dropped = {(p.split, p.image) for p in mask_problems if p.kind in options.allow}
        images = [image for image in images if (image.split, image.name) not in dropped]
    return images, found, sizes, mask_counts


def _label_ids(images: list[SourceImage], names: list[str]) -> dict[str, int]:
    """Scene ids in order of first appearance in train, then val, then test."""
    ids: dict[str, int] = {}
    for split in SPLITS:
        for image, name in zip(images, names):
            if image.split == split:
                ids.setdefault(name, len(ids))
    return ids


def _entries(images: list[SourceImage], names: list[str], options: PrepareOptions
             ) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """Entries per split in the project's format, and where the train captions' weights came from."""
    ids = _label_ids(images, names)
    out: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    image_ids: dict[str, int] = {}
    for image, name in zip(images, names):
        fields = {"image": checks.entry_image(image), "label": ids[name], "label_name": name}
        if image.split == "train":
            image_id = image_ids.setdefault(image.name, len(image_ids))
            out["train"] += [{"caption": c, "image_id": image_id, **fields} for c in image.captions]
        else:
            out[image.split].append({"caption": list(image.captions), **fields})
    empty = [split for split, entries in out.items() if not entries]
    if empty:
        raise DataError(f"no {' or '.join(empty)} images left to write (a carved val split takes "
                        f"round(val fraction x train images) of them)")
    train = out["train"]
    weights, weight_source = rule_weights([pre_caption(e["caption"], options.max_words) for e in train],
                                          options.caption_weight)
    for entry, weight in zip(train, weights):
        entry["length"] = weight
    return out, weight_source


def _write_json(data: Any, path: Path) -> None:
    write_text_atomic(json.dumps(data, ensure_ascii=False, sort_keys=True, indent=1) + "\n", path)


def prepare_dataset(source: Source, out_dir: str | Path, options: PrepareOptions) -> Prepared:
    """Check, split, label and write ``source``; the problem report is written even when this raises."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"report": out_dir / f"{options.name}_problems.tsv"}
    images, found, sizes, mask_counts = _find_problems(source, options)
    names = [label_name(image.name, options.label_scheme) for image in images]
    singleton_strata = ["" if is_singleton(image.name, name) else name for image, name in zip(images, names)]
    carve_val(images, singleton_strata, options.val_fraction, options.seed)
    found += checks.duplicate_captions(images)
    checks.write_report(found, options.allow, str(files["report"]))
    errors = Counter(p.kind for p in found if p.status(options.allow) == "error")
    if errors:
        listed = ", ".join(f"{kind} ({count})" for kind, count in errors.items())
        raise PreparationError(f"{sum(errors.values())} hard problems: {listed}; each is listed in "
                               f"{files['report']}. Fix the source, or accept a kind with --allow KIND ("
                               + "; ".join(f"{kind}: {HARD[kind]}" for kind in errors) + ")"
                               + (". Blank captions can also be replaced with --captions-from JSON"
                                  if "blank-caption" in errors else ""))
    splits, weight_source = _entries(images, names, options)
    context = {"source_format": options.source_format, "source_files": source.files,
               "label_scheme": options.label_scheme, "notes": source.notes, "caption_weights": weight_source,
               "accepted": sorted(options.allow),
               "image_sizes": {f"{w}x{h}": n for (w, h), n in sorted(sizes.items())}}
    if options.mask_root:
        context["masks"] = mask_summary(splits, mask_counts, options.mask_root, sizes_checked=bool(options.image_root))
    words = split_word_counts(splits)
    summary = summarize(options.name, splits, words, found, set(options.allow), context, options.max_words)
    for split, entries in splits.items():
        files[split] = out_dir / f"{options.name}_{split}.json"
        _write_json(entries, files[split])
    files["summary"] = out_dir / f"{options.name}_summary.json"
    _write_json(summary, files["summary"])
    if options.plots:
        plots_dir = Path(options.plots_dir) if options.plots_dir else out_dir
        plots_dir.mkdir(parents=True, exist_ok=True)
        files["scene_plot"] = plots_dir / f"{options.name}_scenes.png"
        files["length_plot"] = plots_dir / f"{options.name}_caption_lengths.png"
        plot_scene_counts(options.name, splits, files["scene_plot"])
        plot_caption_lengths(options.name, words, files["length_plot"])
    return Prepared(splits, found, summary, files)

