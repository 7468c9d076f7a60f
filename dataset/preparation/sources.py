"""Readers for the annotation formats that the public datasets ship in (data-and-protocol.md §3).

Every reader returns a :class:`Source`: one :class:`SourceImage` per (image, split) with its captions in
source order and where each caption came from (file and line or entry), so a report can point at it.
A file that does not follow its format stops the reader with a :class:`~dataset.annotations.DataError`
naming the file; problems of content (blank captions, wrong counts, ...) are left to ``problems.py``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..annotations import DataError
from .problems import Problem

SPLITS = ("train", "val", "test")


@dataclass
class SourceImage:
    """One image of one split. ``split`` is ``None`` when the source has no val split and one is carved;
    ``path`` is where the file was found under the image root, when it was looked for."""

    name: str
    split: str | None
    captions: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    path: str | None = None


@dataclass
class Source:
    """What a reader found: the images, the files read, and findings only the reader can make."""

    images: list[SourceImage]
    files: list[str]
    problems: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _group(rows: list[tuple[str, str, str]], split: str | None) -> list[SourceImage]:
    """(image name, caption, origin) rows -> images in order of first appearance, captions in row order."""
    images: dict[str, SourceImage] = {}
    for name, caption, origin in rows:
        image = images.setdefault(name, SourceImage(name, split))
        image.captions.append(caption)
        image.origins.append(origin)
    return list(images.values())


def _read_lines(path: Path) -> list[str]:
    """Lines of a precomp text file; one trailing newline ends the last line, it does not add a blank one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"precomp file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text: {err}") from err
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _existing(folder: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {what} file (looked for {' or '.join(names)})")


def read_precomp_pair(caps_path: Path, names_path: Path, split: str | None,
                      captions_per_image: int) -> list[SourceImage]:
    """A ``*_caps.txt`` / ``*_filename.txt`` pair. The name file has one line per image (caption k belongs
    to image k // captions_per_image) or one per caption (AMFMN's "image divisor" rule, §3.2)."""
    captions, names = _read_lines(caps_path), _read_lines(names_path)
    if len(names) * captions_per_image == len(captions):
        owner = [names[k // captions_per_image] for k in range(len(captions))]
    elif len(names) == len(captions):
        owner = names
    else:
        raise DataError(f"{names_path} has {len(names)} lines and {caps_path} {len(captions)}: expected one name "
                        f"per caption or one per {captions_per_image} captions")
    blank_names = [i + 1 for i, name in enumerate(names) if not name.strip()]
    if blank_names:
        raise DataError(f"{names_path}: blank image name on line(s) {blank_names[:10]}")
    return _group([(name.strip(), caption, f"{caps_path.name}:{k + 1}")
                   for k, (name, caption) in enumerate(zip(owner, captions))], split)


def read_precomp(src_dir: str | Path, fixed_split_dir: str | Path | None = None,
                 captions_per_image: int = 5) -> Source:
    """AMFMN/GaLR/SIRS precomp folder: ``train_*`` and ``test_*``. Without ``fixed_split_dir`` the train
    images have no split yet (val is carved from them). With it, train and val come from its
    ``{train,val}_{caps,filename}_verify.txt``, and are checked to partition the source's train."""
    src = Path(src_dir)
    files = [_existing(src, [f"{split}_{kind}.txt"], f"{split} {kind}") for split in ("train", "test")
             for kind in ("caps", "filename")]
    source_train = read_precomp_pair(files[0], files[1], None, captions_per_image)
    test = read_precomp_pair(files[2], files[3], "test", captions_per_image)
    if fixed_split_dir is None:
        return Source(source_train + test, [str(f) for f in files],
                      notes=[f"no val split in {src}: carved from train"])
    fixed = Path(fixed_split_dir)
    split_images: list[SourceImage] = []
    for split in ("train", "val"):
        caps = _existing(fixed, [f"{split}_caps_verify.txt", f"{split}_caps.txt"], f"{split} captions")
        names = _existing(fixed, [f"{split}_filename_verify.txt", f"{split}_filename.txt"], f"{split} names")
        files += [caps, names]
        split_images += read_precomp_pair(caps, names, split, captions_per_image)
    problems = []
    in_fixed = {image.name: image for image in split_images}
    in_source = {image.name: image for image in source_train}
    for image in source_train:
        if image.name not in in_fixed:
            problems.append(Problem("split-mismatch", None, image.name, image.origins[0],
                                    f"in {files[1]} but in neither fixed split file"))
        elif in_fixed[image.name].captions != image.captions:
            problems.append(Problem("split-mismatch", in_fixed[image.name].split, image.name, image.origins[0],
                                    "captions differ from the fixed split's"))
    problems += [Problem("split-mismatch", image.split, image.name, image.origins[0], f"not in {files[1]}")
                 for image in split_images if image.name not in in_source]
    return Source(split_images + test, [str(f) for f in files], problems)


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from err


def _get(entry: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(entry[key], types) or isinstance(entry[key], bool):
        raise DataError(f"{where}: field '{key}' has type {type(entry[key]).__name__}")
    return entry[key]


def read_karpathy(path: str | Path) -> Source:
    """Karpathy-style ``dataset_*.json``: ``images[]`` with ``filename``, ``split`` and ``sentences[].raw``.
    Karpathy's ``restval`` split is training data."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a Karpathy object with 'images'")
    images: dict[tuple[str, str], SourceImage] = {}
    restval = 0
    for i, entry in enumerate(_get(data, "images", list, str(path))):
        where = f"{path.name}: images[{i}]"
        name = _get(entry, "filename", str, where)
        split = _get(entry, "split", str, where)
        restval += split == "restval"
        split = "train" if split == "restval" else split
        if split not in SPLITS:
            raise DataError(f"{where}: split {split!r} is not train, restval, val or test")
        image = images.setdefault((name, split), SourceImage(name, split))
        for j, sentence in enumerate(_get(entry, "sentences", list, where)):
            image.captions.append(_get(sentence, "raw", str, f"{where}.sentences[{j}]"))
            image.origins.append(f"{where}.sentences[{j}]")
    notes = [f"{restval} 'restval' images joined train"] if restval else []
    return Source(list(images.values()), [str(path)], notes=notes)


def split_files(src_dir: str | Path, suffix: str = ".json") -> dict[str, Path]:
    """Files of a folder named by split (``data_train_UCM.json``, ``rsitmd_val.json``): the split is a word of
    the file name. Train and test are required, val is optional; two files for one split is an error."""
    src = Path(src_dir)
    if not src.is_dir():
        raise DataError(f"not a folder: {src}")
    found: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for path in sorted(src.iterdir()):
        if path.suffix == suffix and path.is_file():
            for word in set(re.split(r"[^a-z]+", path.stem.lower())) & set(SPLITS):
                found[word].append(path)
    for split, paths in found.items():
        if len(paths) > 1:
            raise DataError(f"{src}: several {split} files: {', '.join(p.name for p in paths)}")
    for split in ("train", "test"):
        if not found[split]:
            raise DataError(f"{src}: no {split} file (a *{suffix} file with '{split}' as a word of its name)")
    return {split: paths[0] for split, paths in found.items() if paths}


def _split_or_carved(split: str, files: dict[str, Path]) -> str | None:
    """Train images have no split yet when there is no val file: val is carved from them."""
    return None if split == "train" and "val" not in files else split


def read_coco(src_dir: str | Path) -> Source:
    """COCO-captions JSON, one file per split: ``images[]`` (``id``, ``file_name``) and
    ``annotations[]`` (``image_id``, ``caption``); images keep the order of ``images``."""
    files = split_files(src_dir)
    images: list[SourceImage] = []
    for split, path in files.items():
        split = _split_or_carved(split, files)
        data = _load_json(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a COCO object with 'images' and 'annotations'")
        by_id: dict[Any, SourceImage] = {}
        for i, entry in enumerate(_get(data, "images", list, str(path))):
            where = f"{path.name}: images[{i}]"
            image_id = _get(entry, "id", (int, str), where)
            if image_id in by_id:
                raise DataError(f"{where}: image id {image_id!r} listed twice")
            by_id[image_id] = SourceImage(_get(entry, "file_name", str, where), split)
        for i, entry in enumerate(_get(data, "annotations", list, str(path))):
            where = f"{path.name}: annotations[{i}]"
            image_id = _get(entry, "image_id", (int, str), where)
            if image_id not in by_id:
                raise DataError(f"{where}: image_id {image_id!r} is not in 'images'")
            by_id[image_id].captions.append(_get(entry, "caption", str, where))
            by_id[image_id].origins.append(where)
        by_name: dict[str, SourceImage] = {}
        for image in by_id.values():
            merged = by_name.setdefault(image.name, SourceImage(image.name, split))
            merged.captions += image.captions
            merged.origins += image.origins
        images += by_name.values()
    return Source(images, [str(p) for p in files.values()],
                  notes=[] if "val" in files else [f"no val file in {src_dir}: carved from train"])


def read_xvlm_file(path: str | Path, split: str | None) -> list[SourceImage]:
    """One X-VLM/PIR JSON list, train layout (one entry per caption) or eval layout (a caption list per
    image). Images are named by their base name: the ``train/``-style prefixes are folder layout."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    rows = []
    for i, entry in enumerate(data):
        where = f"{path.name}: entry {i}"
        name = os.path.basename(_get(entry, "image", str, where))
        captions = _get(entry, "caption", (str, list), where)
        for j, caption in enumerate([captions] if isinstance(captions, str) else captions):
            if not isinstance(caption, str):
                raise DataError(f"{where}: caption {j} is a {type(caption).__name__}, not text")
            rows.append((name, caption, where if isinstance(captions, str) else f"{where}, caption {j}"))
    return _group(rows, split)


def read_xvlm(src_dir: str | Path) -> Source:
    """A folder of X-VLM/PIR JSON files named by split (``rsitmd_train.json``, ...)."""
    files = split_files(src_dir)
    images = [image for split, path in files.items() for image in read_xvlm_file(path, _split_or_carved(split, files))]
    return Source(images, [str(p) for p in files.values()],
                  notes=[] if "val" in files else [f"no val file in {src_dir}: carved from train"])
