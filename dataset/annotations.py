"""Reading and checking X-VLM/PIR retrieval JSON (the "re" format).

Train files hold one entry per caption (``image``, ``caption``, ``image_id``, optional ``label`` and
``length``, the caption weight of FISVL's weighted contrastive loss);
val/test files hold one entry per image with its list of captions. Any entry may name its segmentation mask
(``mask``, under ``mask_root``; default: the RSITMD-SS name). Every problem stops the load with
a message naming the file and the entry, unless ``skip_bad_samples`` is set, in which case entries with
missing or unreadable images or masks are skipped, counted and logged (malformed entries always stop it).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from .captions import pre_caption
from .images import candidate_paths, decode_problem, resolve_image_path
from .masks import mask_candidates, mask_problem, resolve_mask_path

log = logging.getLogger(__name__)


DEFAULT_CAPTION_WEIGHT: dict[str, Any] = {"rule": "short_low", "avg_ratio": 0.7, "low": 0.95}


class DataError(ValueError):
    """An annotation file or an image it names is unusable; the message says which and where."""


@dataclass
class TrainAnnotations:
    """One row per caption; ``image_index`` is contiguous in order of first appearance of ``image_id``.

    ``weight_source`` says where ``caption_weights`` came from, for the log (the file or a rule, with its numbers).
    ``mask_paths`` (one per row, like ``image_paths``) is ``None`` when no ``mask_root`` is configured.
    """

    image_paths: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    image_index: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    label_names: dict[str, int] = field(default_factory=dict)
    caption_weights: list[float] = field(default_factory=list)
    weight_source: str = ""
    mask_paths: list[str] | None = None
    skipped: int = 0


@dataclass
class EvalAnnotations:
    """Images in file order; captions numbered consecutively, so ``img2txt[i]`` lists image i's caption ids.
    ``mask_paths`` (one per image) is ``None`` when no ``mask_root`` is configured."""

    image_paths: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    img2txt: list[list[int]] = field(default_factory=list)
    txt2img: list[int] = field(default_factory=list)
    mask_paths: list[str] | None = None
    skipped: int = 0


def scene_label_name(image: str) -> str:
    """Scene of an image from its file name: ``denseresidential_12.tif`` -> ``denseresidential``.

    A name without a ``<scene>_<n>`` prefix (RSICD's ``00017.jpg``) is a scene of its own.
    """
    name = os.path.basename(image)
    stem = os.path.splitext(name)[0]
    scene, _, number = stem.rpartition("_")
    return scene if scene and number.isdigit() else name


def read_json_list(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text: byte 0x{err.object[err.start]:02x} at byte position {err.start} "
                        f"({err.reason}); save the file as UTF-8") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def _field(entry: Any, name: str, types: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    if name not in entry:
        raise DataError(f"{where}: missing field '{name}'")
    value = entry[name]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(f"{where}: field '{name}' has type {type(value).__name__}")
    return value


def _present(entry: dict[str, Any], name: str, first: bool | None, where: str) -> bool:
    """Whether optional field ``name`` is in ``entry``; it must be given for every entry or for none
    (``first`` is the answer for the first entry, ``None`` while reading it)."""
    present = name in entry
    if first is not None and present != first:
        raise DataError(f"{where}: '{name}' is {'present' if present else 'absent'} here but not in the first "
                        f"entry; give it for every entry or for none")
    return present


def _weight_field(entry: dict[str, Any], where: str) -> float:
    value = _field(entry, "length", (int, float), where)
    if not (math.isfinite(value) and value > 0):
        raise DataError(f"{where}: field 'length' (the caption weight) must be a positive number, got {value!r}")
    return float(value)


def rule_weights(captions: list[str], caption_weight: dict[str, Any] | None = None) -> tuple[list[float], str]:
    """Caption weights from word counts, for train JSONs without FISVL's unpublished ``length`` field.

    fisvl-method.md §11 Q1: ``short_low`` gives ``low`` to captions shorter than ``avg_ratio`` x the mean
    word count of the loaded split, 1 to the rest; ``clip`` gives clip(words / mean, low, 1); ``none`` 1.
    Returns the weights and a line for the log.
    """
    spec = {**DEFAULT_CAPTION_WEIGHT, **(caption_weight or {})}
    rule, low = spec["rule"], float(spec["low"])
    if not low > 0:
        raise ValueError(f"caption_weight.low must be positive, got {low}")
    # pre_caption leaves single spaces between words
    words = np.fromiter((caption.count(" ") + 1 for caption in captions), dtype=np.float64, count=len(captions))
    mean, count = words.mean(), len(words)
    if rule == "short_low":
        threshold = spec["avg_ratio"] * mean
        short = words < threshold
        weights = np.where(short, low, 1.0)
        source = (f"rule short_low: mean {mean:.2f} words, threshold {threshold:.2f} words, "
                  f"{100 * short.mean():.1f} % of {count} captions get {low:g}")
    elif rule == "clip":
        weights = np.clip(words / mean, low, 1.0)
        source = (f"rule clip: mean {mean:.2f} words, weight clip(words / mean, {low:g}, 1), "
                  f"{100 * (weights < 1).mean():.1f} % of {count} captions below 1")
    elif rule == "none":
        weights = np.ones(count)
        source = f"rule none: all {count} captions weigh 1"
    else:
        raise ValueError(f"caption_weight.rule must be short_low, clip or none, got {rule!r}")
    return weights.tolist(), source


def _clean(caption: str, max_words: int, where: str) -> str:
    try:
        return pre_caption(caption, max_words)
    except ValueError:
        raise DataError(f"{where}: empty caption {caption!r}") from None


def _image_problem(image_root: str, image: str, check_decode: bool,
                   decode_problems: Mapping[str, str] | None) -> tuple[str | None, str | None]:
    """(resolved path, problem description); the problem is ``None`` when the image is usable.

    ``decode_problems`` holds the results of a decode check already run over the images
    (:func:`dataset.image_check.check_split_images`); without it, ``check_decode`` decodes here.
    """
    path = resolve_image_path(image_root, image)
    if path is None:
        return None, f"image not found (tried {' and '.join(candidate_paths(image_root, image))})"
    if decode_problems is not None:
        return path, decode_problems.get(path)
    return path, decode_problem(path) if check_decode else None


def _mask_field(entry: dict[str, Any], where: str) -> str | None:
    """The entry's optional ``mask``: its mask file under ``mask_root``, instead of the RSITMD-SS name."""
    return _field(entry, "mask", str, where) if "mask" in entry else None


def _mask_problem(mask_root: str, image: str, mask: str | None, image_path: str, check: bool,
                  decode_problems: Mapping[str, str] | None) -> tuple[str | None, str | None]:
    """(resolved mask path, problem description) for the mask of ``image`` (found at ``image_path``; named
    ``mask`` when the entry does), as :func:`_image_problem` does for images."""
    path = resolve_mask_path(mask_root, image, mask)
    if path is None:
        return None, f"mask not found (tried {' and '.join(mask_candidates(mask_root, image, mask))})"
    if decode_problems is not None:
        return path, decode_problems.get(path)
    return path, mask_problem(path, image_path) if check else None


def _skip_or_raise(problem: str, where: str, skip_bad: bool) -> None:
    if not skip_bad:
        raise DataError(f"{where}: {problem} (set skip_bad_samples: true to skip such entries)")
    log.warning("skipping %s: %s", where, problem)


def load_train_annotations(files: Iterable[str], image_root: str, max_words: int, skip_bad: bool = False,
                           caption_weight: dict[str, Any] | None = None,
                           decode_problems: Mapping[str, str] | None = None,
                           mask_root: str | None = None) -> TrainAnnotations:
    """Read and check train JSON files (concatenated in order).

    Caption weights come from the entries' ``length`` field when they have one, else from
    :func:`rule_weights` with ``caption_weight`` (``None``: :data:`DEFAULT_CAPTION_WEIGHT`). With ``mask_root``
    every image needs its mask (``decode_problems`` may hold the masks' problems too).
    """
    files = list(files)
    out = TrainAnnotations(mask_paths=None if mask_root is None else [])
    index_of_image: dict[Any, int] = {}
    path_cache: dict[str, tuple[str | None, str | None]] = {}
    mask_cache: dict[tuple[str, str | None], tuple[str | None, str | None]] = {}
    has_label: bool | None = None
    has_length: bool | None = None
    for file in files:
        for i, entry in enumerate(read_json_list(file)):
            where = f"{file}, entry {i}"
            image = _field(entry, "image", str, where)
            caption = _clean(_field(entry, "caption", str, where), max_words, where)
            image_id = _field(entry, "image_id", (int, str), where)
            has_label = _present(entry, "label", has_label, where)
            has_length = _present(entry, "length", has_length, where)
            if image not in path_cache:
                path_cache[image] = _image_problem(image_root, image, skip_bad, decode_problems)
            path, problem = path_cache[image]
            if problem is None and mask_root is not None:
                key = (image, _mask_field(entry, where))
                if key not in mask_cache:
                    mask_cache[key] = _mask_problem(mask_root, *key, path, skip_bad, decode_problems)
                mask_path, problem = mask_cache[key]
            if problem is not None:
                _skip_or_raise(problem, where, skip_bad)
                out.skipped += 1
                continue
            if out.mask_paths is not None:
                out.mask_paths.append(mask_path)
            if has_label:
                label = _field(entry, "label", int, where)
            else:
                label = out.label_names.setdefault(scene_label_name(image), len(out.label_names))
            out.image_paths.append(path)
            out.captions.append(caption)
            out.image_index.append(index_of_image.setdefault(image_id, len(index_of_image)))
            out.labels.append(label)
            if has_length:
                out.caption_weights.append(_weight_field(entry, where))
    if not out.captions:
        raise DataError(f"no usable training entries in {files}")
    if has_length:
        weights = np.asarray(out.caption_weights)
        out.weight_source = (f"field 'length' (mean {weights.mean():.4g}, min {weights.min():.4g}, "
                             f"max {weights.max():.4g})")
    else:
        out.caption_weights, out.weight_source = rule_weights(out.captions, caption_weight)
    return out


def load_eval_annotations(file: str, image_root: str, max_words: int, skip_bad: bool = False,
                          decode_problems: Mapping[str, str] | None = None,
                          mask_root: str | None = None) -> EvalAnnotations:
    """Read and check a val/test JSON (one entry per image with a list of captions); with ``mask_root``
    every image needs its mask."""
    out = EvalAnnotations(mask_paths=None if mask_root is None else [])
    for i, entry in enumerate(read_json_list(file)):
        where = f"{file}, entry {i}"
        image = _field(entry, "image", str, where)
        captions = _field(entry, "caption", (list, str), where)
        captions = [captions] if isinstance(captions, str) else captions
        if not captions or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{where}: 'caption' must be a non-empty list of strings")
        cleaned = [_clean(c, max_words, f"{where}, caption {j}") for j, c in enumerate(captions)]
        path, problem = _image_problem(image_root, image, skip_bad, decode_problems)
        if problem is None and mask_root is not None:
            mask_path, problem = _mask_problem(mask_root, image, _mask_field(entry, where), path, skip_bad,
                                               decode_problems)
        if problem is not None:
            _skip_or_raise(problem, where, skip_bad)
            out.skipped += 1
            continue
        if out.mask_paths is not None:
            out.mask_paths.append(mask_path)
        image_number = len(out.image_paths)
        out.image_paths.append(path)
        out.img2txt.append(list(range(len(out.texts), len(out.texts) + len(cleaned))))
        out.texts.extend(cleaned)
        out.txt2img.extend([image_number] * len(cleaned))
    if not out.image_paths:
        raise DataError(f"no usable entries in {file}")
    return out
