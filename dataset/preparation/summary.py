"""What a converted dataset holds, in numbers: written as JSON next to the output and printed as text."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..captions import pre_caption
from ..masks import NUM_CLASSES, class_shares
from .labels import is_singleton
from .problems import HARD, Problem


def caption_words(caption: str) -> int:
    """Words as the loader sees them (``pre_caption`` without the cut), 0 for a blank caption."""
    try:
        return len(pre_caption(caption, max_words=1 << 30).split(" "))
    except ValueError:
        return 0


def split_captions(split: str, entries: list[dict[str, Any]]) -> list[str]:
    """All captions of a split's entries (train: one per entry; val/test: a list per entry)."""
    if split == "train":
        return [entry["caption"] for entry in entries]
    return [caption for entry in entries for caption in entry["caption"]]


def split_word_counts(splits: dict[str, list[dict[str, Any]]]) -> dict[str, np.ndarray]:
    """Words of every caption per split, counted once for the summary and the length figure."""
    return {split: np.array([caption_words(c) for c in split_captions(split, entries)], dtype=np.int64)
            for split, entries in splits.items()}


def _word_stats(words: np.ndarray, max_words: int) -> dict[str, float]:
    return {"mean": round(float(words.mean()), 2), "median": float(np.median(words)), "min": int(words.min()),
            "p95": float(np.percentile(words, 95)), "max": int(words.max()),
            f"over_{max_words}": int((words > max_words).sum())}


def summarize(name: str, splits: dict[str, list[dict[str, Any]]], words: dict[str, np.ndarray],
              problems: list[Problem], allowed: set[str], context: dict[str, Any], max_words: int) -> dict[str, Any]:
    """Images, captions and scenes per split, caption lengths, and problem counts by kind and status."""
    out: dict[str, Any] = {"name": name, **context, "splits": {}}
    for split, entries in splits.items():
        by_image = {entry["image"]: entry["label_name"] for entry in entries}
        scenes = Counter(by_image.values())
        singletons = sum(is_singleton(image, label) for image, label in by_image.items())
        out["splits"][split] = {
            "images": len(by_image), "captions": len(words[split]),
            "scenes": len(scenes) - singletons, "images_with_own_scene": singletons,
            "caption_words": _word_stats(words[split], max_words),
            "images_repeating_a_caption": len({p.image for p in problems
                                               if p.kind == "duplicate-caption" and p.split == split}),
            "captions_shared_by_images": sum(p.kind == "shared-caption" and p.split == split for p in problems),
        }
    counts = Counter((p.kind, p.status(allowed)) for p in problems)
    out["problems"] = {f"{kind} ({status})": count for (kind, status), count in sorted(counts.items())}
    return out


def mask_summary(splits: dict[str, list[dict[str, Any]]], counts: dict[str, np.ndarray], mask_root: str,
                 sizes_checked: bool) -> dict[str, Any]:
    """Per split and over all splits: masks read and, per class, its share of the pixels (ignore left out) and
    the share of masks containing it, in percent; ``counts`` holds each entry image's class pixel counts."""
    rows: dict[str, np.ndarray] = {}
    for split, entries in splits.items():
        images = dict.fromkeys(entry["image"] for entry in entries)
        rows[split] = np.array([counts[image] for image in images]).reshape(-1, NUM_CLASSES)
    everything = np.concatenate(list(rows.values()))
    return {"root": mask_root, "sizes_checked": sizes_checked, "masks": len(everything),
            "classes": class_shares(everything),
            "splits": {split: {"masks": len(r), "classes": class_shares(r)} for split, r in rows.items()}}


def _mask_lines(masks: dict[str, Any]) -> list[str]:
    sizes = "sizes checked against the images" if masks["sizes_checked"] else "sizes not checked (no --image-root)"
    lines = [f"masks in {masks['root']}: {masks['masks']} read, {sizes}",
             f"{'mask class':<14} {'pixels %':>9} {'images %':>9}"]
    lines += [f"{name:<14} {share['pixels']:>9.3f} {share['images']:>9.2f}" for name, share in masks["classes"].items()]
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the tool prints it."""
    folders = sorted({str(Path(file).parent) for file in summary["source_files"]})
    lines = [f"dataset {summary['name']}: {summary['source_format']} files in {', '.join(folders)}",
             f"scene labels: {summary['label_scheme']}"]
    lines += [f"note: {note}" for note in summary["notes"]]
    lines.append(f"{'split':<6} {'images':>7} {'captions':>9} {'scenes':>7} {'own':>6} {'rep':>6} {'shared':>6}"
                 f"   words mean/median/max")
    for split, stats in summary["splits"].items():
        words = stats["caption_words"]
        lines.append(f"{split:<6} {stats['images']:>7} {stats['captions']:>9} {stats['scenes']:>7} "
                     f"{stats['images_with_own_scene']:>6} {stats['images_repeating_a_caption']:>6} "
                     f"{stats['captions_shared_by_images']:>6}   {words['mean']:.2f} / {words['median']:g} / "
                     f"{words['max']}")
    lines.append("(own: images with no scene prefix; rep: images repeating a caption; shared: caption texts of "
                 "several images)")
    own = {split: stats["images_with_own_scene"] for split, stats in summary["splits"].items()}
    if any(own.values()):
        lines.append(f"{sum(own.values())} images have no scene prefix and a scene of their own ("
                     + ", ".join(f"{count} {split}" for split, count in own.items()) + ")")
    lines.append(f"caption weights ('length'): {summary['caption_weights']}")
    if summary.get("image_sizes"):
        lines.append("image sizes: " + ", ".join(f"{size} x{count}" for size, count in summary["image_sizes"].items()))
    if summary.get("masks"):
        lines += _mask_lines(summary["masks"])
    if summary["problems"]:
        lines.append("problems (see the report):")
        lines += [f"  {kind}: {count}" for kind, count in summary["problems"].items()]
    else:
        lines.append("problems: none")
    accepted = [kind for kind in summary.get("accepted", []) if kind in HARD]
    if accepted:
        lines += [f"accepted {kind}: {HARD[kind]}" for kind in accepted]
    return "\n".join(lines)
