"""Data pipeline: caption cleaning, image reading, annotation checks, tokenizer, sampler, datasets and loaders.

Everything runs on real files written into ``tmp_path`` (Pillow images, JSON, vocab.txt); the public
RSITMD/RSICD annotation files are used when ``SHARED_DATASETS`` is present.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATASETS
from dataset import create_eval_split, create_train_loader, transforms
from dataset.annotations import DataError, load_eval_annotations, load_train_annotations, scene_label_name
from dataset.captions import pre_caption
from dataset.images import resolve_image_path, load_rgb
from dataset.re_dataset import EvalImageDataset, RetrievalTrainDataset, TrainCollator, seeded_rng
from dataset.samplers import SeededShardSampler
from models.text import BertWordPieceProcessor, TokenizerError, build_tokenizer
from utils.config import load_config
from utils.distributed import DistInfo

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ----------------------------------------------------------------------------- helpers


def noise(size: tuple[int, int], channels: int = 3, seed: int = 0) -> np.ndarray:
    """Random uint8 pixels, (h, w, c) for size = (w, h)."""
    w, h = size
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_image(path: Path, size: tuple[int, int] = (16, 16), mode: str = "RGB", seed: int = 0) -> Path:
    """A real image file; the format follows the extension (.png, .jpg, .tif)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    Image.fromarray(noise(size, channels, seed), mode).save(path)
    return path


def image_bytes(fmt: str, size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(size)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_truncated(path: Path, fmt: str = "JPEG") -> Path:
    """The first half of a real (noisy, so not tiny) image file."""
    data = image_bytes(fmt, (40, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_json(path: Path, data: object) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def train_entry(image: str, caption: str, image_id: object, label: int | None = None) -> dict:
    entry = {"image": image, "caption": caption, "image_id": image_id}
    if label is not None:
        entry["label"] = label
    return entry


def check_eval_consistent(ann) -> None:
    """img2txt/txt2img are inverse and number the captions consecutively in image order."""
    assert len(ann.img2txt) == len(ann.image_paths)
    assert [t for ids in ann.img2txt for t in ids] == list(range(len(ann.texts)))
    assert len(ann.txt2img) == len(ann.texts)
    for image, ids in enumerate(ann.img2txt):
        assert ids, f"image {image} has no caption"
        for t in ids:
            assert ann.txt2img[t] == image


def write_vocab(folder: Path, words: list[str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    lines = SPECIAL + words
    (folder / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


# ----------------------------------------------------------------------------- 1. pre_caption


@pytest.mark.parametrize("raw, expected", [
    ("A Large WHITE Building", "a large white building"),
    ("there are, indeed. it's a \"big\" (red) house!?", "there are indeed its a big red house"),
    ("a*b#c:d;e~f", "abcdef"),
    ("black-and-white roofs / grey roads", "black and white roofs grey roads"),
    ("a green-roofed/flat building", "a green roofed flat building"),
    ("<person> walks near the <PERSON>", "person walks near the person"),
    ("  many    spaces   here \n", "many spaces here"),
    ("dense  ,  trees", "dense trees"),
    ("it\u2019s green", "it\u2019s green"),  # the typographic apostrophe is not in X-VLM's list
])
def test_pre_caption_cleans_like_xvlm(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_cuts_to_max_words() -> None:
    assert pre_caption("One two, three four five.", max_words=3) == "one two three"
    assert pre_caption("one two three", max_words=3) == "one two three"
    # words are counted after cleaning: "a - b" is three words only before the dash is dropped
    assert pre_caption("a  -  b c d", max_words=2) == "a b"
    long = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(long).split(" ") == [f"w{i}" for i in range(30)]


@pytest.mark.parametrize("raw", ["", "   ", "\n", "...", "?!,.", "( )", "- / -", "\"'~"])
def test_pre_caption_rejects_empty(raw: str) -> None:
    with pytest.raises(ValueError):
        pre_caption(raw)


# ----------------------------------------------------------------------------- 2. image reading


@pytest.mark.parametrize("name, mode", [
    ("scene.tif", "RGB"), ("scene.jpg", "RGB"), ("scene.png", "RGB"),
    ("gray.png", "L"), ("alpha.png", "RGBA"), ("gray.tif", "L"), ("gray.jpg", "L"),
])
def test_load_rgb_returns_rgb_of_the_right_size(tmp_path: Path, name: str, mode: str) -> None:
    path = write_image(tmp_path / name, size=(13, 7), mode=mode)
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert image.size == (13, 7)
    pixels = np.asarray(image)
    assert pixels.shape == (7, 13, 3)
    if mode == "L":  # grey replicated into the three channels
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    if not name.endswith(".jpg"):  # lossless formats keep the pixels exactly
        source = noise((13, 7), {"L": 1, "RGB": 3, "RGBA": 4}[mode])
        expected = np.repeat(source[..., None], 3, axis=2) if mode == "L" else source[..., :3]
        assert np.array_equal(pixels, expected)


@pytest.mark.parametrize("fmt, name", [("JPEG", "cut.jpg"), ("PNG", "cut.png"), ("TIFF", "cut.tif")])
def test_load_rgb_fails_on_truncated_file(tmp_path: Path, fmt: str, name: str) -> None:
    path = write_truncated(tmp_path / name, fmt)
    with pytest.raises(OSError):
        load_rgb(path)


def test_load_rgb_fails_on_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.tif"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(OSError):  # UnidentifiedImageError is an OSError
        load_rgb(path)


# ----------------------------------------------------------------------------- 3. path resolution


def test_resolve_image_path_prefers_the_joined_path(tmp_path: Path) -> None:
    nested = write_image(tmp_path / "train" / "a_1.tif")
    flat = write_image(tmp_path / "a_1.tif")
    assert resolve_image_path(str(tmp_path), "train/a_1.tif") == str(nested)
    nested.unlink()
    assert resolve_image_path(str(tmp_path), "train/a_1.tif") == str(flat)
    assert resolve_image_path(str(tmp_path), "a_1.tif") == str(flat)
    flat.unlink()
    assert resolve_image_path(str(tmp_path), "train/a_1.tif") is None
    assert resolve_image_path(str(tmp_path), "a_1.tif") is None


def test_resolve_image_path_ignores_directories(tmp_path: Path) -> None:
    (tmp_path / "train" / "b_2.tif").mkdir(parents=True)
    flat = write_image(tmp_path / "b_2.tif")
    assert resolve_image_path(str(tmp_path), "train/b_2.tif") == str(flat)


# ----------------------------------------------------------------------------- 4. train annotations


def test_image_ids_are_remapped_in_order_of_first_appearance(tmp_path: Path) -> None:
    for name in ("x_1.png", "y_1.png"):
        write_image(tmp_path / name)
    file = write_json(tmp_path / "train.json", [
        train_entry("x_1.png", "first x", 539), train_entry("y_1.png", "first y", 12),
        train_entry("x_1.png", "second x", 539), train_entry("y_1.png", "second y", 12),
    ])
    ann = load_train_annotations([file], str(tmp_path), 30)
    assert ann.image_index == [0, 1, 0, 1]
    assert ann.captions == ["first x", "first y", "second x", "second y"]
    assert ann.image_paths == [str(tmp_path / n) for n in ("x_1.png", "y_1.png", "x_1.png", "y_1.png")]
    assert ann.skipped == 0


def test_string_image_ids_are_remapped(tmp_path: Path) -> None:
    for name in ("a_1.png", "b_1.png", "c_1.png"):
        write_image(tmp_path / name)
    file = write_json(tmp_path / "train.json", [
        train_entry("c_1.png", "c", "img_zeta"), train_entry("a_1.png", "a", "img_alpha"),
        train_entry("c_1.png", "c again", "img_zeta"), train_entry("b_1.png", "b", "img_beta"),
    ])
    assert load_train_annotations([file], str(tmp_path), 30).image_index == [0, 1, 0, 2]


def test_two_train_files_are_concatenated(tmp_path: Path) -> None:
    for name in ("a_1.png", "b_1.png", "c_1.png"):
        write_image(tmp_path / name)
    first = write_json(tmp_path / "one.json", [train_entry("a_1.png", "a one", 7, 0),
                                               train_entry("b_1.png", "b one", 3, 1)])
    second = write_json(tmp_path / "two.json", [train_entry("c_1.png", "c two", 100, 2),
                                                train_entry("a_1.png", "a two", 7, 0)])
    ann = load_train_annotations([first, second], str(tmp_path), 30)
    assert ann.captions == ["a one", "b one", "c two", "a two"]
    assert ann.image_index == [0, 1, 2, 0]
    assert ann.labels == [0, 1, 2, 0]


def test_labels_come_from_the_label_field(tmp_path: Path) -> None:
    for name in ("forest_1.png", "forest_2.png"):
        write_image(tmp_path / name)
    # deliberately not what the file names would give: the file's labels win
    file = write_json(tmp_path / "train.json", [
        train_entry("forest_1.png", "one", 1, 7), train_entry("forest_2.png", "two", 2, 3),
        train_entry("forest_1.png", "three", 1, 7),
    ])
    ann = load_train_annotations([file], str(tmp_path), 30)
    assert ann.labels == [7, 3, 7]
    assert ann.label_names == {}


def test_labels_are_derived_from_file_name_prefixes(tmp_path: Path) -> None:
    names = ["denseresidential_12.tif", "forest_4.tif", "denseresidential_3.tif", "00017.jpg", "00018.jpg",
             "storage_tanks_9.tif", "forest_4.tif"]
    for name in set(names):
        write_image(tmp_path / name)
    file = write_json(tmp_path / "train.json",
                      [train_entry(f"train/{n}", f"caption {i}", n) for i, n in enumerate(names)])
    ann = load_train_annotations([file], str(tmp_path), 30)
    assert ann.labels == [0, 1, 0, 2, 3, 4, 1]
    assert ann.label_names == {"denseresidential": 0, "forest": 1, "00017.jpg": 2, "00018.jpg": 3,
                               "storage_tanks": 4}


@pytest.mark.parametrize("image, expected", [
    ("train/denseresidential_12.tif", "denseresidential"),
    ("denseresidential_3.tif", "denseresidential"),
    ("val/storage_tanks_7.jpg", "storage_tanks"),
    ("val/00017.jpg", "00017.jpg"),
    ("bridge.tif", "bridge.tif"),
])
def test_scene_label_name(image: str, expected: str) -> None:
    assert scene_label_name(image) == expected


@pytest.mark.parametrize("first_has_label", [True, False])
def test_mixing_entries_with_and_without_label_is_an_error(tmp_path: Path, first_has_label: bool) -> None:
    write_image(tmp_path / "a_1.png")
    entries = [train_entry("a_1.png", "one", 1, 0), train_entry("a_1.png", "two", 1, 0),
               train_entry("a_1.png", "three", 1)]
    if not first_has_label:
        entries = [train_entry("a_1.png", "one", 1), train_entry("a_1.png", "two", 1),
                   train_entry("a_1.png", "three", 1, 0)]
    file = write_json(tmp_path / "train.json", entries)
    with pytest.raises(DataError) as err:
        load_train_annotations([file], str(tmp_path), 30)
    assert file in str(err.value) and "entry 2" in str(err.value) and "label" in str(err.value)


def test_train_captions_are_cleaned_and_cut(tmp_path: Path) -> None:
    write_image(tmp_path / "a_1.png")
    file = write_json(tmp_path / "train.json", [train_entry("a_1.png", "Many Green-Trees, near a river.", 1)])
    assert load_train_annotations([file], str(tmp_path), 3).captions == ["many green trees"]


# ----------------------------------------------------------------------------- 5. errors and skipping


def _one_good_then(tmp_path: Path, bad: object) -> str:
    """A train file whose entries 0 and 1 are fine and entry 2 is ``bad``."""
    write_image(tmp_path / "good_1.png")
    return write_json(tmp_path / "train.json", [train_entry("good_1.png", "fine", 1),
                                                train_entry("good_1.png", "fine too", 1), bad])


def test_missing_image_names_both_paths_and_the_entry(tmp_path: Path) -> None:
    file = _one_good_then(tmp_path, train_entry("train/lost_5.tif", "a lost image", 2))
    with pytest.raises(DataError) as err:
        load_train_annotations([file], str(tmp_path), 30)
    message = str(err.value)
    assert file in message and "entry 2" in message
    assert os.path.join(str(tmp_path), "train/lost_5.tif") in message
    assert os.path.join(str(tmp_path), "lost_5.tif") in message


@pytest.mark.parametrize("bad, words", [
    (train_entry("good_1.png", " ...!? ", 1), ["caption"]),
    ({"caption": "no image", "image_id": 1}, ["missing", "image"]),
    ({"image": "good_1.png", "image_id": 1}, ["missing", "caption"]),
    ({"image": "good_1.png", "caption": "no id"}, ["missing", "image_id"]),
    ({"image": "good_1.png", "caption": 5, "image_id": 1}, ["caption", "int"]),
    ({"image": ["good_1.png"], "caption": "x", "image_id": 1}, ["image", "list"]),
    ({"image": "good_1.png", "caption": "x", "image_id": 1.5}, ["image_id", "float"]),
    ({"image": "good_1.png", "caption": "x", "image_id": True}, ["image_id", "bool"]),
    ({"image": "good_1.png", "caption": "x", "image_id": None}, ["image_id", "NoneType"]),
    (["good_1.png", "x", 1], ["object", "list"]),
])
@pytest.mark.parametrize("skip_bad", [False, True])
def test_malformed_train_entry_names_file_and_entry(tmp_path: Path, bad: object, words: list[str],
                                                    skip_bad: bool) -> None:
    file = _one_good_then(tmp_path, bad)
    with pytest.raises(DataError) as err:
        load_train_annotations([file], str(tmp_path), 30, skip_bad=skip_bad)
    message = str(err.value)
    assert file in message and "entry 2" in message
    for word in words:
        assert word in message


def test_wrong_label_type_is_an_error(tmp_path: Path) -> None:
    write_image(tmp_path / "good_1.png")
    file = write_json(tmp_path / "train.json", [train_entry("good_1.png", "fine", 1, 0),
                                                {"image": "good_1.png", "caption": "x", "image_id": 1,
                                                 "label": "forest"}])
    with pytest.raises(DataError, match="entry 1.*label.*str"):
        load_train_annotations([file], str(tmp_path), 30)


@pytest.mark.parametrize("content, words", [
    ({"image": "a.png", "caption": "x", "image_id": 1}, ["list", "dict"]),
    ("a string", ["list", "str"]),
])
def test_annotation_file_must_hold_a_list(tmp_path: Path, content: object, words: list[str]) -> None:
    file = write_json(tmp_path / "ann.json", content)
    for load in (lambda: load_train_annotations([file], str(tmp_path), 30),
                 lambda: load_eval_annotations(file, str(tmp_path), 30)):
        with pytest.raises(DataError) as err:
            load()
        assert file in str(err.value)
        for word in words:
            assert word in str(err.value)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "broken.json"
    file.write_text('[{"image": "a.png", "caption": "x",', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as err:
        load_train_annotations([str(file)], str(tmp_path), 30)
    assert str(file) in str(err.value)
    with pytest.raises(DataError, match="not valid JSON"):
        load_eval_annotations(str(file), str(tmp_path), 30)


def test_missing_annotation_file_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "train.json")
    with pytest.raises(DataError, match="not found") as err:
        load_train_annotations([missing], str(tmp_path), 30)
    assert missing in str(err.value)
    with pytest.raises(DataError, match="not found") as err:
        load_eval_annotations(missing, str(tmp_path), 30)
    assert missing in str(err.value)


def test_train_skips_missing_and_undecodable_images(tmp_path: Path) -> None:
    write_image(tmp_path / "good_1.png")
    write_image(tmp_path / "other_2.tif")
    write_truncated(tmp_path / "broken_1.jpg")
    file = write_json(tmp_path / "train.json", [
        train_entry("train/good_1.png", "good one", 10),
        train_entry("train/lost_1.png", "lost a", 11),
        train_entry("train/broken_1.jpg", "broken a", 12),
        train_entry("train/other_2.tif", "good two", 13),
        train_entry("train/lost_1.png", "lost b", 11),
        train_entry("train/broken_1.jpg", "broken b", 12),
        train_entry("train/good_1.png", "good one again", 10),
    ])
    with pytest.raises(DataError, match="entry 1"):
        load_train_annotations([file], str(tmp_path), 30)
    ann = load_train_annotations([file], str(tmp_path), 30, skip_bad=True)
    assert ann.skipped == 4
    assert ann.captions == ["good one", "good two", "good one again"]
    assert ann.image_index == [0, 1, 0]  # contiguous over the kept images only
    assert ann.labels == [0, 1, 0]
    assert ann.image_paths == [str(tmp_path / "good_1.png"), str(tmp_path / "other_2.tif"),
                               str(tmp_path / "good_1.png")]


def test_skipping_keeps_raising_on_empty_caption(tmp_path: Path) -> None:
    write_image(tmp_path / "good_1.png")
    file = write_json(tmp_path / "train.json", [train_entry("good_1.png", "fine", 1),
                                                train_entry("lost_1.png", "gone", 2),
                                                train_entry("good_1.png", "?!", 1)])
    with pytest.raises(DataError, match="entry 2.*empty caption"):
        load_train_annotations([file], str(tmp_path), 30, skip_bad=True)
    eval_file = write_json(tmp_path / "test.json", [{"image": "good_1.png", "caption": ["fine", "..."]}])
    with pytest.raises(DataError, match="entry 0, caption 1.*empty caption"):
        load_eval_annotations(eval_file, str(tmp_path), 30, skip_bad=True)


def test_skipping_everything_is_still_an_error(tmp_path: Path) -> None:
    file = write_json(tmp_path / "train.json", [train_entry("lost_1.png", "gone", 1)])
    with pytest.raises(DataError, match="no usable"):
        load_train_annotations([file], str(tmp_path), 30, skip_bad=True)
    eval_file = write_json(tmp_path / "test.json", [{"image": "lost_1.png", "caption": ["gone"]}])
    with pytest.raises(DataError, match="no usable"):
        load_eval_annotations(eval_file, str(tmp_path), 30, skip_bad=True)


def test_eval_skips_images_with_their_captions(tmp_path: Path) -> None:
    write_image(tmp_path / "a_1.png")
    write_image(tmp_path / "c_1.tif")
    write_image(tmp_path / "e_1.jpg")
    write_truncated(tmp_path / "d_1.png", "PNG")
    file = write_json(tmp_path / "test.json", [
        {"image": "test/a_1.png", "caption": ["a one", "a two", "a three"]},
        {"image": "test/b_1.png", "caption": ["b one", "b two"]},
        {"image": "test/c_1.tif", "caption": ["c one", "c two", "c three", "c four", "c five"]},
        {"image": "test/d_1.png", "caption": ["d one"]},
        {"image": "test/e_1.jpg", "caption": "e only"},
    ])
    with pytest.raises(DataError) as err:
        load_eval_annotations(file, str(tmp_path), 30)
    assert "entry 1" in str(err.value) and os.path.join(str(tmp_path), "b_1.png") in str(err.value)
    ann = load_eval_annotations(file, str(tmp_path), 30, skip_bad=True)
    assert ann.skipped == 2
    assert ann.image_paths == [str(tmp_path / "a_1.png"), str(tmp_path / "c_1.tif"), str(tmp_path / "e_1.jpg")]
    assert ann.texts == ["a one", "a two", "a three", "c one", "c two", "c three", "c four", "c five", "e only"]
    assert ann.img2txt == [[0, 1, 2], [3, 4, 5, 6, 7], [8]]
    check_eval_consistent(ann)


@pytest.mark.parametrize("bad, words", [
    ({"caption": ["x"]}, ["missing", "image"]),
    ({"image": "a_1.png"}, ["missing", "caption"]),
    ({"image": "a_1.png", "caption": []}, ["non-empty list"]),
    ({"image": "a_1.png", "caption": ["fine", 3]}, ["list of strings"]),
    ({"image": "a_1.png", "caption": 3}, ["caption", "int"]),
    ({"image": 3, "caption": ["x"]}, ["image", "int"]),
])
def test_malformed_eval_entry_names_file_and_entry(tmp_path: Path, bad: dict, words: list[str]) -> None:
    write_image(tmp_path / "a_1.png")
    file = write_json(tmp_path / "test.json", [{"image": "a_1.png", "caption": ["fine"]}, bad])
    with pytest.raises(DataError) as err:
        load_eval_annotations(file, str(tmp_path), 30, skip_bad=True)
    assert file in str(err.value) and "entry 1" in str(err.value)
    for word in words:
        assert word in str(err.value)


# ----------------------------------------------------------------------------- 6. eval annotations


def test_eval_annotations_with_5_and_3_captions(tmp_path: Path) -> None:
    entries = []
    for i, count in enumerate([5, 3, 5, 3, 1]):
        write_image(tmp_path / f"scene_{i}.tif", seed=i)
        entries.append({"image": f"test/scene_{i}.tif", "caption": [f"Scene {i}, caption {j}." for j in range(count)]})
    file = write_json(tmp_path / "test.json", entries)
    ann = load_eval_annotations(file, str(tmp_path), 30)
    check_eval_consistent(ann)
    assert [len(ids) for ids in ann.img2txt] == [5, 3, 5, 3, 1]
    assert ann.img2txt[1] == [5, 6, 7] and ann.img2txt[2] == [8, 9, 10, 11, 12]
    assert ann.texts[6] == "scene 1 caption 1"
    assert ann.txt2img == [0] * 5 + [1] * 3 + [2] * 5 + [3] * 3 + [4]
    assert ann.image_paths == [str(tmp_path / f"scene_{i}.tif") for i in range(5)]
    assert ann.skipped == 0


def test_eval_string_caption_is_a_one_caption_list(tmp_path: Path) -> None:
    write_image(tmp_path / "a_1.png")
    write_image(tmp_path / "b_1.png")
    file = write_json(tmp_path / "test.json", [{"image": "a_1.png", "caption": "A Red Roof."},
                                               {"image": "b_1.png", "caption": ["one", "two"]}])
    ann = load_eval_annotations(file, str(tmp_path), 30)
    assert ann.texts == ["a red roof", "one", "two"]
    assert ann.img2txt == [[0], [1, 2]]
    assert ann.txt2img == [0, 1, 1]


# ----------------------------------------------------------------------------- 7. public annotation files


def _flat_image_folder(root: Path, json_files: list[Path]) -> Path:
    """One tiny real image per distinct basename (TIFF bytes for .tif, JPEG for .jpg), written once and copied."""
    folder = root / "images"
    folder.mkdir()
    data = {".tif": image_bytes("TIFF"), ".jpg": image_bytes("JPEG"), ".png": image_bytes("PNG")}
    names: set[str] = set()
    for file in json_files:
        names |= {os.path.basename(e["image"]) for e in json.loads(file.read_text(encoding="utf-8"))}
    for name in names:
        (folder / name).write_bytes(data[os.path.splitext(name)[1].lower()])
    return folder


@pytest.fixture(scope="module")
def rsitmd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = SHARED_DATASETS / "RSITMD" / "finetune_json"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not available")
    files = [folder / "rsitmd_train.json", folder / "rsitmd_test.json"]
    return folder, _flat_image_folder(tmp_path_factory.mktemp("rsitmd"), files)


def test_rsitmd_test_file(rsitmd: tuple[Path, Path]) -> None:
    folder, images = rsitmd
    raw = json.loads((folder / "rsitmd_test.json").read_text(encoding="utf-8"))
    assert all(e["image"].startswith("test/") for e in raw)  # the flat folder is really needed
    ann = load_eval_annotations(str(folder / "rsitmd_test.json"), str(images), 30)
    assert len(ann.image_paths) == 452 and len(ann.texts) == 2260
    assert all(len(ids) == 5 for ids in ann.img2txt)
    check_eval_consistent(ann)
    assert [os.path.basename(p) for p in ann.image_paths] == [os.path.basename(e["image"]) for e in raw]
    assert all(os.path.dirname(p) == str(images) for p in ann.image_paths)
    assert load_rgb(ann.image_paths[0]).size == (8, 8)


def test_rsitmd_short_low_weights(rsitmd: tuple[Path, Path]) -> None:
    """fisvl-method.md §11 Q1: mean 10.25 words, threshold 7.18, 23.9 % of 17,175 captions get 0.95."""
    folder, images = rsitmd
    file = folder / "rsitmd_train.json"
    raw = json.loads(file.read_text(encoding="utf-8"))
    assert not any("length" in entry for entry in raw)
    ann = load_train_annotations([str(file)], str(images), 30)
    assert ann.weight_source == ("rule short_low: mean 10.25 words, threshold 7.18 words, "
                                 "23.9 % of 17175 captions get 0.95")
    weights = np.asarray(ann.caption_weights)
    assert len(weights) == 17175 and set(weights.tolist()) == {0.95, 1.0}
    assert int((weights == 0.95).sum()) == 4099
    words = np.array([len(c.split(" ")) for c in ann.captions])
    assert words.sum() == 176106  # mean 10.2536
    assert np.array_equal(weights == 0.95, words < 0.7 * words.mean())
    clip = np.asarray(load_train_annotations([str(file)], str(images), 30,
                                             caption_weight={"rule": "clip", "avg_ratio": 0.7,
                                                             "low": 0.95}).caption_weights)
    assert clip.min() == 0.95 and clip.max() == 1.0 and clip.mean() == pytest.approx(0.97307, abs=1e-5)


def test_rsitmd_train_file_labels_match_name_prefixes(rsitmd: tuple[Path, Path], tmp_path: Path) -> None:
    folder, images = rsitmd
    raw = json.loads((folder / "rsitmd_train.json").read_text(encoding="utf-8"))
    ann = load_train_annotations([str(folder / "rsitmd_train.json")], str(images), 30)
    assert len(ann.captions) == 17175
    assert len(set(ann.image_index)) == 3435 and sorted(set(ann.image_index)) == list(range(3435))
    assert len(set(ann.labels)) == 33
    assert ann.labels == [e["label"] for e in raw]
    assert Counter(Counter(ann.image_index).values()) == {5: 3435}
    # one image index per image file and vice versa
    assert len(set(zip(ann.image_index, ann.image_paths))) == 3435 == len(set(ann.image_paths))

    unlabelled = write_json(tmp_path / "no_labels.json",
                            [{k: v for k, v in e.items() if k not in ("label", "label_name")} for e in raw])
    derived = load_train_annotations([unlabelled], str(images), 30)
    assert derived.captions == ann.captions and derived.image_index == ann.image_index
    assert len(derived.label_names) == 33
    mapping: dict[int, set[int]] = {}
    for file_label, name_label in zip(ann.labels, derived.labels):
        mapping.setdefault(file_label, set()).add(name_label)
    assert all(len(targets) == 1 for targets in mapping.values()), "a file label covers several name prefixes"
    renaming = {label: targets.pop() for label, targets in mapping.items()}
    assert len(set(renaming.values())) == len(renaming) == 33, "two file labels share a name prefix"


def test_rsicd_val_file(tmp_path: Path) -> None:
    file = SHARED_DATASETS / "RSICD" / "finetune_json" / "rsicd_val.json"
    if not file.is_file():
        pytest.skip(f"{file} is not available")
    raw = json.loads(file.read_text(encoding="utf-8"))
    assert not any("label" in e for e in raw)
    images = _flat_image_folder(tmp_path, [file])
    ann = load_eval_annotations(str(file), str(images), 30)
    assert len(ann.image_paths) == 1966 and len(ann.texts) == 9830
    assert all(len(ids) == 5 for ids in ann.img2txt)
    check_eval_consistent(ann)
    assert np.asarray(load_rgb(ann.image_paths[0])).shape == (8, 8, 3)


# ----------------------------------------------------------------------------- 8. tokenizer


def test_tokenizer_from_a_folder_with_only_vocab(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    lines = write_vocab(folder, ["the", "river", "bank", "green", "trees", "##s", "a"])
    assert [p.name for p in folder.iterdir()] == ["vocab.txt"]
    tokenizer = build_tokenizer(str(folder))
    assert tokenizer.vocab_size == len(lines)
    for number, token in enumerate(lines):
        assert tokenizer.convert_tokens_to_ids(token) == number
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id] == [0, 1, 2, 3, 4]
    # lower-cased, WordPiece-split (banks -> bank ##s), unknown words -> [UNK], wrapped in [CLS] ... [SEP]
    assert tokenizer("The river banks green trees zebra")["input_ids"] == [2, 5, 6, 7, 10, 8, 9, 1, 3]


def test_tokenizer_without_vocab_names_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "not_a_bert"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerError) as err:
        build_tokenizer(str(folder))
    assert str(folder) in str(err.value) and "vocab.txt" in str(err.value)
    with pytest.raises(TokenizerError):
        build_tokenizer(str(tmp_path / "does_not_exist"))


def test_demo_vocab_covers_the_demo_captions(demo_root: Path) -> None:
    tokenizer = build_tokenizer(str(demo_root / "tokenizer"))
    vocab = (demo_root / "tokenizer" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert tokenizer.vocab_size == len(vocab)
    captions: list[str] = []
    for split in ("train", "val", "test"):
        for entry in json.loads((demo_root / f"demo_{split}.json").read_text(encoding="utf-8")):
            captions += entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
    assert len(captions) > 100
    for caption in captions:
        cleaned = pre_caption(caption)
        ids = tokenizer(cleaned)["input_ids"]
        assert tokenizer.unk_token_id not in ids, (cleaned, tokenizer.convert_ids_to_tokens(ids))
        # every caption word is a whole token of the demo vocabulary, not a character spelling
        assert tokenizer.convert_ids_to_tokens(ids)[1:-1] == cleaned.split(" "), cleaned


# ----------------------------------------------------------------------------- 9. sampler


def test_sampler_is_a_function_of_seed_and_epoch() -> None:
    sampler = SeededShardSampler(50, seed=7)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 50
    assert sorted(i for i, _ in epoch0) == list(range(50))
    assert list(sampler) == epoch0
    assert list(SeededShardSampler(50, seed=7)) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(i for i, _ in epoch1) == list(range(50))
    assert [i for i, _ in epoch1] != [i for i, _ in epoch0]
    assert {s for _, s in epoch1}.isdisjoint({s for _, s in epoch0})
    other = SeededShardSampler(50, seed=8)
    assert list(other) != epoch0
    fresh = SeededShardSampler(50, seed=7)
    fresh.set_epoch(1)
    assert list(fresh) == epoch1  # a resumed run reproduces the epoch
    assert len({s for _, s in epoch0}) == 50 and all(0 <= s < 2**62 for _, s in epoch0)


@pytest.mark.parametrize("n", [40, 41, 1001])
@pytest.mark.parametrize("epoch", [0, 3])
def test_sampler_shards_over_two_processes(n: int, epoch: int) -> None:
    single = SeededShardSampler(n, seed=5)
    single.set_epoch(epoch)
    whole = list(single)
    ranks = []
    for rank in range(2):
        sampler = SeededShardSampler(n, seed=5, rank=rank, world_size=2)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
        assert len(ranks[-1]) == len(sampler) == n // 2
    indices = [{i for i, _ in part} for part in ranks]
    assert indices[0].isdisjoint(indices[1])
    assert indices[0] | indices[1] == {i for i, _ in whole[: n - n % 2]}
    seed_of = dict(whole)
    for part in ranks:
        for index, seed in part:
            assert seed_of[index] == seed


def test_sampler_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError):
        SeededShardSampler(1, seed=0, rank=0, world_size=2)


# ----------------------------------------------------------------------------- 10. augmentation determinism

ALL_FIELDS = ("image_idx", "label", "caption_weight")


@pytest.fixture()
def train_dataset(tmp_path: Path) -> RetrievalTrainDataset:
    write_image(tmp_path / "a_1.png", size=(48, 40), seed=1)
    write_image(tmp_path / "b_1.tif", size=(40, 48), seed=2)
    file = write_json(tmp_path / "train.json", [train_entry("a_1.png", "first", 1),
                                                train_entry("b_1.tif", "second", 2)])
    ann = load_train_annotations([file], str(tmp_path), 30)
    return RetrievalTrainDataset(ann, transforms.train_transform({"dataset_kind": "re", "image_res": 32}),
                                 fields=ALL_FIELDS)


def test_augmentation_depends_only_on_the_key(train_dataset: RetrievalTrainDataset) -> None:
    first = train_dataset[(0, 123)]
    assert first["image"].shape == (3, 32, 32) and first["image"].dtype == torch.float32
    assert (first["caption"], first["image_idx"], first["label"]) == ("first", 0, 0)
    torch.manual_seed(999)  # the caller's generators must not matter
    random.seed(999)
    np.random.seed(999)
    again = train_dataset[(0, 123)]
    assert torch.equal(first["image"], again["image"])
    different = [train_dataset[(0, seed)]["image"] for seed in (124, 125, 2**61 + 1)]
    assert all(not torch.equal(first["image"], image) for image in different)
    assert torch.equal(train_dataset[1]["image"], train_dataset[(1, 1)]["image"])
    assert train_dataset[(1, 123)]["image_idx"] == 1


def test_dataset_carries_the_requested_fields(train_dataset: RetrievalTrainDataset) -> None:
    """An item has image, caption and exactly the fields asked for; a field no data provides is an error."""
    assert set(train_dataset[(0, 1)]) == {"image", "caption", *ALL_FIELDS}
    assert train_dataset[(0, 1)]["caption_weight"] == 1.0
    plain = RetrievalTrainDataset(train_dataset.ann, train_dataset.transform)
    assert set(plain[(1, 1)]) == {"image", "caption", "image_idx"}
    assert torch.equal(plain[(1, 1)]["image"], train_dataset[(1, 1)]["image"])
    with pytest.raises(DataError, match=r"sample field\(s\) \['depth'\]"):
        RetrievalTrainDataset(train_dataset.ann, train_dataset.transform, fields=("image_idx", "depth"))
    with pytest.raises(DataError, match="'mask' needs segmentation masks, and the config sets no mask_root"):
        RetrievalTrainDataset(train_dataset.ann, train_dataset.transform, fields=("image_idx", "mask"))


def test_augmentation_leaves_the_callers_rng_alone(train_dataset: RetrievalTrainDataset) -> None:
    torch.manual_seed(2024)
    random.seed(2024)
    np.random.seed(2024)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    for key in [(0, 1), (1, 2**40), 0]:
        train_dataset[key]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    # and the seeded block itself restores the generators even when it fails
    with pytest.raises(RuntimeError):
        with seeded_rng(5):
            torch.rand(3), random.random(), np.random.rand()
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


def test_corrupt_image_fails_in_the_datasets_with_its_path(tmp_path: Path) -> None:
    write_image(tmp_path / "a_1.png")
    broken = write_truncated(tmp_path / "b_1.jpg")
    file = write_json(tmp_path / "train.json", [train_entry("a_1.png", "fine", 1), train_entry("b_1.jpg", "bad", 2)])
    ann = load_train_annotations([file], str(tmp_path), 30)  # decoding is only checked when skipping
    dataset = RetrievalTrainDataset(ann, transforms.train_transform({"dataset_kind": "re", "image_res": 16}))
    assert dataset[0]["image"].shape == (3, 16, 16)
    with pytest.raises(DataError, match="train caption 1") as err:
        dataset[(1, 0)]
    assert str(broken) in str(err.value)
    eval_file = write_json(tmp_path / "test.json", [{"image": "a_1.png", "caption": ["x"]},
                                                    {"image": "b_1.jpg", "caption": ["y"]}])
    eval_dataset = EvalImageDataset(load_eval_annotations(eval_file, str(tmp_path), 30),
                                    transforms.test_transform({"image_res": 16}))
    image, index = eval_dataset[0]
    assert image.shape == (3, 16, 16) and index == 0
    with pytest.raises(DataError, match="eval image 1"):
        eval_dataset[1]


def test_collator_stacks_and_pads(tmp_path: Path) -> None:
    processor = processor_for(tmp_path / "bert", ["a", "red", "roof", "green", "field", "near", "river"], max_tokens=5)
    items = [{"image": torch.full((3, 4, 4), float(k)), "caption": c, "image_idx": k, "label": 10 + k,
              "caption_weight": 1.0} for k, c in enumerate(["a red roof", "a green field near a river", "red"])]
    batch = TrainCollator(processor)(items)
    assert set(batch) == {"images", "text", "image_idx", "label", "caption_weight"}
    assert set(batch["text"]) == {"input_ids", "attention_mask"}
    assert batch["images"].shape == (3, 3, 4, 4) and torch.equal(batch["images"][2], items[2]["image"])
    assert batch["text"]["input_ids"].shape == (3, 5)  # the longest caption is cut to max_tokens
    assert batch["text"]["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["text"]["input_ids"][2].tolist() == [2, processor.tokenizer.convert_tokens_to_ids("red"), 3, 0, 0]
    assert batch["image_idx"].tolist() == [0, 1, 2] and batch["label"].tolist() == [10, 11, 12]
    assert batch["caption_weight"].dtype == torch.float32
    only_ids = TrainCollator(processor)([{k: item[k] for k in ("image", "caption", "image_idx")} for item in items])
    assert set(only_ids) == {"images", "text", "image_idx"}  # the collator carries the fields the items have


def processor_for(folder: Path, words: list[str], max_tokens: int = 40) -> BertWordPieceProcessor:
    write_vocab(folder, words)
    return BertWordPieceProcessor.from_folder(str(folder), max_tokens, max_words=30)


def text_processor(config: dict) -> BertWordPieceProcessor:
    """The text processor a BERT model of ``config`` builds."""
    return BertWordPieceProcessor.from_folder(config["text_encoder"], config["max_tokens"], config["max_words"])


# ----------------------------------------------------------------------------- 11. loaders


def test_train_loader_end_to_end(tiny_config_path: Path) -> None:
    config = load_config(tiny_config_path)
    processor = text_processor(config)
    tokenizer = processor.tokenizer
    loader = create_train_loader(config, DistInfo(), seed=0, device=torch.device("cpu"),
                                 transform=transforms.train_transform(config), text_processor=processor,
                                 fields=ALL_FIELDS)
    captions = sum(len(json.loads(Path(f).read_text(encoding="utf-8"))) for f in config["train_file"])
    batch_size = config["batch_size_train"]
    assert captions % batch_size != 0  # so that drop_last matters here
    assert len(loader) == captions // batch_size
    seen = 0
    labels: set[int] = set()
    for batch in loader:
        assert set(batch) == {"images", "text", *ALL_FIELDS}
        assert batch["images"].shape == (batch_size, 3, 32, 32)
        text = batch["text"]
        assert text["input_ids"].shape == text["attention_mask"].shape
        assert text["input_ids"].shape[0] == batch_size and text["input_ids"].dtype == torch.long
        assert (text["input_ids"][:, 0] == tokenizer.cls_token_id).all()
        assert (text["input_ids"] != tokenizer.unk_token_id).all()
        assert batch["image_idx"].shape == batch["label"].shape == (batch_size,)
        labels |= set(batch["label"].tolist())
        seen += batch_size
    assert seen == len(loader) * batch_size < captions
    assert labels <= set(range(10)) and len(labels) > 1
    order0 = [i for i, _ in loader.sampler]
    loader.sampler.set_epoch(1)
    assert [i for i, _ in loader.sampler] != order0


def test_train_loader_rejects_a_batch_larger_than_the_shard(tiny_config_path: Path) -> None:
    config = load_config(tiny_config_path, ["batch_size_train=100000"])
    with pytest.raises(DataError, match="batch_size_train"):
        create_train_loader(config, DistInfo(), seed=0, device=torch.device("cpu"),
                            transform=transforms.train_transform(config), text_processor=text_processor(config))


def test_eval_split_covers_all_test_images(tiny_config_path: Path) -> None:
    config = load_config(tiny_config_path)
    split = create_eval_split(config, "test", torch.device("cpu"), transforms.test_transform(config))
    raw = json.loads(Path(config["test_file"]).read_text(encoding="utf-8"))
    assert split.name == "test"
    assert len(split.annotations.image_paths) == len(raw)
    assert len(split.annotations.texts) == sum(len(e["caption"]) for e in raw)
    check_eval_consistent(split.annotations)
    indices = []
    for images, index in split.image_loader:
        assert images.shape[1:] == (3, 32, 32) and images.shape[0] <= config["batch_size_test"]
        indices += index.tolist()
    assert indices == list(range(len(raw)))
