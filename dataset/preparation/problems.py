"""Checks of a converted dataset: every problem is found, listed in the report, and never hidden.

A *hard* problem makes the data wrong for training or evaluation; it stops the conversion unless the user
accepts its kind (``--allow KIND``), and :data:`HARD` says what accepting it does. The other kinds are
notes: kept as they are, because they are part of the benchmark (RSICD repeats captions), but counted.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from utils.checkpoint import write_text_atomic

from ..captions import pre_caption
from ..images import candidate_paths, load_rgb, resolve_image_path
from ..masks import MaskError, mask_candidates, mask_class_counts, resolve_mask_path

if TYPE_CHECKING:
    from .sources import SourceImage

HARD = {
    "blank-caption": "blank captions are dropped (the image keeps its others; one left with none is dropped)",
    "caption-count": "images keep the captions they have",
    "split-overlap": "the image stays in every split that lists it",
    "split-mismatch": "the fixed split is used as it is",
    "missing-image": "the image and its captions are dropped",
    "unreadable-image": "the image and its captions are dropped",
    "missing-mask": "the image and its captions are dropped",
    "bad-mask": "the image and its captions are dropped",
}
NOTES = {
    "duplicate-caption": "an image has the same caption more than once (kept)",
    "shared-caption": "several images of a split have the same caption (kept)",
    "fixed-caption": "a blank caption was replaced from --captions-from",
}
REPORT_HEADER = "kind\tstatus\tsplit\timage\twhere\tdetail"


@dataclass(frozen=True)
class Problem:
    kind: str
    split: str | None
    image: str
    where: str
    detail: str

    def status(self, allowed: Iterable[str]) -> str:
        if self.kind not in HARD:
            return "note"
        return "accepted" if self.kind in allowed else "error"

    def report_line(self, allowed: Iterable[str]) -> str:
        fields = (self.kind, self.status(allowed), self.split or "-", self.image, self.where, self.detail)
        return "\t".join(field.replace("\t", " ").replace("\n", " ") for field in fields)


def _lines(origins: list[str]) -> str:
    """``caps.txt:3546-3550`` for lines of one file, else the first and last origin."""
    if not origins:
        return "-"
    first, last = origins[0], origins[-1]
    if first == last:
        return first
    (file, _, start), (other, _, end) = first.rpartition(":"), last.rpartition(":")
    if file == other and start.isdigit() and end.isdigit():
        return f"{file}:{start}-{end}"
    return f"{first} ... {last}"


def is_blank(caption: str) -> bool:
    """Nothing left once the loader cleans it (RSICD has captions that are only " .")."""
    try:
        pre_caption(caption)
    except ValueError:
        return True
    return False


def fix_blank_captions(images: list[SourceImage], corrections: list[SourceImage], origin: str) -> list[Problem]:
    """Replace blank caption j of an image by caption j of the same image in ``corrections`` (matched by
    name), e.g. the four blank RSITMD images from the public JSON that corrected them."""
    by_name = {image.name: image for image in corrections}
    problems = []
    for image in images:
        blank = [j for j, caption in enumerate(image.captions) if is_blank(caption)]
        fix = by_name.get(image.name)
        if not blank or fix is None or len(fix.captions) != len(image.captions):
            continue
        where = _lines([image.origins[j] for j in blank])
        for j in blank:
            image.captions[j] = fix.captions[j]
            image.origins[j] = fix.origins[j]
        problems.append(Problem("fixed-caption", image.split, image.name, where,
                                f"{len(blank)} blank caption(s) replaced from {origin} "
                                f"({_lines([fix.origins[j] for j in blank])})"))
    return problems


def blank_captions(images: list[SourceImage]) -> list[Problem]:
    problems = []
    for image in images:
        blank = [(caption, origin) for caption, origin in zip(image.captions, image.origins) if is_blank(caption)]
        if blank:
            problems.append(Problem("blank-caption", image.split, image.name, _lines([o for _, o in blank]),
                                    f"{len(blank)} of {len(image.captions)} captions blank: "
                                    + ", ".join(repr(c) for c, _ in blank)))
    return problems


def drop_blank_captions(images: list[SourceImage]) -> list[SourceImage]:
    """What accepting ``blank-caption`` does."""
    for image in images:
        kept = [(c, o) for c, o in zip(image.captions, image.origins) if not is_blank(c)]
        image.captions, image.origins = [c for c, _ in kept], [o for _, o in kept]
    return [image for image in images if image.captions]


def caption_counts(images: list[SourceImage], expected: int) -> list[Problem]:
    return [Problem("caption-count", image.split, image.name, _lines(image.origins),
                    f"{len(image.captions)} captions, expected {expected}")
            for image in images if len(image.captions) != expected]


def split_overlap(images: list[SourceImage]) -> list[Problem]:
    splits: dict[str, list[SourceImage]] = defaultdict(list)
    for image in images:
        splits[image.name].append(image)
    return [Problem("split-overlap", image.split, name, _lines(image.origins),
                    f"listed in {' and '.join(other.split or 'train' for other in listed)}")
            for name, listed in splits.items() if len(listed) > 1 for image in listed]


def duplicate_captions(images: list[SourceImage]) -> list[Problem]:
    """Within an image, and across the images of a split (compared after stripping outer whitespace)."""
    problems = []
    owners: dict[tuple[str | None, str], list[str]] = defaultdict(list)
    for image in images:
        counts = Counter(caption.strip() for caption in image.captions if not is_blank(caption))
        for caption, count in counts.items():
            owners[(image.split, caption)].append(image.name)
            if count > 1:
                problems.append(Problem("duplicate-caption", image.split, image.name, _lines(image.origins),
                                        f"{count}x {caption!r}"))
    for (split, caption), names in owners.items():
        if len(names) > 1:
            problems.append(Problem("shared-caption", split, ", ".join(names), "-",
                                    f"{len(names)} images share {caption!r}"))
    return problems


def _probe(image_root: str, image: SourceImage) -> tuple[Problem | None, tuple[int, int] | None]:
    wanted = f"{image.split}/{image.name}" if image.split else image.name
    path = resolve_image_path(image_root, wanted)
    if path is None:
        return Problem("missing-image", image.split, image.name, "-",
                       f"no file at {' or '.join(candidate_paths(image_root, wanted))}"), None
    image.path = os.path.relpath(path, image_root)
    try:
        return None, load_rgb(path).size
    except Exception as err:  # Pillow raises several types for corrupt files
        return Problem("unreadable-image", image.split, image.name, path, f"cannot decode: {err}"), None


def image_files(images: list[SourceImage], image_root: str, workers: int | None = None
                ) -> tuple[list[Problem], Counter]:
    """Each image is looked up as ``image_root/<split>/<name>`` then ``image_root/<name>`` and decoded; where
    it was found is kept in ``image.path``. Returns the problems and a count of image sizes ``(width, height)``."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda image: _probe(image_root, image), images))
    return [p for p, _ in results if p is not None], Counter(size for _, size in results if size is not None)


def entry_image(image: SourceImage) -> str:
    """The ``image`` field its entries get: where it was found under the image root, else its name."""
    return image.path or image.name


def _mask_probe(mask_root: str, image_root: str | None, image: SourceImage
                ) -> tuple[Problem | None, np.ndarray | None]:
    entry = entry_image(image)
    path = resolve_mask_path(mask_root, entry)
    if path is None:
        return Problem("missing-mask", image.split, image.name, "-",
                       f"no file at {' or '.join(mask_candidates(mask_root, entry))}"), None
    image_path = os.path.join(image_root, image.path) if image_root and image.path else None
    try:
        return None, mask_class_counts(path, image_path)
    except MaskError as err:
        return Problem("bad-mask", image.split, image.name, path, str(err)), None


def mask_files(images: list[SourceImage], mask_root: str, image_root: str | None = None, workers: int | None = None
               ) -> tuple[list[Problem], dict[str, np.ndarray]]:
    """Each image's mask is looked up as the loader does (:func:`dataset.masks.resolve_mask_path` of its entry's
    ``image``), read and checked (encoding; with ``image_root``, the image's size). Returns the problems and the
    class pixel counts of every usable mask, keyed by the entry's ``image``."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda image: _mask_probe(mask_root, image_root, image), images))
    counts = {entry_image(image): found for image, (_, found) in zip(images, results) if found is not None}
    return [p for p, _ in results if p is not None], counts


def write_report(problems: list[Problem], allowed: Iterable[str], path: str) -> None:
    allowed = set(allowed)
    lines = [REPORT_HEADER] + [problem.report_line(allowed) for problem in problems]
    write_text_atomic("\n".join(lines) + "\n", path)
