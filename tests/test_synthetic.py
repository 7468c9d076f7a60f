"""Tests for the procedural demo dataset: layout on disk, determinism, stamp and vocabulary (its masks:
test_masks.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import re
import subprocess
import sys
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

MODULE_PATH = pathlib.Path(__file__).resolve().parents[1] / "dataset" / "synthetic.py"


def _load_by_path(name: str) -> ModuleType:
    """Import the module file alone: the `dataset` package __init__ imports torch, which this
    module must not need and these tests must not pay for."""
    spec = importlib.util.spec_from_file_location(name, MODULE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


synthetic = _load_by_path("_synthetic_under_test")
SCENE_CLASSES = synthetic.SCENE_CLASSES
DemoSpec = synthetic.DemoSpec
demo_vocabulary = synthetic.demo_vocabulary
ensure_demo_dataset = synthetic.ensure_demo_dataset

SMALL = DemoSpec(train_per_class=3, val_per_class=1, test_per_class=2, image_size=64, seed=0)
COLOUR_WORDS = {"red", "white", "blue", "yellow", "black"}
COUNT_WORDS = {"two", "three", "four"}
SPLITS = ("train", "val", "test")


def _load(root: pathlib.Path, split: str) -> list[dict[str, Any]]:
    return json.loads((root / f"demo_{split}.json").read_text(encoding="utf-8"))


def _words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def _image_captions(root: pathlib.Path) -> dict[str, list[str]]:
    """All captions of every image over all splits, keyed by file name."""
    captions: dict[str, list[str]] = {}
    for split in SPLITS:
        for entry in _load(root, split):
            texts = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            captions.setdefault(entry["image"], []).extend(texts)
    return captions


def _pixels(root: pathlib.Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / "images" / name), dtype=np.float64)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return ensure_demo_dataset(tmp_path_factory.mktemp("small"), SMALL)


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Enough images per class to see every colour; only a train split."""
    spec = DemoSpec(train_per_class=20, val_per_class=0, test_per_class=0, seed=3)
    return ensure_demo_dataset(tmp_path_factory.mktemp("medium"), spec)


def test_file_counts_and_structure(small: pathlib.Path) -> None:
    n = len(SCENE_CLASSES)
    assert len(list((small / "images").glob("*.png"))) == n * (3 + 1 + 2)
    train = _load(small, "train")
    assert len(train) == n * 3 * 5
    for entry in train:
        assert set(entry) == {"image", "caption", "image_id", "label_name", "label"}
        assert isinstance(entry["caption"], str) and isinstance(entry["image_id"], int)
    for split, per_class in (("val", 1), ("test", 2)):
        entries = _load(small, split)
        assert len(entries) == n * per_class
        for entry in entries:
            assert set(entry) == {"image", "caption", "image_id", "label_name", "label"}
            assert len(entry["caption"]) == 5
            assert all(isinstance(c, str) for c in entry["caption"])
    stamp = json.loads((small / ".complete").read_text())
    assert stamp["spec"]["train_per_class"] == 3 and isinstance(stamp["format_version"], int)


def test_labels_follow_scene_classes(small: pathlib.Path) -> None:
    assert len(SCENE_CLASSES) == 10
    assert all(re.fullmatch(r"[a-z]+", c) for c in SCENE_CLASSES)
    first_seen = list(dict.fromkeys(e["label_name"] for e in _load(small, "train")))
    assert first_seen == list(SCENE_CLASSES)
    for split in SPLITS:
        for entry in _load(small, split):
            assert entry["label"] == SCENE_CLASSES.index(entry["label_name"])


def test_images_exist_with_right_size_and_mode(small: pathlib.Path) -> None:
    for split in SPLITS:
        for entry in _load(small, split):
            assert entry["image"] == f"{entry['label_name']}_{entry['image_id']}.png"
            with Image.open(small / "images" / entry["image"]) as image:
                assert image.size == (64, 64) and image.mode == "RGB"


def test_image_ids_unique_and_consistent(small: pathlib.Path) -> None:
    ids: dict[int, tuple[str, str, int]] = {}
    per_image: dict[int, list[str]] = {}
    for entry in _load(small, "train"):
        key = (entry["image"], entry["label_name"], entry["label"])
        assert ids.setdefault(entry["image_id"], key) == key
        per_image.setdefault(entry["image_id"], []).append(entry["caption"])
    assert all(len(c) == 5 and len(set(c)) > 1 for c in per_image.values())
    other = [e["image_id"] for split in ("val", "test") for e in _load(small, split)]
    assert len(set(other)) == len(other) and not set(other) & set(ids)


def test_captions_are_well_formed_and_state_attributes(medium: pathlib.Path) -> None:
    for captions in _image_captions(medium).values():
        assert len(set(captions)) > 1
        for caption in captions:
            assert re.fullmatch(r"[a-z ,]+\.", caption), caption
            assert 6 <= len(caption.split()) <= 16, caption
            assert set(_words(caption)) & (COLOUR_WORDS | COUNT_WORDS), caption
        words = {w for c in captions for w in _words(c)}
        assert len(words & COLOUR_WORDS) == 1 and len(words & COUNT_WORDS) == 1


def test_deterministic_per_seed(tmp_path: pathlib.Path) -> None:
    spec = DemoSpec(train_per_class=1, val_per_class=1, test_per_class=1, seed=7)
    a = ensure_demo_dataset(tmp_path / "a", spec)
    b = ensure_demo_dataset(tmp_path / "b", spec)
    c = ensure_demo_dataset(tmp_path / "c", DemoSpec(1, 1, 1, seed=8))
    for split in SPLITS:
        name = f"demo_{split}.json"
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    names = sorted(p.name for p in (a / "images").iterdir())
    assert names == sorted(p.name for p in (c / "images").iterdir())
    for name in names:
        assert np.array_equal(_pixels(a, name), _pixels(b, name))
        assert not np.array_equal(_pixels(a, name), _pixels(c, name))


def test_no_two_images_identical(small: pathlib.Path) -> None:
    images = [_pixels(small, p.name).tobytes() for p in (small / "images").iterdir()]
    assert len(set(images)) == len(images)


def _mtimes(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_stamp_skips_complete_and_regenerates_on_change(tmp_path: pathlib.Path) -> None:
    spec = DemoSpec(train_per_class=1, val_per_class=1, test_per_class=1)
    root = ensure_demo_dataset(tmp_path, spec)
    before = _mtimes(root)
    assert ensure_demo_dataset(root, spec) == root
    assert _mtimes(root) == before

    bigger = DemoSpec(train_per_class=2, val_per_class=1, test_per_class=1)
    ensure_demo_dataset(root, bigger)
    assert len(list((root / "images").iterdir())) == len(SCENE_CLASSES) * 4
    assert len(_load(root, "train")) == len(SCENE_CLASSES) * 2 * 5
    assert json.loads((root / ".complete").read_text())["spec"]["train_per_class"] == 2


def test_missing_stamp_regenerates_and_drops_stale_images(tmp_path: pathlib.Path) -> None:
    spec = DemoSpec(train_per_class=1, val_per_class=1, test_per_class=1)
    root = ensure_demo_dataset(tmp_path, spec)
    (root / ".complete").unlink()
    (root / "images" / "stale.png").write_bytes(b"")
    ensure_demo_dataset(root, spec)
    assert (root / ".complete").is_file()
    assert not (root / "images" / "stale.png").exists()
    assert not [p for p in root.rglob("*.tmp")]


def test_vocabulary_covers_captions(small: pathlib.Path) -> None:
    vocabulary = demo_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    lines = (small / "tokenizer" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(lines) == len(set(lines))
    tokens = set(lines)
    assert set(vocabulary) <= tokens
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    assert set(chars) <= tokens and {f"##{c}" for c in chars} <= tokens
    for captions in _image_captions(small).values():
        for caption in captions:
            assert set(_words(caption)) <= set(vocabulary), caption


def _strong_red_fraction(pixels: np.ndarray) -> float:
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return float(((r > 150) & (g < 80) & (b < 80)).mean())


def _colour_of(captions: list[str]) -> str:
    (colour,) = {w for c in captions for w in _words(c)} & COLOUR_WORDS
    return colour


def test_colour_word_matches_pixels(medium: pathlib.Path) -> None:
    by_colour: dict[str, dict[str, list[np.ndarray]]] = {}
    for name, captions in _image_captions(medium).items():
        class_name = name.rsplit("_", 1)[0]
        by_colour.setdefault(class_name, {}).setdefault(_colour_of(captions), []).append(
            _pixels(medium, name))
    for class_name, groups in by_colour.items():
        for pixels in groups.get("red", []):
            assert _strong_red_fraction(pixels) > 0.005, class_name
        for pixels in groups.get("blue", []):
            assert _strong_red_fraction(pixels) < 0.001, class_name

    # On the flat residential ground the image-mean redness alone separates the two colours.
    residential = by_colour["residential"]
    redness = {colour: [float((p[..., 0] - p[..., 1:].mean(axis=-1)).mean())
                        for p in residential[colour]] for colour in ("red", "blue")}
    assert redness["red"] and redness["blue"]
    assert min(redness["red"]) > max(redness["blue"])


def test_module_imports_without_model_libraries() -> None:
    heavy = "{'torch', 'timm', 'transformers'}"
    code = (f"import runpy, sys; runpy.run_path({str(MODULE_PATH)!r}); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_images_are_those_of_format_version_1(tmp_path: pathlib.Path) -> None:
    """Version 2 added the masks and left every image as it was: this digest of the names and pixels was taken
    from version 1's output for the same spec (its PNG files were byte-identical too)."""
    root = ensure_demo_dataset(tmp_path, DemoSpec(train_per_class=2, val_per_class=1, test_per_class=1,
                                                  image_size=64, seed=0))
    digest = hashlib.sha256()
    for path in sorted((root / "images").iterdir()):
        digest.update(path.name.encode())
        digest.update(np.asarray(Image.open(path)).tobytes())
    assert digest.hexdigest() == "a2e4c9036c2b37307e5f6c8beb708c488c5afcaf99866abd1c494f77bd0170d5"
