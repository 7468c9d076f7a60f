"""tools/search.py: indexing images and GeoTIFF tiles, incremental and resumed runs, bad files, FAISS choices,
text / image queries and their reports, with real models built from the demo configs."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from dataset.images import load_rgb, load_rgb_window
from dataset.scenes import plan_file, tile_offsets
from models import build_model, load_retriever
from models.objective import build_objective
from models.search_index import IndexOptions, load_index, update_index
from Retrieval import model_state
from scheduler import parse_stages
from utils.config import load_config
from utils.metrics import retrieval_metrics


def search_main():
    """tools/search.py's ``main``, imported from its file as the user runs it."""
    spec = importlib.util.spec_from_file_location("search_tool", ROOT / "tools" / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def save_checkpoint(config: dict, path: Path, seed: int = 0) -> Path:
    """A self-contained checkpoint of the model ``config`` builds (weights from ``seed``), as training writes."""
    torch.manual_seed(seed)
    model = build_model(config, pretrained=False)
    torch.save(model_state(model, build_objective(config, parse_stages(config)), config, 0, 0.0, "val"), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(load_config(tiny_config_path), tmp_path_factory.mktemp("ckpt") / "checkpoint.pth")


def split_of(root: Path) -> tuple[list[str], list[str], list[int]]:
    """A demo dataset's test images (absolute paths), their captions and each caption's image."""
    entries = json.loads((root / "demo_test.json").read_text())
    paths = [str(root / "images" / e["image"]) for e in entries]
    captions = [c for e in entries for c in e["caption"]]
    owners = [i for i, e in enumerate(entries) for _ in e["caption"]]
    return paths, captions, owners


@pytest.fixture(scope="module")
def test_split(demo_root: Path) -> tuple[list[str], list[str], list[int]]:
    return split_of(demo_root)


def index_with_the_tool(checkpoint: Path, paths: list[str], folder: Path, *options: str) -> Path:
    """``tools/search.py index`` of ``paths`` into ``folder``, as the user runs it."""
    assert search_main()(["index", "--checkpoint", str(checkpoint), "--images", *paths, "--index", str(folder),
                          *options]) == 0
    return folder


@pytest.fixture(scope="module")
def test_index(checkpoint: Path, test_split: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 20 demo test images indexed with the untrained checkpoint, in two shards."""
    return index_with_the_tool(checkpoint, test_split[0], tmp_path_factory.mktemp("index") / "idx",
                               "--workers", "2", "--batch_size", "8", "--shard_size", "16")


@pytest.fixture(scope="module")
def trained_split(search_demo_root: Path) -> tuple[list[str], list[str], list[int]]:
    return split_of(search_demo_root)


@pytest.fixture(scope="module")
def trained_index(trained_clip: Path, trained_split: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 100 test images of ``search_demo_root`` indexed with the trained CLIP, in two shards."""
    return index_with_the_tool(trained_clip, trained_split[0], tmp_path_factory.mktemp("trained_index") / "idx",
                               "--workers", "0", "--batch_size", "32", "--shard_size", "64")


def query_json(capsys: pytest.CaptureFixture, *argv: str) -> list[dict]:
    capsys.readouterr()
    assert search_main()(["query", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_queries_find_what_the_retrieval_metrics_measure(trained_index: Path, trained_clip: Path,
                                                              trained_split: tuple, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """Each test caption finds its own image in the top 10 for most queries (chance: 10 of 100 images), caption by
    caption where the evaluation's ranks say so, and as often as the checkpoint's evaluated img_r10."""
    paths, captions, owners = trained_split
    index = load_index(trained_index)
    assert [item.path for item in index.items] == sorted(paths) and len(index.manifest["shards"]) == 2
    order = [paths.index(item.path) for item in index.items]
    retriever = load_retriever(trained_clip)
    assert torch.allclose(index.embeddings, retriever.encode_images(paths)[order], atol=2e-3)

    (tmp_path / "queries.txt").write_text("\n".join(captions) + "\n")
    answers = query_json(capsys, "--index", str(trained_index), "--queries", str(tmp_path / "queries.txt"), "--top", "10")
    assert [a["query"] for a in answers] == captions
    assert all(len(a["results"]) == 10 and [r["rank"] for r in a["results"]] == list(range(1, 11)) for a in answers)
    assert set(answers[0]["results"][0]) == {"rank", "score", "path", "window", "crs", "bounds"}
    found = [paths[owner] in {r["path"] for r in a["results"]} for a, owner in zip(answers, owners)]

    sims = retriever.similarity(index.embeddings, retriever.encode_texts(captions)).cpu()
    img2txt = [[t for t, owner in enumerate(owners) if owner == image] for image in order]
    txt2img = [order.index(owner) for owner in owners]
    metrics = retrieval_metrics(sims, img2txt, txt2img)
    assert 100 * np.mean(found) > 50 and len(paths) == 100
    assert 100 * np.mean(found) == pytest.approx(metrics["img_r10"], abs=1.0)
    rank_of_own_image = (sims > sims[txt2img, range(len(captions))]).sum(0)  # caption by caption, not only the mean
    assert found == (rank_of_own_image < 10).tolist()
    assert len({tuple(r["path"] for r in a["results"]) for a in answers}) > 1  # queries rank differently


def test_contact_sheet_html_and_image_queries(test_index: Path, test_split: tuple, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    paths = test_split[0]
    out = tmp_path / "report"
    answers = query_json(capsys, "--index", str(test_index), "a red roof", "--image", paths[3], "--top", "4",
                         "--out", str(out))
    assert answers[0]["query"] == "a red roof" and answers[1]["query"] == {"image": paths[3]}
    assert answers[1]["results"][0]["path"] == paths[3] and answers[1]["results"][0]["score"] == pytest.approx(1, abs=1e-3)
    for number in (0, 1):
        sheet = out / f"query_{number:03d}.png"
        assert sheet.is_file() and load_rgb(sheet).width > 0
        page = (out / f"query_{number:03d}.html").read_text()
        assert page.count("<img src=\"thumbs/") == 4
        first = answers[number]["results"][0]["path"]
        assert f'href="{os.path.relpath(first, out)}"' in page
    assert search_main()(["query", "--index", str(test_index), "a red roof", "--top", "3"]) == 0
    table = capsys.readouterr().out
    assert "query: a red roof" in table and table.count(".png") == 3


def test_hnsw_and_ivf_give_the_exact_top1(test_index: Path, checkpoint: Path, test_split: tuple, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    texts = test_split[1][::5]
    exact = query_json(capsys, "--index", str(test_index), *texts, "--top", "1")
    for kind in ("hnsw", "ivf"):
        folder = tmp_path / kind
        shutil.copytree(test_index, folder)
        assert search_main()(["index", "--checkpoint", str(checkpoint), "--images", *test_split[0], "--index",
                              str(folder), "--faiss", kind, "--workers", "0"]) == 0
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["faiss"]["kind"] == kind
        assert query_json(capsys, "--index", str(folder), *texts, "--top", "1") == exact
    assert manifest["faiss"] == {"kind": "ivf", "nlist": 18, "nprobe": 16}


def write_scene(path: Path, bands: int, dtype: str) -> None:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    top = 255 if dtype == "uint8" else 65535
    data = rng.integers(0, top, size=(bands, 500, 600), endpoint=True).astype(dtype)
    with rasterio.open(path, "w", driver="GTiff", width=600, height=500, count=bands, dtype=dtype,
                       crs="EPSG:32633", transform=from_origin(500000.0, 4600000.0, 0.5, 0.5)) as dst:
        dst.write(data)


def test_geotiff_scenes_are_tiled_with_windows_and_bounds(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    import rasterio
    from rasterio.windows import Window

    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_scene(scenes / "rgb.tif", 3, "uint8")
    write_scene(scenes / "rgbn16.tif", 4, "uint16")
    assert tile_offsets(600, 256, 192) == [0, 192, 344] and tile_offsets(500, 256, 192) == [0, 192, 244]
    assert tile_offsets(200, 256, 192) == [0] and tile_offsets(512, 256, 256) == [0, 256]

    items = plan_file(str(scenes / "rgbn16.tif"), 256, 192)
    assert [item.window for item in items] == [(c, r, 256, 256) for r in (0, 192, 244) for c in (0, 192, 344)]
    with rasterio.open(scenes / "rgbn16.tif") as src:
        assert all(item.bounds == tuple(src.window_bounds(Window(*item.window))) for item in items)
    assert items[0].crs == "EPSG:32633" and items[0].bounds == (500000.0, 4600000.0 - 128, 500128.0, 4600000.0)
    assert [i.window for i in plan_file(str(scenes / "rgb.tif"), 0, 192)] == [None]

    whole = np.asarray(load_rgb(scenes / "rgbn16.tif"))  # the project's decoding: bands 1-3, 16 bits to 8
    col, row, width, height = items[4].window
    assert np.array_equal(np.asarray(load_rgb_window(scenes / "rgbn16.tif", items[4].window)),
                          whole[row:row + height, col:col + width])

    folder = tmp_path / "idx"
    assert search_main()(["index", "--checkpoint", str(checkpoint), "--images", str(scenes / "*.tif"), "--index",
                          str(folder), "--workers", "0"]) == 0
    index = load_index(folder)
    assert len(index.items) == 18 and index.manifest["files"] == 2
    assert [item.window for item in index.items[:9]] == [i.window for i in plan_file(str(scenes / "rgb.tif"), 256, 192)]

    out = tmp_path / "report"
    best = query_json(capsys, "--index", str(folder), "fields", "--top", "1", "--out", str(out))[0]["results"][0]
    assert best["crs"] == "EPSG:32633" and len(best["window"]) == 4 and len(best["bounds"]) == 4
    tile = load_rgb_window(best["path"], tuple(best["window"])).resize((160, 160))  # the tile, not the scene
    assert np.array_equal(np.asarray(load_rgb(out / "thumbs" / "query_000_rank_001.png")), np.asarray(tile))
    assert f"window {best['window']}" in (out / "query_000.html").read_text()


def test_incremental_runs_embed_only_new_and_changed_files(checkpoint: Path, test_split: tuple, tmp_path: Path,
                                                           tiny_config_path: Path, capsys: pytest.CaptureFixture
                                                           ) -> None:
    folder, images = tmp_path / "idx", tmp_path / "images"
    images.mkdir()
    for path in test_split[0][:3]:
        shutil.copy(path, images)
    retriever = load_retriever(checkpoint)
    options = IndexOptions(workers=0, shard_size=2)

    def run(*keys: str) -> dict:
        summary = update_index(folder, checkpoint, [str(images)], retriever, options, log=lambda line: None)
        return {k: summary[k] for k in keys}

    assert run("embedded") == {"embedded": 3}
    shutil.copy(test_split[0][3], images / "added.png")
    assert run("kept", "dropped", "embedded", "items") == {"kept": 3, "dropped": 0, "embedded": 1, "items": 4}
    changed = images / Path(test_split[0][0]).name
    before = load_index(folder).embeddings[[i.path for i in load_index(folder).items].index(str(changed))]
    shutil.copy(test_split[0][5], changed)
    assert run("kept", "dropped", "embedded") == {"kept": 3, "dropped": 1, "embedded": 1}
    index = load_index(folder)
    after = index.embeddings[[i.path for i in index.items].index(str(changed))]
    assert not torch.allclose(before, after) and len(index.items) == 4
    (images / "added.png").unlink()
    assert run("dropped", "embedded", "items") == {"dropped": 1, "embedded": 0, "items": 3}
    assert str(images / "added.png") not in {i.path for i in load_index(folder).items}

    other = save_checkpoint(load_config(tiny_config_path), tmp_path / "other.pth", seed=1)
    capsys.readouterr()
    assert search_main()(["index", "--checkpoint", str(other), "--images", str(images), "--index", str(folder)]) == 1
    assert "was made with checkpoint" in capsys.readouterr().err
    assert search_main()(["index", "--checkpoint", str(checkpoint), "--images", str(images), "--index", str(folder),
                          "--stride", "128"]) == 1
    assert "was made with --stride 192" in capsys.readouterr().err


def test_a_corrupt_file_is_reported_and_skipped(checkpoint: Path, test_split: tuple, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in test_split[0][:2]:
        shutil.copy(path, images)
    data = Path(test_split[0][2]).read_bytes()
    (images / "truncated.png").write_bytes(data[:len(data) // 2])
    capsys.readouterr()
    assert search_main()(["index", "--checkpoint", str(checkpoint), "--images", str(images), "--index",
                          str(tmp_path / "idx"), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert f"skipped: cannot decode image {images / 'truncated.png'}" in err
    assert "embedded 3/3 items" in err and "images/s, ETA" in err
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert [p["path"] for p in manifest["problems"]] == [str(images / "truncated.png")]
    assert manifest["items"] == 2


def test_a_killed_run_resumes_to_the_uninterrupted_index(checkpoint: Path, demo_root: Path, tmp_path: Path) -> None:
    argv = ["index", "--checkpoint", str(checkpoint), "--images", str(demo_root / "images"), "--workers", "0",
            "--batch_size", "2", "--shard_size", "2"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "tools" / "search.py"), *argv, "--index", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "shard_000000.npy").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        load_index(killed)
    written = len(list(killed.glob("shard_*.npy")))
    assert 1 <= written < 60

    assert search_main()([*argv, "--index", str(killed)]) == 0
    assert search_main()([*argv, "--index", str(tmp_path / "whole")]) == 0
    resumed, whole = load_index(killed), load_index(tmp_path / "whole")
    assert resumed.items == whole.items and len(whole.items) == 120
    assert torch.equal(resumed.embeddings, whole.embeddings)


def test_a_pairwise_model_queries_through_its_similarity(demo_root: Path, test_split: tuple, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    config = load_config(ROOT / "configs" / "demo_amfmn.yaml", [
        "synthetic_data=null", f"train_file=[{demo_root}/demo_train.json]", f"image_root={demo_root}/images"])
    checkpoint = save_checkpoint(config, tmp_path / "amfmn.pth")
    paths, captions = test_split[0][:6], test_split[1][:3]
    assert search_main()(["index", "--checkpoint", str(checkpoint), "--images", *paths, "--index",
                          str(tmp_path / "idx"), "--workers", "0"]) == 0
    index = load_index(tmp_path / "idx")
    assert index.faiss is None and not (tmp_path / "idx" / "faiss.index").exists()
    answers = query_json(capsys, "--index", str(tmp_path / "idx"), *captions, "--top", "6")

    retriever = load_retriever(checkpoint)
    sims = retriever.similarity(index.embeddings, retriever.encode_texts(captions)).cpu()
    for answer, column in zip(answers, sims.t()):
        expected = [index.items[i].path for i in column.argsort(descending=True).tolist()]
        assert [r["path"] for r in answer["results"]] == expected
        assert [r["score"] for r in answer["results"]] == pytest.approx(sorted(column.tolist(), reverse=True), abs=1e-5)


def test_two_torchrun_processes_build_the_index_of_one(checkpoint: Path, test_split: tuple, tmp_path: Path) -> None:
    """Each gloo process embeds its share into shards of its own; rank 0 merges them, with a bad file that only
    one process reads reported; a second run embeds nothing."""
    images = tmp_path / "images"
    images.mkdir()
    for path in test_split[0]:
        shutil.copy(path, images)
    data = Path(test_split[0][0]).read_bytes()
    (images / "zz_truncated.png").write_bytes(data[:len(data) // 2])  # sorted last: in the second process's share
    argv = ["index", "--checkpoint", str(checkpoint), "--images", str(images), "--workers", "0", "--batch_size", "3",
            "--shard_size", "4"]
    assert search_main()([*argv, "--index", str(tmp_path / "one")]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "tools" / "search.py"), *argv, "--index", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        result = subprocess.run(torchrun, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "21 files; 20 items kept, 0 dropped (removed or changed files), 1 to embed by 2 processes" in result.stderr
    assert "20 items (0 embedded now), 1 problem(s)" in result.stderr  # the bad file is tried again, and reported

    one, two = load_index(tmp_path / "one"), load_index(tmp_path / "two")
    assert two.manifest["problems"] == one.manifest["problems"]
    assert [p["path"] for p in one.manifest["problems"]] == [str(images / "zz_truncated.png")]
    names = two.manifest["shards"]
    assert len(names) == 6 and {int(n.split("_")[1]) % 2 for n in names} == {0, 1}  # 3 shards of each process
    order = [[i.key for i in two.items].index(item.key) for item in one.items]
    assert len(two.items) == len(one.items) == 20 and [two.items[i] for i in order] == one.items
    assert torch.allclose(two.embeddings[order], one.embeddings, atol=2e-3)
    assert two.faiss.ntotal == 20
    _, rows = two.faiss.search(np.ascontiguousarray(two.embeddings[order].numpy()), 1)
    assert rows[:, 0].tolist() == order


def test_the_demo_scene_tiles_find_what_their_images_find(trained_clip: Path, search_demo_root: Path,
                                                          trained_split: tuple, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """tools/make_demo_data.py --scene: 16 test images in one GeoTIFF; tiled at the image size, each tile is its
    image (same pixels, bounds from the transform) and a caption scores the tile as it scores the image."""
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "tools" / "make_demo_data.py")
    make_demo_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo_data)
    scene = tmp_path / "scene.tif"
    placed = make_demo_data.write_scene(search_demo_root, scene)
    assert len(placed) == 16 and len({entry["label_name"] for entry, _ in placed}) == 10
    items = plan_file(str(scene), 32, 32)
    assert [item.window for item in items] == [window for _, window in placed]
    assert items[5].bounds == (500000.0 + 16, 4600000.0 - 32, 500000.0 + 32, 4600000.0 - 16)  # 0.5 m pixels
    for (entry, window), item in zip(placed, items):
        image = np.asarray(load_rgb(search_demo_root / "images" / entry["image"]))
        assert np.array_equal(np.asarray(load_rgb_window(scene, item.window)), image)

    folder = tmp_path / "idx"
    assert search_main()(["index", "--checkpoint", str(trained_clip), "--images", *trained_split[0], str(scene),
                          "--tile", "32", "--stride", "32", "--index", str(folder), "--workers", "0"]) == 0
    answers = query_json(capsys, "--index", str(folder), *[entry["caption"][0] for entry, _ in placed], "--top", "116")
    tiles_in_top10 = 0
    for (entry, window), answer in zip(placed, answers):
        score = {(Path(r["path"]).name, None if r["window"] is None else tuple(r["window"])): r["score"]
                 for r in answer["results"]}
        assert len(score) == 116
        assert score[("scene.tif", window)] == pytest.approx(score[(entry["image"], None)], abs=2e-3)
        tiles_in_top10 += ("scene.tif", list(window)) in [(Path(r["path"]).name, r["window"])
                                                          for r in answer["results"][:10]]
    assert tiles_in_top10 >= 1


def test_a_scene_is_stretched_as_a_whole_with_the_decoding_given(checkpoint: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """--scale percentile --bands 3 2 1: every tile of a 16-bit 4-band scene is stretched by the whole scene's
    percentiles (a tile is its crop of the decoded scene, not a tile stretched on its own), the decoding is
    recorded in the manifest, and a rerun with another decoding is refused."""
    import rasterio
    from rasterio.transform import from_origin

    from dataset.images import ImageDecoding, scene_stretch
    from dataset.scenes import read_item

    cols = np.arange(600, dtype=np.float64)[None, None, :]
    rng = np.random.default_rng(0)
    data = (cols * 50 + np.arange(4)[:, None, None] * 3000 + rng.integers(0, 500, (4, 500, 600))).astype("uint16")
    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=600, height=500, count=4, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(500000.0, 4600000.0, 0.5, 0.5)) as dst:
        dst.write(data)
    argv = ["index", "--checkpoint", str(checkpoint), "--images", str(scene), "--index", str(tmp_path / "idx"),
            "--workers", "0"]
    assert search_main()([*argv, "--scale", "percentile", "--bands", "3", "2", "1"]) == 0
    index = load_index(tmp_path / "idx")
    assert index.manifest["image_decode"] == {**load_retriever(checkpoint).config["image_decode"],
                                              "scale": "percentile", "bands": [3, 2, 1]}
    decoding = index.decoding
    expected = [np.percentile(data[b - 1].astype(np.float64), (2, 98)).tolist() for b in (3, 2, 1)]
    assert len(index.items) == 9 and all(np.allclose(item.stretch, expected) for item in index.items)

    whole = np.asarray(load_rgb(scene, decoding))  # the scene decoded at once: its own percentiles
    tiles = []
    for item in index.items:
        col, row, width, height = item.window
        tile = read_item(item, decoding)
        assert np.array_equal(np.asarray(tile), whole[row:row + height, col:col + width])
        tiles.append(tile)
    alone = np.asarray(load_rgb_window(scene, index.items[0].window, decoding))  # the window's own percentiles
    assert np.abs(alone.astype(int) - np.asarray(tiles[0]).astype(int)).mean() > 20
    assert torch.allclose(index.embeddings, load_retriever(checkpoint).encode_images(tiles), atol=2e-3)
    decimated = scene_stretch(scene, decoding, long_side=100)  # 100 x 83 samples of the scene
    assert np.allclose(decimated, expected, rtol=0.05)
    assert scene_stretch(scene, ImageDecoding()) is None  # depth scale: nothing to share

    capsys.readouterr()
    assert search_main()([*argv, "--scale", "depth", "--bands", "3", "2", "1"]) == 1
    assert "was made with image_decode" in capsys.readouterr().err
    assert search_main()([*argv, "--percentiles", "98", "2"]) == 1
    assert "image_decode.percentiles" in capsys.readouterr().err
