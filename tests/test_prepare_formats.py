"""tools/prepare_data.py and dataset.preparation on small synthetic sources written into ``tmp_path``.

Each public format (precomp txt, Karpathy JSON, COCO JSON, X-VLM JSON) converts to the project's
``<name>_{train,val,test}.json``; the output loads with the project's own loaders; scene labels, the carved val
split, every problem kind (hard ones stop, accepted ones have their documented effect, notes are counted),
format errors and the command line are checked with exact values. The real public files are covered by
tests/test_prepare_data.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from conftest import prepare_data_main
from dataset.annotations import DataError, load_eval_annotations, load_train_annotations, rule_weights
from dataset.captions import pre_caption
from dataset.preparation import (HARD, PreparationError, PrepareOptions, Prepared, prepare_dataset, read_coco,
                                 read_karpathy, read_precomp, read_xvlm)
from dataset.preparation.labels import UCM_CLASSES
from dataset.preparation.problems import REPORT_HEADER
from dataset.preparation.sources import Source

TRAIN_KEYS = ["caption", "image", "image_id", "label", "label_name", "length"]
EVAL_KEYS = ["caption", "image", "label", "label_name"]
OUTPUT_FILES = ["ds_problems.tsv", "ds_summary.json", "ds_test.json", "ds_train.json", "ds_val.json"]


# ----------------------------------------------------------------------------- helpers


def caps(tag: str, n: int = 5) -> list[str]:
    """``n`` distinct captions that name ``tag`` (so no two images share a caption by accident)."""
    return [f"There are {j + 2} buildings near the {tag} area" for j in range(n)]


def write_lines(path: Path, lines: list[str]) -> Path:
    """A precomp text file: one item per line, ``\\n`` endings, a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_precomp(folder: Path, train: dict[str, list[str]], test: dict[str, list[str]],
                  per_caption: bool = False) -> Path:
    """``{train,test}_{caps,filename}.txt``; the name files hold one line per image, or per caption."""
    for split, images in (("train", train), ("test", test)):
        write_lines(folder / f"{split}_caps.txt", [c for captions in images.values() for c in captions])
        names = [n for n, captions in images.items() for _ in captions] if per_caption else list(images)
        write_lines(folder / f"{split}_filename.txt", names)
    return folder


def write_fixed(folder: Path, train: dict[str, list[str]], val: dict[str, list[str]]) -> Path:
    """``{train,val}_{caps,filename}_verify.txt`` as AMFMN writes them: train names per image, val per caption."""
    write_lines(folder / "train_caps_verify.txt", [c for captions in train.values() for c in captions])
    write_lines(folder / "train_filename_verify.txt", list(train))
    write_lines(folder / "val_caps_verify.txt", [c for captions in val.values() for c in captions])
    write_lines(folder / "val_filename_verify.txt", [n for n, captions in val.items() for _ in captions])
    return folder


def write_karpathy(path: Path, rows: list[tuple[str, str, list[str]]]) -> Path:
    """A Karpathy ``dataset_*.json`` from (file name, split, captions) rows, in that order."""
    images = [{"filename": name, "imgid": i, "split": split,
               "sentences": [{"raw": c, "tokens": c.split(), "imgid": i} for c in captions]}
              for i, (name, split, captions) in enumerate(rows)]
    return write_json(path, {"images": images, "dataset": "synthetic"})


def write_coco(path: Path, images: dict[str, list[str]], first_id: int = 1) -> Path:
    """COCO captions; annotations interleave the images (caption 0 of every image, then caption 1, ...)."""
    ids = {name: first_id + i for i, name in enumerate(images)}
    most = max(len(captions) for captions in images.values())
    annotations = [{"image_id": ids[name], "id": k, "caption": captions[j]}
                   for k, (j, (name, captions)) in enumerate(
                       (j, item) for j in range(most) for item in images.items() if j < len(item[1]))]
    coco_images = [{"file_name": name, "id": ids[name], "height": 500, "width": 500} for name in images]
    return write_json(path, {"info": {}, "licenses": [], "images": coco_images, "annotations": annotations})


def write_xvlm_train(path: Path, images: dict[str, list[str]], prefix: str = "train/") -> Path:
    """X-VLM train layout, one entry per caption, interleaving the images (caption 0 of each, then 1, ...)."""
    most = max(len(captions) for captions in images.values())
    entries = [{"image": prefix + name, "caption": captions[j], "image_id": 100 + i, "label_name": "x"}
               for j in range(most) for i, (name, captions) in enumerate(images.items()) if j < len(captions)]
    return write_json(path, entries)


def write_xvlm_eval(path: Path, images: dict[str, list[str]], prefix: str) -> Path:
    """X-VLM val/test layout, one entry per image with its caption list."""
    return write_json(path, [{"image": prefix + name, "caption": captions} for name, captions in images.items()])


def write_png(path: Path, size: tuple[int, int] = (8, 6), seed: int = 0) -> Path:
    """A real PNG image (the bytes are PNG whatever the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format="PNG")
    return path


def options(source_format: str = "karpathy", **kwargs: Any) -> PrepareOptions:
    """Options named ``ds``, without figures (the CLI tests make them)."""
    return PrepareOptions(name="ds", source_format=source_format, plots=kwargs.pop("plots", False), **kwargs)


def read_split(out: Path, split: str) -> list[dict[str, Any]]:
    return json.loads((out / f"ds_{split}.json").read_text(encoding="utf-8"))


def read_report(out: Path) -> list[dict[str, str]]:
    """The rows of ``ds_problems.tsv`` as dicts; the header line is checked."""
    lines = (out / "ds_problems.tsv").read_text(encoding="utf-8").split("\n")
    assert lines[0] == REPORT_HEADER and lines[-1] == ""
    keys = REPORT_HEADER.split("\t")
    return [dict(zip(keys, line.split("\t"), strict=True)) for line in lines[1:-1]]


def images_of(entries: list[dict[str, Any]]) -> list[str]:
    """Image names of a split in entry order, each once."""
    return list(dict.fromkeys(entry["image"] for entry in entries))


def train_captions(entries: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for entry in entries:
        out.setdefault(entry["image"], []).append(entry["caption"])
    return out


def expected_lengths(captions: list[str], max_words: int = 30) -> list[float]:
    return rule_weights([pre_caption(c, max_words) for c in captions])[0]


# A Karpathy file: test and val images come first or in between, one image is 'restval'.
# Word counts of the train captions after pre_caption: 2, 9 | 9, 8 | 9, 10 -> mean 7.83, threshold 5.48:
# only "A river." is short and weighs 0.95.
KARPATHY_ROWS = [
    ("harbor_9.tif", "test", ["Ships at the harbor.", "Cranes stand on the pier"]),
    ("river_1.tif", "train", ["A river.", "The long river bends between green fields and trees  "]),
    ("beach_2.tif", "restval", ["Waves reach a white sandy beach near the town",
                                "A beach with umbrellas along the blue sea"]),
    ("pond_5.tif", "val", ["A small pond, with reeds.", "Green water in a round pond"]),
    ("river_3.tif", "train", ["Two bridges cross the wide river in the city",
                              "Boats are moored on the river next to a park"]),
    ("beach_6.tif", "val", ["Yellow sand and blue sea", "People walk on the beach"]),
    ("river_7.tif", "test", ["A river runs through a forest", "A brown river with a bridge"]),
]


def karpathy_source(tmp_path: Path, rows: list[tuple[str, str, list[str]]] = KARPATHY_ROWS) -> Path:
    return write_karpathy(tmp_path / "src" / "dataset_ds.json", rows)


def image_root_for(tmp_path: Path, names: list[str], size: tuple[int, int] = (8, 6)) -> Path:
    root = tmp_path / "images"
    for i, name in enumerate(names):
        write_png(root / name, size, seed=i)
    return root


# ----------------------------------------------------------------------------- 1. every format converts


PRECOMP_TRAIN = {
    "denseresidential_1.tif": ["Many houses stand close together   ", *caps("dense one", 4)],
    "denseresidential_2.tif": caps("dense two"),
    "river_3.tif": caps("river three"),
    "river_4.tif": ["  A river, with: punctuation!", *caps("river four", 4)],
    "river_5.tif": caps("river five"),
}
PRECOMP_TEST = {"river_9.tif": caps("river nine"), "pond_8.tif": caps("pond eight")}


def test_precomp_converts_and_name_file_granularity_does_not_matter(tmp_path: Path) -> None:
    """Precomp without a fixed split: names per image or per caption give identical output; 1 of 5 train
    images (a river: the largest remainder) is carved as val; captions verbatim; labels in train order."""
    outputs = {}
    for per_caption in (False, True):
        src = write_precomp(tmp_path / f"src{per_caption}", PRECOMP_TRAIN, PRECOMP_TEST, per_caption)
        out = tmp_path / f"out{per_caption}"
        prepared = prepare_dataset(read_precomp(src), out, options("precomp"))
        assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
        outputs[per_caption] = {split: (out / f"ds_{split}.json").read_text(encoding="utf-8")
                                for split in ("train", "val", "test")}
        assert prepared.summary["notes"] == [f"no val split in {src}: carved from train"]
        assert prepared.problems == []
    assert outputs[False] == outputs[True]

    out = tmp_path / "outFalse"
    train, val, test = (read_split(out, s) for s in ("train", "val", "test"))
    assert len(val) == 1 and val[0]["label_name"] == "river"
    val_name = val[0]["image"]
    assert val == [{"caption": PRECOMP_TRAIN[val_name], "image": val_name, "label": 1, "label_name": "river"}]
    train_names = [n for n in PRECOMP_TRAIN if n != val_name]
    assert images_of(train) == train_names
    expected = [{"caption": c, "image": n, "image_id": k, "label": 0 if n.startswith("dense") else 1,
                 "label_name": "denseresidential" if n.startswith("dense") else "river"}
                for k, n in enumerate(train_names) for c in PRECOMP_TRAIN[n]]
    assert [{key: e[key] for key in TRAIN_KEYS[:-1]} for e in train] == expected
    assert all(sorted(e) == TRAIN_KEYS for e in train)
    assert [e["length"] for e in train] == expected_lengths([e["caption"] for e in expected])
    assert test == [
        {"caption": PRECOMP_TEST["river_9.tif"], "image": "river_9.tif", "label": 1, "label_name": "river"},
        {"caption": PRECOMP_TEST["pond_8.tif"], "image": "pond_8.tif", "label": 2, "label_name": "pond"},
    ]
    assert train[0]["caption"] == "Many houses stand close together   "


def test_precomp_with_fixed_split_uses_it(tmp_path: Path) -> None:
    """With ``fixed_split_dir``, train and val are exactly the fixed split's (in its order), nothing is carved."""
    source_train = {"a_1.tif": caps("a1"), "a_2.tif": caps("a2"), "b_3.tif": caps("b3"), "b_4.tif": caps("b4"),
                    "c_5.tif": caps("c5")}
    src = write_precomp(tmp_path / "src", source_train, {"d_6.tif": caps("d6"), "a_7.tif": caps("a7")})
    fixed = write_fixed(tmp_path / "fixed", {n: source_train[n] for n in ("c_5.tif", "a_1.tif", "b_3.tif")},
                        {n: source_train[n] for n in ("b_4.tif", "a_2.tif")})
    out = tmp_path / "out"
    prepared = prepare_dataset(read_precomp(src, fixed), out, options("precomp"))
    train, val, test = (read_split(out, s) for s in ("train", "val", "test"))
    assert images_of(train) == ["c_5.tif", "a_1.tif", "b_3.tif"]
    assert [(e["image_id"], e["label"], e["label_name"]) for e in train[::5]] == [(0, 0, "c"), (1, 1, "a"),
                                                                                  (2, 2, "b")]
    assert train_captions(train) == {n: source_train[n] for n in ("c_5.tif", "a_1.tif", "b_3.tif")}
    assert val == [{"caption": source_train["b_4.tif"], "image": "b_4.tif", "label": 2, "label_name": "b"},
                   {"caption": source_train["a_2.tif"], "image": "a_2.tif", "label": 1, "label_name": "a"}]
    assert [(e["image"], e["label"], e["label_name"]) for e in test] == [("d_6.tif", 3, "d"), ("a_7.tif", 1, "a")]
    assert prepared.summary["notes"] == []
    assert prepared.summary["problems"] == {}
    assert read_report(out) == []
    assert prepared.summary["source_files"] == [str(src / f) for f in (
        "train_caps.txt", "train_filename.txt", "test_caps.txt", "test_filename.txt")] + [
        str(fixed / f) for f in ("train_caps_verify.txt", "train_filename_verify.txt", "val_caps_verify.txt",
                                 "val_filename_verify.txt")]


def test_karpathy_converts_with_restval_in_train(tmp_path: Path) -> None:
    """Karpathy JSON: restval joins train in file order; image ids contiguous; label ids by first appearance in
    train, val/test reuse them and new scenes (pond, harbor) get the next ids; exact ``length`` values."""
    out = tmp_path / "out"
    prepared = prepare_dataset(read_karpathy(karpathy_source(tmp_path)), out, options(captions_per_image=2))
    rows = {name: captions for name, _, captions in KARPATHY_ROWS}
    train = read_split(out, "train")
    expected = [{"caption": c, "image": n, "image_id": k, "label": label, "label_name": scene, "length": length}
                for (k, n, label, scene), lengths in zip(
                    [(0, "river_1.tif", 0, "river"), (1, "beach_2.tif", 1, "beach"), (2, "river_3.tif", 0, "river")],
                    [[0.95, 1.0], [1.0, 1.0], [1.0, 1.0]])
                for c, length in zip(rows[n], lengths)]
    assert train == expected
    assert read_split(out, "val") == [
        {"caption": rows["pond_5.tif"], "image": "pond_5.tif", "label": 2, "label_name": "pond"},
        {"caption": rows["beach_6.tif"], "image": "beach_6.tif", "label": 1, "label_name": "beach"}]
    assert read_split(out, "test") == [
        {"caption": rows["harbor_9.tif"], "image": "harbor_9.tif", "label": 3, "label_name": "harbor"},
        {"caption": rows["river_7.tif"], "image": "river_7.tif", "label": 0, "label_name": "river"}]
    assert prepared.summary["notes"] == ["1 'restval' images joined train"]
    assert {s: (v["images"], v["captions"], v["scenes"]) for s, v in prepared.summary["splits"].items()} == {
        "train": (3, 6, 2), "val": (2, 4, 2), "test": (2, 4, 2)}
    assert json.loads((out / "ds_summary.json").read_text(encoding="utf-8")) == prepared.summary


def test_coco_folder_without_val_file_carves_val(tmp_path: Path) -> None:
    """COCO folder with train and test files: images keep the order of ``images``, captions are grouped by
    ``image_id`` in annotation order, and 1 of 5 train images becomes val."""
    train_images = {f"a_{i}.tif": caps(f"a{i}", 3) for i in range(1, 6)}
    write_coco(tmp_path / "coco" / "data_train_ds.json", train_images)
    write_coco(tmp_path / "coco" / "data_test_ds.json", {"b_9.tif": caps("b9", 3), "a_8.tif": caps("a8", 3)}, 50)
    (tmp_path / "coco" / "readme.txt").write_text("not an annotation file", encoding="utf-8")
    source = read_coco(tmp_path / "coco")
    assert source.notes == [f"no val file in {tmp_path / 'coco'}: carved from train"]
    # SourceImage: split is None when the source has no val split and one is carved
    assert [image.split for image in source.images] == [None] * 5 + ["test"] * 2
    out = tmp_path / "out"
    prepare_dataset(source, out, options("coco", captions_per_image=3))
    train, val, test = (read_split(out, s) for s in ("train", "val", "test"))
    assert len(val) == 1 and len(images_of(train)) == 4
    assert images_of(train) == [n for n in train_images if n != val[0]["image"]]
    assert train_captions(train) == {n: train_images[n] for n in images_of(train)}
    assert val[0]["caption"] == train_images[val[0]["image"]]
    assert [e["image_id"] for e in train] == [k for k in range(4) for _ in range(3)]
    assert test == [{"caption": caps("b9", 3), "image": "b_9.tif", "label": 1, "label_name": "b"},
                    {"caption": caps("a8", 3), "image": "a_8.tif", "label": 0, "label_name": "a"}]


def test_coco_folder_with_val_file_uses_it(tmp_path: Path) -> None:
    """A COCO val file is used as it is (no carving, no note)."""
    write_coco(tmp_path / "coco" / "ds_train.json", {"a_1.tif": caps("a1", 2), "a_2.tif": caps("a2", 2)})
    write_coco(tmp_path / "coco" / "ds_val.json", {"c_3.tif": caps("c3", 2)})
    write_coco(tmp_path / "coco" / "ds_test.json", {"a_4.tif": caps("a4", 2)})
    source = read_coco(tmp_path / "coco")
    assert source.notes == []
    out = tmp_path / "out"
    prepare_dataset(source, out, options("coco", captions_per_image=2))
    assert images_of(read_split(out, "train")) == ["a_1.tif", "a_2.tif"]
    assert read_split(out, "val") == [{"caption": caps("c3", 2), "image": "c_3.tif", "label": 1,
                                       "label_name": "c"}]
    assert read_split(out, "test") == [{"caption": caps("a4", 2), "image": "a_4.tif", "label": 0,
                                        "label_name": "a"}]


def test_xvlm_train_and_eval_layouts_convert_to_base_names(tmp_path: Path) -> None:
    """X-VLM folder: the per-caption train file is grouped per image (captions in file order) and the
    ``train/``, ``val/``, ``test/`` prefixes are dropped."""
    train_images = {"x_1.tif": caps("x1", 3), "y_2.tif": ["Trailing space kept ", *caps("y2", 2)]}
    folder = tmp_path / "xvlm"
    write_xvlm_train(folder / "rsitmd_train.json", train_images)
    write_xvlm_eval(folder / "rsitmd_val.json", {"y_3.tif": caps("y3", 3)}, "val/")
    write_xvlm_eval(folder / "rsitmd_test.json", {"z_4.tif": caps("z4", 3)}, "test/")
    out = tmp_path / "out"
    prepare_dataset(read_xvlm(folder), out, options("xvlm", captions_per_image=3))
    train = read_split(out, "train")
    assert [(e["image"], e["image_id"], e["label"], e["label_name"], e["caption"]) for e in train] == [
        (n, k, k, n[0], c) for k, n in enumerate(train_images) for c in train_images[n]]
    assert read_split(out, "val") == [{"caption": caps("y3", 3), "image": "y_3.tif", "label": 1,
                                       "label_name": "y"}]
    assert read_split(out, "test") == [{"caption": caps("z4", 3), "image": "z_4.tif", "label": 2,
                                        "label_name": "z"}]


def test_xvlm_folder_without_val_file_carves_val(tmp_path: Path) -> None:
    """X-VLM folder with train and test files only: 1 of 5 train images (round(0.2 * 5)) is carved as val,
    as the reader's note says."""
    train_images = {f"a_{i}.tif": caps(f"a{i}", 2) for i in range(1, 6)}
    folder = tmp_path / "xvlm"
    write_xvlm_train(folder / "ds_train.json", train_images)
    write_xvlm_eval(folder / "ds_test.json", {"b_9.tif": caps("b9", 2)}, "test/")
    source = read_xvlm(folder)
    assert source.notes == [f"no val file in {folder}: carved from train"]
    assert [image.split for image in source.images] == [None] * 5 + ["test"]
    out = tmp_path / "out"
    prepare_dataset(source, out, options("xvlm", captions_per_image=2))
    train, val = read_split(out, "train"), read_split(out, "val")
    assert len(val) == 1 and len(images_of(train)) == 4
    assert sorted(images_of(train) + images_of(val)) == sorted(train_images)


# ----------------------------------------------------------------------------- 2. the output loads


def test_output_loads_with_the_project_loaders(tmp_path: Path) -> None:
    """The written JSON passes load_train_annotations / load_eval_annotations with real images, and the
    loader takes the ``length`` field, which equals rule_weights of the pre_caption'd captions."""
    out = tmp_path / "out"
    prepare_dataset(read_karpathy(karpathy_source(tmp_path)), out, options(captions_per_image=2))
    root = image_root_for(tmp_path, [name for name, _, _ in KARPATHY_ROWS])
    rows = {name: captions for name, _, captions in KARPATHY_ROWS}
    train_source = [c for n in ("river_1.tif", "beach_2.tif", "river_3.tif") for c in rows[n]]

    ann = load_train_annotations([str(out / "ds_train.json")], str(root), 30)
    assert ann.captions == [pre_caption(c) for c in train_source]
    assert ann.image_paths == [str(root / n) for n in ("river_1.tif", "beach_2.tif", "river_3.tif") for _ in "ab"]
    assert ann.image_index == [0, 0, 1, 1, 2, 2]
    assert ann.labels == [0, 0, 1, 1, 0, 0]
    assert ann.caption_weights == [0.95, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert ann.caption_weights == expected_lengths(train_source)
    assert ann.weight_source.startswith("field 'length'")

    for split, names in (("val", ["pond_5.tif", "beach_6.tif"]), ("test", ["harbor_9.tif", "river_7.tif"])):
        ev = load_eval_annotations(str(out / f"ds_{split}.json"), str(root), 30)
        assert ev.image_paths == [str(root / n) for n in names]
        assert ev.texts == [pre_caption(c) for n in names for c in rows[n]]
        assert ev.img2txt == [[0, 1], [2, 3]] and ev.txt2img == [0, 0, 1, 1]


def test_images_accepted_by_the_check_are_found_by_the_loader(tmp_path: Path) -> None:
    """Protects the promise of ``--image-root``: an image the check accepts (here under
    ``<root>/<split>/``) must be found by the loader from the written JSON with that same root; otherwise the
    check must report it as missing."""
    rows = KARPATHY_ROWS
    root = tmp_path / "images"
    for i, (name, split, _) in enumerate(rows):
        write_png(root / ("train" if split == "restval" else split) / name, seed=i)
    out = tmp_path / "out"
    try:
        prepare_dataset(read_karpathy(karpathy_source(tmp_path)), out,
                        options(captions_per_image=2, image_root=str(root)))
    except PreparationError as err:  # also consistent: the check refuses what the loader cannot find
        assert "missing-image" in str(err)
        return
    load_train_annotations([str(out / "ds_train.json")], str(root), 30)
    load_eval_annotations(str(out / "ds_test.json"), str(root), 30)


# ----------------------------------------------------------------------------- 3. scene labels


def test_prefix_labels_give_numeric_names_their_own_scene(tmp_path: Path) -> None:
    """``prefix``: ``denseresidential_12.tif`` -> denseresidential, ``00017.jpg`` -> itself, counted as
    images_with_own_scene per split and not as a scene."""
    rows = [("denseresidential_12.tif", "train", caps("d12")), ("00017.jpg", "train", caps("17")),
            ("denseresidential_3.tif", "train", caps("d3")), ("00020.jpg", "train", caps("20")),
            ("river_1.tif", "train", caps("r1")), ("00031.jpg", "val", caps("31")),
            ("river_2.tif", "val", caps("r2")), ("00044.jpg", "test", caps("44")), ("river_8.tif", "test", caps("r8"))]
    out = tmp_path / "out"
    prepared = prepare_dataset(read_karpathy(karpathy_source(tmp_path, rows)), out, options())
    train = read_split(out, "train")
    assert [(e["image"], e["label"], e["label_name"]) for e in train[::5]] == [
        ("denseresidential_12.tif", 0, "denseresidential"), ("00017.jpg", 1, "00017.jpg"),
        ("denseresidential_3.tif", 0, "denseresidential"), ("00020.jpg", 2, "00020.jpg"),
        ("river_1.tif", 3, "river")]
    assert [(e["label"], e["label_name"]) for e in read_split(out, "val")] == [(4, "00031.jpg"), (3, "river")]
    assert [(e["label"], e["label_name"]) for e in read_split(out, "test")] == [(5, "00044.jpg"), (3, "river")]
    stats = prepared.summary["splits"]
    assert {s: (stats[s]["images"], stats[s]["scenes"], stats[s]["images_with_own_scene"]) for s in stats} == {
        "train": (5, 2, 2), "val": (2, 1, 1), "test": (2, 1, 1)}


def test_ucm_labels_are_blocks_of_100(tmp_path: Path) -> None:
    """``ucm``: 1.tif .. 2100.tif give the 21 classes in alphabetical order, class (n - 1) // 100."""
    split_of = {0: "test", 5: "val"}
    rows = [(f"{n}.tif", split_of.get(n % 10, "train"), [f"caption of image {n}"]) for n in range(1, 2101)]
    out = tmp_path / "out"
    prepared = prepare_dataset(read_karpathy(karpathy_source(tmp_path, rows)), out,
                               options(captions_per_image=1, label_scheme="ucm"))
    labels = {e["image"]: (e["label"], e["label_name"]) for s in ("train", "val", "test")
              for e in read_split(out, s)}
    assert len(labels) == 2100
    assert labels["1001.tif"] == (10, "harbor")
    assert labels["1.tif"] == (0, "agricultural") and labels["100.tif"] == (0, "agricultural")
    assert labels["101.tif"] == (1, "airplane") and labels["2100.tif"] == (20, "tenniscourt")
    assert all(labels[f"{n}.tif"] == ((n - 1) // 100, UCM_CLASSES[(n - 1) // 100]) for n in range(1, 2101))
    assert len({name for _, name in labels.values()}) == 21
    assert {s: (v["images"], v["scenes"], v["images_with_own_scene"])
            for s, v in prepared.summary["splits"].items()} == {
        "train": (1680, 21, 0), "val": (210, 21, 0), "test": (210, 21, 0)}


@pytest.mark.parametrize("bad", ["harbor_1.tif", "0.tif", "2101.tif"])
def test_ucm_labels_reject_other_names(tmp_path: Path, bad: str) -> None:
    """``ucm`` on a name that is not 1..2100 stops with a DataError naming the image."""
    rows = [("5.tif", "train", caps("5")), (bad, "train", caps("bad")), ("7.tif", "test", caps("7"))]
    with pytest.raises(DataError, match=f"image '{bad}'"):
        prepare_dataset(read_karpathy(karpathy_source(tmp_path, rows)), tmp_path / "out",
                        options(label_scheme="ucm"))


def test_singleton_labels_give_every_image_its_scene(tmp_path: Path) -> None:
    """``singleton``: each image is its own scene (label name = file name), ids in train-first order."""
    rows = [("3.tif", "test", caps("3")), ("1.tif", "train", caps("1")), ("a_2.tif", "train", caps("2")),
            ("4.tif", "val", caps("4"))]
    out = tmp_path / "out"
    prepared = prepare_dataset(read_karpathy(karpathy_source(tmp_path, rows)), out,
                               options(label_scheme="singleton"))
    assert [(e["label"], e["label_name"]) for e in read_split(out, "train")[::5]] == [(0, "1.tif"), (1, "a_2.tif")]
    assert [(e["label"], e["label_name"]) for e in read_split(out, "val")] == [(2, "4.tif")]
    assert [(e["label"], e["label_name"]) for e in read_split(out, "test")] == [(3, "3.tif")]
    assert {s: (v["scenes"], v["images_with_own_scene"]) for s, v in prepared.summary["splits"].items()} == {
        "train": (0, 2), "val": (0, 1), "test": (0, 1)}


# ----------------------------------------------------------------------------- 4. carved val split


def carve_source(tmp_path: Path, scenes: list[tuple[str, int]], singletons: int = 0) -> Path:
    """A precomp folder whose train holds ``count`` images per scene, then ``singletons`` numeric names."""
    train = {f"{scene}_{i}.tif": caps(f"{scene} {i}") for scene, count in scenes for i in range(count)}
    train.update({f"{900 + i:05d}.jpg": caps(f"single {i}") for i in range(singletons)})
    return write_precomp(tmp_path / "src", train, {"t_1.tif": caps("t1")})


def carved(tmp_path: Path, src: Path, seed: int, fraction: float, tag: str) -> tuple[list[str], list[str]]:
    """(train images, val images) of one conversion of ``src``."""
    out = tmp_path / tag
    prepare_dataset(read_precomp(src), out, options("precomp", seed=seed, val_fraction=fraction))
    return images_of(read_split(out, "train")), images_of(read_split(out, "val"))


def test_carved_val_is_seeded_and_partitions_train(tmp_path: Path) -> None:
    """Same seed: identical split; another seed: another one; train and val partition the source train,
    each in source order, and val has round(0.25 * 20) = 5 images."""
    src = carve_source(tmp_path, [("a", 7), ("b", 4), ("c", 3)], singletons=6)
    source_train = read_precomp(src).images[:20]
    names = [image.name for image in source_train]
    first = carved(tmp_path, src, 0, 0.25, "run1")
    assert carved(tmp_path, src, 0, 0.25, "run2") == first
    other = carved(tmp_path, src, 1, 0.25, "run3")
    assert other[1] != first[1]
    for train, val in (first, other):
        assert len(val) == 5 and len(train) == 15
        assert not set(train) & set(val)
        assert sorted(train + val) == sorted(names)
        assert train == [n for n in names if n in train] and val == [n for n in names if n in val]


@pytest.mark.parametrize("scenes, singletons, fraction, expected", [
    # exact shares 1.75, 1.0, 0.75 and 1.5 (6 singletons, one stratum); total round(5.0) = 5
    ([("a", 7), ("b", 4), ("c", 3)], 6, 0.25, {"a": 2, "b": 1, "c": 1, "single": 1}),
    # shares 0.6, 0.6, 0.8; total 2: c has the largest remainder, a wins the tie with b
    ([("a", 3), ("b", 3), ("c", 4)], 0, 0.2, {"a": 1, "b": 0, "c": 1}),
    # shares 2.0 and 1.0 exactly
    ([("a", 10), ("b", 5)], 0, 0.2, {"a": 2, "b": 1}),
])
def test_carved_val_is_stratified_by_scene(tmp_path: Path, scenes: list[tuple[str, int]], singletons: int,
                                           fraction: float, expected: dict[str, int]) -> None:
    """Each scene sends its rounded share (largest remainders, earlier scenes win ties), singleton-named
    images share one stratum; holds for every seed."""
    src = carve_source(tmp_path, scenes, singletons)
    for seed in (0, 7):
        _, val = carved(tmp_path, src, seed, fraction, f"seed{seed}")
        got = {scene: sum(n.startswith(f"{scene}_") for n in val) for scene, _ in scenes}
        if singletons:
            got["single"] = sum(n.endswith(".jpg") for n in val)
        assert got == expected


# ----------------------------------------------------------------------------- 5. problems


@dataclass
class HardCase:
    """A source with one hard problem: how to read it (fresh each time: conversion edits the images), the
    options, and the report rows (split, image) expected for the kind."""

    kind: str
    read: Callable[[], Source]
    rows: list[tuple[str, str]]
    options: dict[str, Any] = field(default_factory=dict)


def case_blank(tmp_path: Path) -> HardCase:
    rows = [("a_1.tif", "train", caps("a1")),
            ("a_2.tif", "train", ["First good one", " .", "Third good one", "", "Fifth good one"]),
            ("a_3.tif", "train", ["", " .", "   ", ".", " ?! "]),
            ("b_1.tif", "test", caps("b1")), ("b_2.tif", "val", caps("b2"))]
    path = karpathy_source(tmp_path, rows)
    return HardCase("blank-caption", lambda: read_karpathy(path), [("train", "a_2.tif"), ("train", "a_3.tif")])


def case_count(tmp_path: Path) -> HardCase:
    rows = [("a_1.tif", "train", caps("a1")), ("a_2.tif", "train", caps("a2", 4)),
            ("b_1.tif", "test", caps("b1")), ("b_2.tif", "val", caps("b2"))]
    path = karpathy_source(tmp_path, rows)
    return HardCase("caption-count", lambda: read_karpathy(path), [("train", "a_2.tif")])


def case_overlap(tmp_path: Path) -> HardCase:
    rows = [("a_1.tif", "train", caps("a1")), ("a_2.tif", "train", caps("a2")),
            ("b_1.tif", "val", caps("b1")), ("a_2.tif", "test", caps("a2 test"))]
    path = karpathy_source(tmp_path, rows)
    return HardCase("split-overlap", lambda: read_karpathy(path), [("train", "a_2.tif"), ("test", "a_2.tif")])


MISMATCH_TRAIN = {f"a_{i}.tif": caps(f"a{i}") for i in range(1, 5)}


def case_mismatch_partition(tmp_path: Path) -> HardCase:
    """a_4 is in the precomp train but in neither fixed file; z_9 is in the fixed val only."""
    src = write_precomp(tmp_path / "src", MISMATCH_TRAIN, {"t_1.tif": caps("t1")})
    fixed = write_fixed(tmp_path / "fixed", {n: MISMATCH_TRAIN[n] for n in ("a_1.tif", "a_2.tif")},
                        {"a_3.tif": MISMATCH_TRAIN["a_3.tif"], "z_9.tif": caps("z9")})
    return HardCase("split-mismatch", lambda: read_precomp(src, fixed), [("-", "a_4.tif"), ("val", "z_9.tif")])


def case_mismatch_captions(tmp_path: Path) -> HardCase:
    """The fixed val's a_3 has one caption different from the precomp train's."""
    src = write_precomp(tmp_path / "src", MISMATCH_TRAIN, {"t_1.tif": caps("t1")})
    changed = [*MISMATCH_TRAIN["a_3.tif"][:4], "A corrected caption"]
    fixed = write_fixed(tmp_path / "fixed", {n: MISMATCH_TRAIN[n] for n in ("a_1.tif", "a_2.tif", "a_4.tif")},
                        {"a_3.tif": changed})
    return HardCase("split-mismatch", lambda: read_precomp(src, fixed), [("val", "a_3.tif")])


FILE_ROWS = [("a_1.tif", "train", caps("a1")), ("a_2.tif", "train", caps("a2")), ("a_3.tif", "train", caps("a3")),
             ("b_1.tif", "val", caps("b1")), ("b_2.tif", "test", caps("b2"))]


def case_missing(tmp_path: Path) -> HardCase:
    root = image_root_for(tmp_path, [n for n, _, _ in FILE_ROWS if n != "a_2.tif"])
    path = karpathy_source(tmp_path, FILE_ROWS)
    return HardCase("missing-image", lambda: read_karpathy(path), [("train", "a_2.tif")],
                    {"image_root": str(root)})


def case_unreadable(tmp_path: Path) -> HardCase:
    root = image_root_for(tmp_path, [n for n, _, _ in FILE_ROWS if n != "a_2.tif"])
    (root / "a_2.tif").write_bytes(b"this is not an image at all" * 10)
    path = karpathy_source(tmp_path, FILE_ROWS)
    return HardCase("unreadable-image", lambda: read_karpathy(path), [("train", "a_2.tif")],
                    {"image_root": str(root)})


def mask_root_for(tmp_path: Path, names: list[str], values: int = 10, size: tuple[int, int] = (8, 6)) -> Path:
    """RSITMD-SS masks (every pixel stored as ``values``) for the images ``names``."""
    root = tmp_path / "masks"
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((size[1], size[0]), values, dtype=np.uint8)).save(root / f"mask_{Path(name).stem}.png")
    return root


def case_missing_mask(tmp_path: Path) -> HardCase:
    root = image_root_for(tmp_path, [n for n, _, _ in FILE_ROWS])
    masks = mask_root_for(tmp_path, [n for n, _, _ in FILE_ROWS if n != "a_2.tif"])
    path = karpathy_source(tmp_path, FILE_ROWS)
    return HardCase("missing-mask", lambda: read_karpathy(path), [("train", "a_2.tif")],
                    {"image_root": str(root), "mask_root": str(masks)})


def case_bad_mask(tmp_path: Path) -> HardCase:
    """a_2's mask has a value that is no class; a_3's is larger than its image."""
    root = image_root_for(tmp_path, [n for n, _, _ in FILE_ROWS])
    masks = mask_root_for(tmp_path, [n for n, _, _ in FILE_ROWS if n not in ("a_2.tif", "a_3.tif")])
    mask_root_for(tmp_path, ["a_2.tif"], values=7)
    mask_root_for(tmp_path, ["a_3.tif"], size=(9, 6))
    path = karpathy_source(tmp_path, FILE_ROWS)
    return HardCase("bad-mask", lambda: read_karpathy(path), [("train", "a_2.tif"), ("train", "a_3.tif")],
                    {"image_root": str(root), "mask_root": str(masks)})


HARD_CASES = {"blank-caption": case_blank, "caption-count": case_count, "split-overlap": case_overlap,
              "split-mismatch-partition": case_mismatch_partition,
              "split-mismatch-captions": case_mismatch_captions, "missing-image": case_missing,
              "unreadable-image": case_unreadable, "missing-mask": case_missing_mask, "bad-mask": case_bad_mask}


def test_every_hard_kind_has_a_case() -> None:
    """The cases below cover every kind in HARD."""
    assert {case.split("-partition")[0].split("-captions")[0] for case in HARD_CASES} == set(HARD)


@pytest.mark.parametrize("case_name", list(HARD_CASES))
def test_hard_problem_stops_and_is_reported(tmp_path: Path, case_name: str) -> None:
    """A hard kind not accepted: PreparationError naming the kind, its effect and the report; the report lists
    each image with status ``error``; no JSON is written."""
    case = HARD_CASES[case_name](tmp_path)
    out = tmp_path / "out"
    with pytest.raises(PreparationError) as info:
        prepare_dataset(case.read(), out, options(**case.options))
    message = str(info.value)
    assert f"{case.kind} ({len(case.rows)})" in message
    assert str(out / "ds_problems.tsv") in message
    assert f"--allow KIND ({case.kind}: {HARD[case.kind]})" in message
    rows = read_report(out)
    assert [(r["kind"], r["status"], r["split"], r["image"]) for r in rows] == [
        (case.kind, "error", split, image) for split, image in case.rows]
    assert sorted(p.name for p in out.iterdir()) == ["ds_problems.tsv"]


@pytest.mark.parametrize("case_name", list(HARD_CASES))
def test_accepted_hard_problem_is_reported_as_accepted(tmp_path: Path, case_name: str) -> None:
    """With ``allow={kind}`` the conversion writes every file, the report says ``accepted`` and the summary
    counts the accepted problems."""
    case = HARD_CASES[case_name](tmp_path)
    out = tmp_path / "out"
    prepared = prepare_dataset(case.read(), out, options(allow=frozenset({case.kind}), **case.options))
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    assert [(r["kind"], r["status"], r["split"], r["image"]) for r in read_report(out)] == [
        (case.kind, "accepted", split, image) for split, image in case.rows]
    assert prepared.summary["problems"] == {f"{case.kind} (accepted)": len(case.rows)}
    assert prepared.summary["accepted"] == [case.kind]


def accept(tmp_path: Path, case_name: str) -> tuple[Prepared, Path]:
    case = HARD_CASES[case_name](tmp_path)
    out = tmp_path / "out"
    return prepare_dataset(case.read(), out, options(allow=frozenset({case.kind}), **case.options)), out


def test_accepted_blank_captions_are_dropped(tmp_path: Path) -> None:
    """blank-caption accepted: blank captions (including " .") go, the others stay in order; an image left
    with none is dropped and image ids stay contiguous."""
    _, out = accept(tmp_path, "blank-caption")
    train = read_split(out, "train")
    assert train_captions(train) == {"a_1.tif": caps("a1"),
                                     "a_2.tif": ["First good one", "Third good one", "Fifth good one"]}
    assert [e["image_id"] for e in train] == [0] * 5 + [1] * 3
    assert [e["length"] for e in train] == expected_lengths([e["caption"] for e in train])


def test_accepted_caption_count_keeps_captions(tmp_path: Path) -> None:
    """caption-count accepted: the image keeps the 4 captions it has."""
    _, out = accept(tmp_path, "caption-count")
    assert train_captions(read_split(out, "train")) == {"a_1.tif": caps("a1"), "a_2.tif": caps("a2", 4)}


def test_accepted_split_overlap_keeps_both(tmp_path: Path) -> None:
    """split-overlap accepted: the image stays in train and in test, each with its own captions."""
    _, out = accept(tmp_path, "split-overlap")
    assert train_captions(read_split(out, "train")) == {"a_1.tif": caps("a1"), "a_2.tif": caps("a2")}
    assert read_split(out, "test") == [{"caption": caps("a2 test"), "image": "a_2.tif", "label": 0,
                                        "label_name": "a"}]


def test_accepted_split_mismatch_uses_the_fixed_split(tmp_path: Path) -> None:
    """split-mismatch accepted: train and val are the fixed files as they are (a_4 is nowhere, z_9 in val)."""
    _, out = accept(tmp_path, "split-mismatch-partition")
    assert images_of(read_split(out, "train")) == ["a_1.tif", "a_2.tif"]
    assert images_of(read_split(out, "val")) == ["a_3.tif", "z_9.tif"]
    assert images_of(read_split(out, "test")) == ["t_1.tif"]


def test_accepted_split_mismatch_keeps_the_fixed_captions(tmp_path: Path) -> None:
    """split-mismatch accepted on differing captions: the fixed split's captions are written."""
    _, out = accept(tmp_path, "split-mismatch-captions")
    assert read_split(out, "val") == [{"caption": [*MISMATCH_TRAIN["a_3.tif"][:4], "A corrected caption"],
                                       "image": "a_3.tif", "label": 0, "label_name": "a"}]


@pytest.mark.parametrize("case_name", ["missing-image", "unreadable-image"])
def test_accepted_image_problem_drops_the_image(tmp_path: Path, case_name: str) -> None:
    """missing-image / unreadable-image accepted: the image and its captions are gone; the sizes of the
    images read are in the summary."""
    prepared, out = accept(tmp_path, case_name)
    train = read_split(out, "train")
    assert train_captions(train) == {"a_1.tif": caps("a1"), "a_3.tif": caps("a3")}
    assert [e["image_id"] for e in train] == [0] * 5 + [1] * 5
    assert images_of(read_split(out, "val")) == ["b_1.tif"] and images_of(read_split(out, "test")) == ["b_2.tif"]
    assert prepared.summary["image_sizes"] == {"8x6": 4}


def test_image_problem_report_names_the_file(tmp_path: Path) -> None:
    """The report's ``where``/``detail`` point at the file: missing lists the path tried, unreadable the path."""
    case = case_missing(tmp_path / "m")
    with pytest.raises(PreparationError):
        prepare_dataset(case.read(), tmp_path / "m" / "out", options(**case.options))
    (row,) = read_report(tmp_path / "m" / "out")
    root = case.options["image_root"]
    assert row["detail"] == f"no file at {root}/train/a_2.tif or {root}/a_2.tif"
    case = case_unreadable(tmp_path / "u")
    with pytest.raises(PreparationError):
        prepare_dataset(case.read(), tmp_path / "u" / "out", options(**case.options))
    (row,) = read_report(tmp_path / "u" / "out")
    assert row["where"] == f"{case.options['image_root']}/a_2.tif" and row["detail"].startswith("cannot decode")


def test_duplicate_and_shared_captions_are_notes(tmp_path: Path) -> None:
    """duplicate-caption (within an image, compared stripped) and shared-caption (across images of a split)
    never stop the conversion, are kept verbatim, and are counted in the summary and the report."""
    rows = [("a_1.tif", "train", ["Same words here", "Same words here ", *caps("a1", 3)]),
            ("a_2.tif", "train", ["A shared caption text", *caps("a2", 4)]),
            ("a_3.tif", "train", [*caps("a3", 4), "A shared caption text"]),
            ("b_1.tif", "val", caps("b1")),
            ("b_2.tif", "test", ["Test shared", *caps("b2", 4)]), ("b_3.tif", "test", ["Test shared", *caps("b3", 4)])]
    out = tmp_path / "out"
    prepared = prepare_dataset(read_karpathy(karpathy_source(tmp_path, rows)), out, options())
    assert train_captions(read_split(out, "train"))["a_1.tif"] == rows[0][2]
    assert prepared.summary["problems"] == {"duplicate-caption (note)": 1, "shared-caption (note)": 2}
    assert [(r["kind"], r["status"], r["split"], r["image"]) for r in read_report(out)] == [
        ("duplicate-caption", "note", "train", "a_1.tif"),
        ("shared-caption", "note", "train", "a_2.tif, a_3.tif"),
        ("shared-caption", "note", "test", "b_2.tif, b_3.tif")]
    stats = prepared.summary["splits"]
    assert {s: (v["images_repeating_a_caption"], v["captions_shared_by_images"]) for s, v in stats.items()} == {
        "train": (1, 1), "val": (0, 0), "test": (0, 1)}


def test_captions_from_replaces_blank_captions_by_position(tmp_path: Path) -> None:
    """``captions_from``: blank caption j of an image becomes caption j of the same image in the X-VLM JSON
    (the other captions stay), recorded as a fixed-caption note; no blank-caption error is left."""
    rows = [("a_1.tif", "train", caps("a1")),
            ("a_2.tif", "train", ["Kept zero", "", "Kept two", " .", "Kept four"]),
            ("b_1.tif", "val", caps("b1")), ("b_2.tif", "test", caps("b2"))]
    fixes = write_xvlm_train(tmp_path / "fix" / "corrected_train.json",
                             {"a_2.tif": [f"Fixed caption {j}" for j in range(5)]})
    out = tmp_path / "out"
    prepared = prepare_dataset(read_karpathy(karpathy_source(tmp_path, rows)), out,
                               options(captions_from=str(fixes)))
    assert train_captions(read_split(out, "train"))["a_2.tif"] == [
        "Kept zero", "Fixed caption 1", "Kept two", "Fixed caption 3", "Kept four"]
    assert prepared.summary["problems"] == {"fixed-caption (note)": 1}
    (row,) = read_report(out)
    assert (row["kind"], row["status"], row["split"], row["image"]) == ("fixed-caption", "note", "train", "a_2.tif")
    assert "2 blank caption(s) replaced from corrected_train.json" in row["detail"]


def test_unknown_allowed_kind_is_refused() -> None:
    """PrepareOptions refuses to accept a kind that is not in HARD (a typo would accept nothing)."""
    with pytest.raises(ValueError, match="duplicate-caption"):
        PrepareOptions(name="ds", source_format="karpathy", allow=frozenset({"duplicate-caption"}))


def test_a_split_left_empty_is_a_data_error(tmp_path: Path) -> None:
    """A source whose val split ends up empty (a Karpathy file with no val image) must stop with a DataError
    (the CLI's "error: ..."), not an unhandled exception while summarising."""
    rows = [("a_1.tif", "train", caps("a1")), ("a_2.tif", "train", caps("a2")), ("b_1.tif", "test", caps("b1"))]
    with pytest.raises(DataError):
        prepare_dataset(read_karpathy(karpathy_source(tmp_path, rows)), tmp_path / "out", options())


# ----------------------------------------------------------------------------- 6. format errors


def bad_precomp_counts(tmp_path: Path) -> tuple[Callable[[], Source], list[str]]:
    src = write_precomp(tmp_path / "src", {"a_1.tif": caps("a1"), "a_2.tif": caps("a2")}, {"b_1.tif": caps("b1")})
    write_lines(src / "train_filename.txt", ["a_1.tif", "a_2.tif", "a_3.tif"])
    return lambda: read_precomp(src), [f"{src / 'train_filename.txt'} has 3 lines", f"{src / 'train_caps.txt'} 10"]


def bad_precomp_missing(tmp_path: Path) -> tuple[Callable[[], Source], list[str]]:
    src = write_precomp(tmp_path / "src", {"a_1.tif": caps("a1")}, {"b_1.tif": caps("b1")})
    (src / "test_caps.txt").unlink()
    return lambda: read_precomp(src), [f"{src}: no test caps file", "test_caps.txt"]


def bad_karpathy_missing(tmp_path: Path) -> tuple[Callable[[], Source], list[str]]:
    path = tmp_path / "dataset_none.json"
    return lambda: read_karpathy(path), [f"annotation file not found: {path}"]


def bad_json(tmp_path: Path) -> tuple[Callable[[], Source], list[str]]:
    path = tmp_path / "dataset_bad.json"
    path.write_text('{"images": [', encoding="utf-8")
    return lambda: read_karpathy(path), [f"{path}: not valid JSON"]


def bad_karpathy_split(tmp_path: Path) -> tuple[Callable[[], Source], list[str]]:
    path = write_karpathy(tmp_path / "dataset_k.json", [("a_1.tif", "train", caps("a1")),
                                                        ("a_2.tif", "valid", caps("a2"))])
    return lambda: read_karpathy(path), ["dataset_k.json: images[1]", "'valid' is not train, restval, val or test"]


def bad_coco_image_id(tmp_path: Path) -> tuple[Callable[[], Source], list[str]]:
    folder = tmp_path / "coco"
    path = write_coco(folder / "ds_train.json", {"a_1.tif": caps("a1", 1)})
    data = json.loads(path.read_text(encoding="utf-8"))
    data["annotations"].append({"image_id": 99, "id": 7, "caption": "orphan"})
    write_json(path, data)
    write_coco(folder / "ds_test.json", {"b_1.tif": caps("b1", 1)})
    return lambda: read_coco(folder), ["ds_train.json: annotations[1]: image_id 99 is not in 'images'"]


def bad_two_train_files(tmp_path: Path) -> tuple[Callable[[], Source], list[str]]:
    folder = tmp_path / "xvlm"
    write_xvlm_train(folder / "rsitmd_train.json", {"a_1.tif": caps("a1")})
    write_xvlm_train(folder / "rsicd_train.json", {"a_2.tif": caps("a2")})
    write_xvlm_eval(folder / "rsitmd_test.json", {"b_1.tif": caps("b1")}, "test/")
    return lambda: read_xvlm(folder), [f"{folder}: several train files: rsicd_train.json, rsitmd_train.json"]


def bad_no_test_file(tmp_path: Path) -> tuple[Callable[[], Source], list[str]]:
    folder = tmp_path / "coco"
    write_coco(folder / "ds_train.json", {"a_1.tif": caps("a1")})
    write_coco(folder / "ds_val.json", {"c_1.tif": caps("c1")})
    return lambda: read_coco(folder), [f"{folder}: no test file"]


FORMAT_ERRORS = {"precomp-counts": bad_precomp_counts, "precomp-missing-file": bad_precomp_missing,
                 "karpathy-missing-file": bad_karpathy_missing, "invalid-json": bad_json,
                 "karpathy-split": bad_karpathy_split, "coco-image-id": bad_coco_image_id,
                 "two-train-files": bad_two_train_files, "no-test-file": bad_no_test_file}


@pytest.mark.parametrize("case_name", list(FORMAT_ERRORS))
def test_format_error_names_the_file(tmp_path: Path, case_name: str) -> None:
    """A file that does not follow its format stops the reader with a DataError naming the file (and where)."""
    read, fragments = FORMAT_ERRORS[case_name](tmp_path)
    with pytest.raises(DataError) as info:
        read()
    for fragment in fragments:
        assert fragment in str(info.value)


# ----------------------------------------------------------------------------- 7. the command line


@pytest.fixture(scope="module")
def cli_main() -> Callable[[list[str]], int]:
    return prepare_data_main("prepare_data_tool")


def cli_source(tmp_path: Path, blank: bool = False) -> Path:
    """Precomp: 10 train images (5 of scene a, 5 of b), 2 test images; one blank caption when ``blank``."""
    train = {f"{scene}_{i}.tif": caps(f"{scene}{i}") for scene in "ab" for i in range(5)}
    if blank:
        train["a_0.tif"][2] = " ."
    return write_precomp(tmp_path / "src", train, {"c_1.tif": caps("c1"), "a_9.tif": caps("a9")})


def split_line(stdout: str, split: str) -> list[str]:
    (line,) = [line for line in stdout.splitlines() if line.startswith(f"{split} ")]
    return line.split()


def test_cli_converts_prints_and_plots(tmp_path: Path, cli_main: Callable[[list[str]], int],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``main`` returns 0, prints the per-split numbers, writes the summary JSON and two readable PNGs."""
    out = tmp_path / "out"
    assert cli_main(["precomp", str(cli_source(tmp_path)), str(out), "--name", "ds", "--seed", "3"]) == 0
    stdout = capsys.readouterr().out
    assert split_line(stdout, "train")[:7] == ["train", "8", "40", "2", "0", "0", "0"]
    assert split_line(stdout, "val")[:7] == ["val", "2", "10", "2", "0", "0", "0"]
    assert split_line(stdout, "test")[:7] == ["test", "2", "10", "2", "0", "0", "0"]
    assert "problems: none" in stdout
    summary = json.loads((out / "ds_summary.json").read_text(encoding="utf-8"))
    assert {s: (v["images"], v["captions"]) for s, v in summary["splits"].items()} == {
        "train": (8, 40), "val": (2, 10), "test": (2, 10)}
    assert summary["source_format"] == "precomp" and summary["label_scheme"] == "prefix"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES + ["ds_caption_lengths.png",
                                                                          "ds_scenes.png"])
    for name in ("ds_scenes.png", "ds_caption_lengths.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG" and image.width > 100 and image.height > 100
        assert str(out / name) in stdout


def test_cli_no_plots_writes_no_png(tmp_path: Path, cli_main: Callable[[list[str]], int],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``--no-plots``: the JSON files and the report only."""
    out = tmp_path / "out"
    assert cli_main(["precomp", str(cli_source(tmp_path)), str(out), "--name", "ds", "--no-plots"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES


def test_cli_plots_dir_takes_the_figures(tmp_path: Path, cli_main: Callable[[list[str]], int],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``--plots-dir DIR``: the two PNGs go to DIR (created), the JSON files stay in OUT_DIR."""
    out, plots = tmp_path / "out", tmp_path / "assets" / "data"
    assert cli_main(["precomp", str(cli_source(tmp_path)), str(out), "--name", "ds", "--plots-dir", str(plots)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
    assert sorted(p.name for p in plots.iterdir()) == ["ds_caption_lengths.png", "ds_scenes.png"]


def test_cli_hard_problem_exits_1_then_allow_accepts_it(tmp_path: Path, cli_main: Callable[[list[str]], int],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A hard problem: status 1, "error:" with the kind and the report path on stderr, nothing on stdout;
    ``--allow blank-caption`` converts and prints what accepting did."""
    src = cli_source(tmp_path, blank=True)
    out = tmp_path / "out"
    assert cli_main(["precomp", str(src), str(out), "--name", "ds", "--no-plots"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: 1 hard problems: blank-caption (1); each is listed in ")
    assert str(out / "ds_problems.tsv") in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["ds_problems.tsv"]

    assert cli_main(["precomp", str(src), str(out), "--name", "ds", "--no-plots",
                     "--allow", "blank-caption"]) == 0
    stdout = capsys.readouterr().out
    assert f"accepted blank-caption: {HARD['blank-caption']}" in stdout
    assert "  blank-caption (accepted): 1" in stdout
    captions = [e["caption"] for s in ("train", "val") for e in read_split(out, s) if e["image"] == "a_0.tif"]
    flat = [c for item in captions for c in ([item] if isinstance(item, str) else item)]
    assert flat == [c for j, c in enumerate(caps("a0")) if j != 2]


def test_cli_empty_split_is_an_error_message(tmp_path: Path, cli_main: Callable[[list[str]], int],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A carved val of round(0.2 * 2) = 0 images: status 1 and an "error:" line, not a traceback."""
    src = write_precomp(tmp_path / "src", {"a_1.tif": caps("a1"), "a_2.tif": caps("a2")}, {"b_1.tif": caps("b1")})
    assert cli_main(["precomp", str(src), str(tmp_path / "out"), "--name", "ds", "--no-plots"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
