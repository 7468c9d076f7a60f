"""tools/prepare_data.py on the real public annotation files of ../shared/datasets (skipped without them).

The conversions must reproduce the public splits: RSITMD from its precomp files and the fixed split equals
the public finetune JSONs image by image, caption by caption and scene by scene; RSICD's val and test equal
its public JSONs; UCM and Sydney convert with their standard counts (data-and-protocol.md §2, §5).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, SHARED_DATASETS

sys.path.insert(0, str(ROOT / "tools"))
import prepare_data  # noqa: E402

pytestmark = pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason="../shared/datasets is absent")

RSITMD = SHARED_DATASETS / "RSITMD"
RSICD = SHARED_DATASETS / "RSICD"
UCM = SHARED_DATASETS / "UCM-captions"
SYDNEY = SHARED_DATASETS / "Sydney-captions"


def convert(out_dir: Path, source_format: str, src: Path, *options: str) -> dict[str, Any]:
    """Run the tool; return the written splits and summary."""
    name = options[options.index("--name") + 1]
    assert prepare_data.main([source_format, str(src), str(out_dir), *options, "--no-plots"]) == 0
    read = lambda part: json.loads((out_dir / f"{name}_{part}.json").read_text(encoding="utf-8"))  # noqa: E731
    return {part: read(part) for part in ("train", "val", "test", "summary")}


def captions_by_image(entries: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Base image name -> its captions in order, for per-caption (train) or per-image (eval) entries."""
    out: dict[str, list[str]] = {}
    for entry in entries:
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        out.setdefault(Path(entry["image"]).name, []).extend(captions)
    return out


def public(dataset: Path, split: str) -> list[dict[str, Any]]:
    return json.loads((dataset / "finetune_json" / f"{dataset.name.lower()}_{split}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rsitmd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return convert(tmp_path_factory.mktemp("rsitmd"), "precomp", RSITMD / "precomp", "--name", "rsitmd",
                   "--fixed-split", str(RSITMD / "fixed_split_precomp"),
                   "--captions-from", str(RSITMD / "finetune_json" / "rsitmd_train.json"))


@pytest.fixture(scope="module")
def rsicd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return convert(tmp_path_factory.mktemp("rsicd"), "precomp", RSICD / "precomp", "--name", "rsicd",
                   "--fixed-split", str(RSICD / "fixed_split_precomp"), "--allow", "blank-caption")


def test_rsitmd_precomp_equals_public_json(rsitmd: dict[str, Any]) -> None:
    """3,435 / 856 / 452 images with the public captions per image, and train entry by entry in order."""
    assert [rsitmd["summary"]["splits"][s]["images"] for s in ("train", "val", "test")] == [3435, 856, 452]
    for split in ("train", "val", "test"):
        assert captions_by_image(rsitmd[split]) == captions_by_image(public(RSITMD, split)), split
    ours = [(e["caption"], e["image"], e["label"], e["label_name"]) for e in rsitmd["train"]]
    theirs = [(e["caption"], Path(e["image"]).name, e["label"], e["label_name"]) for e in public(RSITMD, "train")]
    assert ours == theirs


def test_rsitmd_scene_labels_equal_public(rsitmd: dict[str, Any]) -> None:
    """33 prefixes; label ids in order of first appearance in train (bridge 0 ... boat 32), val reuses them."""
    ours = {e["image"]: (e["label"], e["label_name"]) for e in rsitmd["val"]}
    assert ours == {Path(e["image"]).name: (e["label"], e["label_name"]) for e in public(RSITMD, "val")}
    names = {e["label"]: e["label_name"] for e in rsitmd["train"]}
    assert len(names) == 33 and names[0] == "bridge" and names[32] == "boat"
    test_names = {e["label_name"] for e in rsitmd["test"]}
    assert test_names <= set(names.values()) and len(test_names) == 32


def test_rsitmd_report_and_summary(rsitmd: dict[str, Any]) -> None:
    """The four blank images were fixed (notes), and the repeated captions are counted as the docs count them."""
    summary = rsitmd["summary"]
    assert summary["problems"]["fixed-caption (note)"] == 4
    assert not any("(error)" in kind or "(accepted)" in kind for kind in summary["problems"])
    assert summary["splits"]["train"]["images_repeating_a_caption"] == 682
    assert summary["splits"]["test"]["captions_shared_by_images"] == 3
    assert summary["splits"]["train"]["captions"] == 17175
    assert "23.9 % of 17175 captions get 0.95" in summary["caption_weights"]


def test_rsitmd_blank_captions_stop_without_a_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Without --captions-from the four blank-caption images are hard problems, listed with their lines."""
    code = prepare_data.main(["precomp", str(RSITMD / "precomp"), str(tmp_path), "--name", "rsitmd",
                              "--fixed-split", str(RSITMD / "fixed_split_precomp"), "--no-plots"])
    assert code == 1 and "blank-caption (4)" in capsys.readouterr().err
    errors = [line.split("\t") for line in (tmp_path / "rsitmd_problems.tsv").read_text().splitlines()
              if "\terror\t" in line]
    assert sorted((row[3], row[4]) for row in errors) == [
        ("mountain_2378.tif", "train_caps_verify.txt:5586-5590"),
        ("railwaystation_3254.tif", "train_caps_verify.txt:14586-14590"),
        ("storagetanks_4367.tif", "train_caps_verify.txt:3546-3550"),
        ("viaduct_4635.tif", "train_caps_verify.txt:4811-4815")]
    assert not (tmp_path / "rsitmd_train.json").exists()


def test_rsitmd_from_public_json_equals_precomp(rsitmd: dict[str, Any], tmp_path: Path) -> None:
    """The xvlm route re-labels the public JSONs into the same files (test gains labels, ids get contiguous)."""
    again = convert(tmp_path, "xvlm", RSITMD / "finetune_json", "--name", "rsitmd")
    assert again["train"] == rsitmd["train"]
    for split in ("val", "test"):
        assert captions_by_image(again[split]) == captions_by_image(rsitmd[split])


def test_rsicd_val_and_test_equal_public_json(rsicd: dict[str, Any]) -> None:
    """1,966 / 1,093 images with the public captions; 7,862 train images (the public train's split)."""
    splits = rsicd["summary"]["splits"]
    assert [splits[s]["images"] for s in ("train", "val", "test")] == [7862, 1966, 1093]
    for split in ("val", "test"):
        assert captions_by_image(rsicd[split]) == captions_by_image(public(RSICD, split)), split


def test_rsicd_numeric_names_and_blank_captions(rsicd: dict[str, Any]) -> None:
    """921 numeric names get scenes of their own (689 / 166 / 66) beside 30 named scenes; the three captions
    that are only " ." were dropped (accepted), so train has 39,307 captions."""
    splits = rsicd["summary"]["splits"]
    assert [splits[s]["images_with_own_scene"] for s in ("train", "val", "test")] == [689, 166, 66]
    assert [splits[s]["scenes"] for s in ("train", "val", "test")] == [30, 30, 30]
    assert rsicd["summary"]["problems"]["blank-caption (accepted)"] == 3
    assert splits["train"]["captions"] == 39310 - 3
    assert splits["test"]["images_repeating_a_caption"] == 1030
    assert splits["test"]["captions_shared_by_images"] == 150
    numeric = next(e for e in rsicd["val"] if e["image"] == "00017.jpg")
    assert numeric["label_name"] == "00017.jpg"


def test_ucm_from_coco_and_precomp_agree(tmp_path: Path) -> None:
    """COCO: 1,680 / 210 / 210 images, 21 scenes of 100 file numbers; the precomp test equals the COCO test
    and the precomp train is COCO train + val."""
    coco = convert(tmp_path / "coco", "coco", UCM / "coco_json", "--name", "ucm", "--labels", "ucm")
    splits = coco["summary"]["splits"]
    assert [(splits[s]["images"], splits[s]["captions"], splits[s]["scenes"]) for s in ("train", "val", "test")] \
        == [(1680, 8400, 21), (210, 1050, 21), (210, 1050, 21)]
    assert {e["label_name"] for e in coco["train"] if e["image"] == "1001.tif"} == {"harbor"}
    precomp = convert(tmp_path / "precomp", "precomp", UCM / "precomp", "--name", "ucm", "--labels", "ucm")
    assert captions_by_image(precomp["test"]) == captions_by_image(coco["test"])
    both = {**captions_by_image(precomp["train"]), **captions_by_image(precomp["val"])}
    assert both == {**captions_by_image(coco["train"]), **captions_by_image(coco["val"])}
    assert precomp["summary"]["splits"]["val"]["images"] == round(0.2 * 1890)


def test_sydney_from_karpathy(tmp_path: Path) -> None:
    """497 / 58 / 58 images with 5 captions each; no class in the names, so one scene per image."""
    sydney = convert(tmp_path, "karpathy", SYDNEY / "dataset_sydney_modified.json", "--name", "sydney",
                     "--labels", "singleton")
    splits = sydney["summary"]["splits"]
    assert [(splits[s]["images"], splits[s]["captions"]) for s in ("train", "val", "test")] \
        == [(497, 2485), (58, 290), (58, 290)]
    assert [splits[s]["images_with_own_scene"] for s in ("train", "val", "test")] == [497, 58, 58]
    assert all(len(entry["caption"]) == 5 for entry in sydney["test"])
