"""Training augmentation: word deletion, caption weights, RandomAugment, GridMask and the per-kind pipelines.

Images are real PNGs written with Pillow into ``tmp_path``. The caption weights of the public RSITMD train
JSON are checked in test_data.py, beside the other real-file tests.
"""
from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from conftest import write_json
from dataset import create_train_loader, transforms
from dataset.annotations import DataError, load_train_annotations
from dataset.captions import delete_words
from dataset.gridmask import GridMask, grid_mask
from dataset.randaugment import RandomAugment
from dataset.re_dataset import RetrievalTrainDataset, TrainCollator, seeded_rng
from dataset.transforms import BLUR_KERNEL, CLIP_MEAN, CLIP_STD, train_transform
from models.text import BertWordPieceProcessor
from utils.config import load_config
from utils.distributed import DistInfo

KINDS = ("re", "re_rsitmd", "re_rsicd", "re_ucm", "re_sydney")


def noise_png(path: Path, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """A real RGB PNG of random pixels; ``size`` is (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def uniform(value: tuple[int, int, int], size: int = 20) -> Image.Image:
    return Image.new("RGB", (size, size), value)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


# ----------------------------------------------------------------------------- word deletion


def test_delete_words_rate_zero_is_the_identity_and_draws_nothing() -> None:
    random.seed(1)
    state = random.getstate()
    assert delete_words("a red roof near the river", 0.0) == "a red roof near the river"
    assert random.getstate() == state


def test_delete_words_rate_one_keeps_exactly_one_word() -> None:
    words = "many green trees around a large pond".split()
    for seed in range(20):
        random.seed(seed)
        kept = delete_words(" ".join(words), 1.0)
        assert kept in words
    assert len({delete_words(" ".join(words), 1.0) for _ in range(50)}) > 1  # not always the same word


def test_delete_words_is_deterministic_under_a_seed() -> None:
    caption = " ".join(f"w{i}" for i in range(40))
    random.seed(7)
    first = delete_words(caption, 0.3)
    random.seed(7)
    assert delete_words(caption, 0.3) == first
    random.seed(8)
    assert delete_words(caption, 0.3) != first
    assert set(first.split()) <= set(caption.split())
    assert first.split() == [w for w in caption.split() if w in set(first.split())]  # order is kept


def test_delete_words_drops_about_rate_of_the_words() -> None:
    random.seed(0)
    caption = " ".join(["word"] * 20000)
    kept = len(delete_words(caption, 0.3).split())
    assert kept / 20000 == pytest.approx(0.7, abs=0.015)


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_delete_words_rejects_a_rate_outside_0_1(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        delete_words("a b", rate)


# ----------------------------------------------------------------------------- caption weights


def _train_json(tmp_path: Path, captions: list[str], lengths: list[object] | None = None) -> str:
    entries = []
    for i, caption in enumerate(captions):
        noise_png(tmp_path / f"scene_{i}.png", (8, 8), seed=i)
        entry = {"image": f"scene_{i}.png", "caption": caption, "image_id": i}
        if lengths is not None and lengths[i] is not None:
            entry["length"] = lengths[i]
        entries.append(entry)
    return str(write_json(tmp_path / "train.json", entries))


# word counts after pre_caption (max_words 8): 2, 4, 6, 8, 8 -> mean 5.6
WEIGHT_CAPTIONS = ["Two words.", "a large-river bend", "one two three four five six",
                   "a b c d e f g h", "a b c d e f g h i j k"]


def test_short_low_rule_weights_short_captions(tmp_path: Path) -> None:
    file = _train_json(tmp_path, WEIGHT_CAPTIONS)
    ann = load_train_annotations([file], str(tmp_path), 8)
    # threshold 0.7 * 5.6 = 3.92: only the 2-word caption is short
    assert ann.caption_weights == [0.95, 1.0, 1.0, 1.0, 1.0]
    assert ann.weight_source == "rule short_low: mean 5.60 words, threshold 3.92 words, 20.0 % of 5 captions get 0.95"
    custom = load_train_annotations([file], str(tmp_path), 8,
                                    caption_weight={"rule": "short_low", "avg_ratio": 0.8, "low": 0.5})
    assert custom.caption_weights == [0.5, 0.5, 1.0, 1.0, 1.0]  # threshold 4.48


def test_clip_rule_weights_by_relative_length(tmp_path: Path) -> None:
    file = _train_json(tmp_path, WEIGHT_CAPTIONS)
    ann = load_train_annotations([file], str(tmp_path), 8, caption_weight={"rule": "clip", "avg_ratio": 0.7,
                                                                           "low": 0.5})
    assert ann.caption_weights == pytest.approx([0.5, 4 / 5.6, 1.0, 1.0, 1.0], abs=1e-12)
    assert ann.weight_source.startswith("rule clip: mean 5.60 words")


def test_none_rule_weights_every_caption_one(tmp_path: Path) -> None:
    file = _train_json(tmp_path, WEIGHT_CAPTIONS)
    ann = load_train_annotations([file], str(tmp_path), 8, caption_weight={"rule": "none"})
    assert ann.caption_weights == [1.0] * 5 and ann.weight_source == "rule none: all 5 captions weigh 1"


def test_unknown_rule_is_an_error(tmp_path: Path) -> None:
    file = _train_json(tmp_path, WEIGHT_CAPTIONS)
    with pytest.raises(ValueError, match="short_low, clip or none"):
        load_train_annotations([file], str(tmp_path), 8, caption_weight={"rule": "longest"})


def test_length_field_is_used_when_present(tmp_path: Path) -> None:
    file = _train_json(tmp_path, WEIGHT_CAPTIONS, lengths=[1, 0.95, 2.5, 1, 0.5])
    ann = load_train_annotations([file], str(tmp_path), 8, caption_weight={"rule": "none"})
    assert ann.caption_weights == [1.0, 0.95, 2.5, 1.0, 0.5]
    assert ann.weight_source.startswith("field 'length'")


def test_length_in_some_entries_only_is_an_error(tmp_path: Path) -> None:
    file = _train_json(tmp_path, WEIGHT_CAPTIONS, lengths=[1, 1, None, 1, 1])
    with pytest.raises(DataError, match="entry 2.*'length' is absent") as err:
        load_train_annotations([file], str(tmp_path), 8)
    assert file in str(err.value)
    file = _train_json(tmp_path, WEIGHT_CAPTIONS, lengths=[None, None, None, 1, None])
    with pytest.raises(DataError, match="entry 3.*'length' is present"):
        load_train_annotations([file], str(tmp_path), 8)


@pytest.mark.parametrize("bad", [True, 0, -1.0, "1.0", None])
def test_length_must_be_a_positive_number(tmp_path: Path, bad: object) -> None:
    entries = [{"image": "scene_0.png", "caption": "a roof", "image_id": 0, "length": 1.0},
               {"image": "scene_0.png", "caption": "a road", "image_id": 0, "length": bad}]
    noise_png(tmp_path / "scene_0.png", (8, 8))
    file = str(write_json(tmp_path / "train.json", entries))
    with pytest.raises(DataError, match="entry 1.*'length'") as err:
        load_train_annotations([file], str(tmp_path), 8)
    assert file in str(err.value)


def test_weights_follow_the_kept_entries_when_skipping(tmp_path: Path) -> None:
    file = _train_json(tmp_path, WEIGHT_CAPTIONS, lengths=[0.1, 0.2, 0.3, 0.4, 0.5])
    os.remove(tmp_path / "scene_1.png")
    ann = load_train_annotations([file], str(tmp_path), 8, skip_bad=True)
    assert ann.skipped == 1 and ann.caption_weights == [0.1, 0.3, 0.4, 0.5]
    file = _train_json(tmp_path, WEIGHT_CAPTIONS)
    os.remove(tmp_path / "scene_0.png")  # the mean is over the kept captions: 4, 6, 8, 8 words -> 6.5
    ann = load_train_annotations([file], str(tmp_path), 8, skip_bad=True)
    assert ann.caption_weights == [0.95, 1.0, 1.0, 1.0] and "threshold 4.55 words" in ann.weight_source


# ----------------------------------------------------------------------------- RandomAugment


def test_random_augment_op_list_and_defaults() -> None:
    augment = RandomAugment()
    assert (augment.num_ops, augment.magnitude, augment.prob) == (2, 7, 0.5)
    assert set(augment.ops) == {"Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX",
                                "ShearY", "TranslateX", "TranslateY", "Rotate"}
    with pytest.raises(ValueError, match="Solarize"):
        RandomAugment(ops=("Solarize",))


def test_identity_changes_nothing() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    assert np.array_equal(pixels(RandomAugment().apply_op(image, "Identity")), pixels(image))


def test_brightness_multiplies_by_1_36_and_only_brightens() -> None:
    augment = RandomAugment(magnitude=7)
    out = pixels(augment.apply_op(uniform((100, 50, 25)), "Brightness", sign=-1))  # the sign is ignored
    assert (out == [136, 68, 34]).all()
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    expected = np.floor(np.clip(pixels(noisy) * 1.36, 0, 255))  # truncated, as X-VLM's uint8 cast
    assert np.abs(pixels(augment.apply_op(noisy, "Brightness")) - expected).max() <= 1


def test_sharpness_overshoots_an_edge() -> None:
    step = np.zeros((20, 20, 3), np.uint8)
    step[:, :10], step[:, 10:] = 60, 180
    out = pixels(RandomAugment().apply_op(Image.fromarray(step), "Sharpness", sign=-1))
    assert (out[5:15, 9] < 60).all() and (out[5:15, 10] > 180).all()  # factor 1.36 > 1: sharper, never blurred
    assert (out[5:15, 3] == 60).all() and (out[5:15, 16] == 180).all()  # flat regions stay


def test_autocontrast_stretches_and_equalize_spreads() -> None:
    low_contrast = np.random.default_rng(2).integers(100, 140, (20, 20, 3), dtype=np.uint8)
    stretched = pixels(RandomAugment().apply_op(Image.fromarray(low_contrast), "AutoContrast"))
    assert stretched.min() == 0 and stretched.max() == 255
    equalized = pixels(RandomAugment().apply_op(Image.fromarray(low_contrast), "Equalize"))
    assert equalized.max() - equalized.min() > 200


def _blob_centre(image: Image.Image) -> np.ndarray:
    """Intensity centroid (x, y) of the bright blob, ignoring the black background and the grey fill."""
    weight = np.clip(pixels(image)[..., 0] - 128, 0, None).astype(float)
    ys, xs = np.indices(weight.shape)
    return np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()


def _blob_image(x: int, y: int, size: int = 101) -> Image.Image:
    array = np.zeros((size, size, 3), np.uint8)
    array[y - 1:y + 2, x - 1:x + 2] = 255
    return Image.fromarray(array)


@pytest.mark.parametrize("sign", [1, -1])
def test_geometric_magnitudes(sign: int) -> None:
    augment = RandomAugment(magnitude=7)
    # translate: 10 px * 7/10 = 7 px
    moved = _blob_centre(augment.apply_op(_blob_image(50, 50), "TranslateX", sign)) - [50, 50]
    assert np.allclose(np.abs(moved), [7, 0], atol=0.01)
    moved = _blob_centre(augment.apply_op(_blob_image(50, 50), "TranslateY", sign)) - [50, 50]
    assert np.allclose(np.abs(moved), [0, 7], atol=0.01)
    # shear about the top-left corner: factor 0.3 * 7/10 = 0.21 times the other coordinate
    moved = _blob_centre(augment.apply_op(_blob_image(30, 80), "ShearX", sign)) - [30, 80]
    assert abs(moved[0]) == pytest.approx(0.21 * 80, abs=0.3) and abs(moved[1]) < 0.3
    moved = _blob_centre(augment.apply_op(_blob_image(80, 30), "ShearY", sign)) - [80, 30]
    assert abs(moved[1]) == pytest.approx(0.21 * 80, abs=0.3) and abs(moved[0]) < 0.3
    # rotate about the centre by 30 deg * 7/10 = 21 deg
    x, y = _blob_centre(augment.apply_op(_blob_image(90, 50), "Rotate", sign)) - [50, 50]
    assert math.hypot(x, y) == pytest.approx(40, abs=0.5)
    assert abs(math.degrees(math.atan2(-y, x))) == pytest.approx(21, abs=0.5)
    assert math.copysign(1, -y) == sign  # positive = counter-clockwise


@pytest.mark.parametrize("op", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
def test_geometric_ops_keep_the_size_and_fill_grey(op: str) -> None:
    red = Image.new("RGB", (30, 24), (255, 0, 0))
    out = pixels(RandomAugment().apply_op(red, op, sign=1))
    assert out.shape == (24, 30, 3)
    grey = (out == 128).all(-1)
    assert grey.sum() > 0 and (out[~grey] != 128).any(-1).all()
    assert ((out == [255, 0, 0]).all(-1) | grey).mean() > 0.9  # the rest is red or a thin interpolated seam


def test_random_augment_samples_with_replacement_under_torch_seed() -> None:
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    augment = RandomAugment(2, 7)
    torch.manual_seed(5)
    first = pixels(augment(image))
    torch.manual_seed(5)
    assert np.array_equal(pixels(augment(image)), first)
    changed = 0
    for seed in range(40):
        torch.manual_seed(seed)
        changed += not np.array_equal(pixels(augment(image)), pixels(image))
    assert 10 < changed < 40  # ops are skipped with p 0.5 (and Identity exists), so some images stay
    only_brightness = RandomAugment(3, 7, prob=1.0, ops=("Brightness",))
    assert (pixels(only_brightness(uniform((50, 50, 50)))) == 125).all()  # 50 * 1.36^3, drawn 3 times


# ----------------------------------------------------------------------------- GridMask


@pytest.mark.parametrize("d, side", [(32, 224), (56, 224), (20, 100), (96, 960)])
@pytest.mark.parametrize("mode", [0, 1])
def test_grid_mask_kept_fraction_at_rotation_0(d: int, side: int, mode: int) -> None:
    stripe = math.ceil(d * 0.4)
    theory = (d - stripe) ** 2 / d ** 2
    for offset in [(0, 0), (d // 3, d - 1)]:
        kept = grid_mask(side, side, d, stripe, offset, 0.0, mode).mean().item()
        assert kept == pytest.approx(theory if mode == 0 else 1 - theory, abs=1e-6)  # whole periods: exact


@pytest.mark.parametrize("angle", [17.0, 45.0, 300.0])
def test_grid_mask_rotation_keeps_the_area(angle: float) -> None:
    d, stripe = 40, 16
    kept = grid_mask(800, 800, d, stripe, (5, 11), angle, mode=0)
    assert kept.mean().item() == pytest.approx((d - stripe) ** 2 / d ** 2, abs=0.01)
    assert not torch.equal(kept, grid_mask(800, 800, d, stripe, (5, 11), 0.0, mode=0))


def test_gridmask_zeroes_the_masked_pixels() -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 100, 100) + 0.1
    # d_range (0.2, 0.21) of 100 px fixes d = 20, stripe 8; 5 whole periods
    for mode, kept in [(0, 0.36), (1, 0.64)]:
        out = GridMask(d_range=(0.2, 0.21), ratio=0.4, max_rotate=0, mode=mode, prob=1.0)(image)
        masked = out == 0
        assert masked.float().mean().item() == pytest.approx(1 - kept, abs=1e-6)
        assert torch.equal(out[~masked], image[~masked])
        assert (masked == masked[0]).all()  # the same mask on every channel
        rows, cols = masked[0].all(1), masked[0].all(0)
        if mode == 0:  # 8-pixel stripes every 20 rows and columns
            assert rows.sum() == 40 and cols.sum() == 40


def test_gridmask_with_prob_0_returns_the_image() -> None:
    image = torch.rand(3, 32, 32)
    assert torch.equal(GridMask(prob=0.0)(image), image)


def _inner_runs(flags: torch.Tensor) -> list[int]:
    """Lengths of the runs of True that touch neither end."""
    edges = torch.diff(flags.int(), prepend=torch.tensor([0]), append=torch.tensor([0]))
    starts, ends = torch.nonzero(edges == 1)[:, 0], torch.nonzero(edges == -1)[:, 0]
    return [int(e - s) for s, e in zip(starts, ends) if s > 0 and e < len(flags)]


def test_gridmask_stripe_width_follows_d_range() -> None:
    image = torch.ones(1, 224, 224)
    widths = []
    for seed in range(30):
        torch.manual_seed(seed)
        out = GridMask(max_rotate=0, mode=0, prob=1.0)(image)[0]
        widths += _inner_runs(out.sum(1) == 0) + _inner_runs(out.sum(0) == 0)
    # stripe width l = ceil(0.4 d) with 96 <= d < 224
    assert len(widths) > 10 and min(widths) >= math.ceil(96 * 0.4) and max(widths) <= math.ceil(223 * 0.4)
    assert len(set(widths)) > 3


def test_gridmask_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="mode"):
        GridMask(mode=2)
    with pytest.raises(ValueError, match="d_range"):
        GridMask(d_range=(0.5, 0.4))


# ----------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_shape_dtype_and_determinism(kind: str, tmp_path: Path) -> None:
    image = Image.open(noise_png(tmp_path / "a.png")).convert("RGB")
    transform = train_transform({"dataset_kind": kind, "image_res": 32})
    outputs = []
    for seed in range(6):
        with seeded_rng(seed):
            first = transform(image)
        with seeded_rng(seed):
            again = transform(image)
        assert first.shape == (3, 32, 32) and first.dtype == torch.float32
        assert torch.equal(first, again)
        outputs.append(first)
    assert not torch.equal(outputs[0], outputs[1])


def test_rsicd_pipeline_erases_and_masks_sometimes(tmp_path: Path) -> None:
    """Zeroed [0, 1] pixels normalise to -mean/std on every channel; only erasing and GridMask make them."""
    image = Image.open(noise_png(tmp_path / "a.png", (64, 64))).convert("RGB")
    zero = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))[:, None, None]
    fractions = []
    for kind in ("re_rsitmd", "re_rsicd"):
        transform = train_transform({"dataset_kind": kind, "image_res": 64})
        for seed in range(20):
            with seeded_rng(seed):
                out = transform(image)
            fractions.append((kind, torch.isclose(out, zero, atol=1e-6).all(0).float().mean().item()))
    assert max(f for k, f in fractions if k == "re_rsitmd") < 0.02
    assert sum(f > 0.05 for k, f in fractions if k == "re_rsicd") >= 8


def test_blur_kernel_covers_3_sigma() -> None:
    assert BLUR_KERNEL == 13


def test_unknown_dataset_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="dataset_kind"):
        train_transform({"dataset_kind": "coco", "image_res": 32})


def test_test_pipeline_is_unchanged(tmp_path: Path) -> None:
    image = Image.open(noise_png(tmp_path / "a.png")).convert("RGB")
    out = transforms.test_transform({"image_res": 32})(image)
    expected = F.normalize(F.to_dtype(F.to_image(F.resize(image, [32, 32], interpolation=F.InterpolationMode.BICUBIC)),
                                      torch.float32, scale=True), list(CLIP_MEAN), list(CLIP_STD))
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------- dataset and collator


def _dataset(tmp_path: Path, deletion_rate: float, kind: str = "re_rsicd") -> RetrievalTrainDataset:
    noise_png(tmp_path / "a_1.png")
    caption = " ".join(f"word{i}" for i in range(25))
    file = write_json(tmp_path / "train.json", [{"image": "a_1.png", "caption": caption, "image_id": 1},
                                                {"image": "a_1.png", "caption": "short one", "image_id": 1}])
    ann = load_train_annotations([str(file)], str(tmp_path), 30)
    return RetrievalTrainDataset(ann, train_transform({"dataset_kind": kind, "image_res": 32}), deletion_rate,
                                 fields=("image_idx", "label", "caption_weight"))


def test_word_deletion_flows_through_the_dataset_deterministically(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, 0.5)
    plain = _dataset(tmp_path, 0.0)
    item = dataset[(0, 42)]
    random.seed(1)  # the caller's generators do not matter
    torch.manual_seed(1)
    again = dataset[(0, 42)]
    assert item["caption"] == again["caption"] and torch.equal(item["image"], again["image"])
    assert 0 < len(item["caption"].split()) < 25
    assert len({dataset[(0, seed)]["caption"] for seed in range(10)}) > 1
    # deletion draws after the image augmentation, so enabling it leaves the images as they were
    assert torch.equal(plain[(0, 42)]["image"], item["image"])
    assert plain[(0, 42)]["caption"] == plain.ann.captions[0]
    # weights: 25 vs 2 words, mean 13.5, so the short caption gets 0.95
    assert (item["caption_weight"], dataset[(1, 3)]["caption_weight"]) == (1.0, 0.95)
    with pytest.raises(ValueError, match="deletion_rate"):
        RetrievalTrainDataset(dataset.ann, dataset.transform, 1.5)


def test_collator_returns_float32_caption_weights(demo_root: Path) -> None:
    processor = BertWordPieceProcessor.from_folder(str(demo_root / "tokenizer"), max_tokens=8, max_words=30)
    items = [{"image": torch.zeros(3, 4, 4), "caption": "a b", "image_idx": k, "label": k, "caption_weight": w}
             for k, w in enumerate([0.95, 1.0, 2.5])]
    batch = TrainCollator(processor)(items)
    assert batch["caption_weight"].dtype == torch.float32
    assert batch["caption_weight"].tolist() == pytest.approx([0.95, 1.0, 2.5])


def test_train_loader_uses_the_config(tiny_config_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(tiny_config_path, ["dataset_kind=re_rsicd", "deletion_rate=0.5", "caption_weight.rule=clip",
                                            "caption_weight.low=0.5"])
    processor = BertWordPieceProcessor.from_folder(config["text_encoder"], config["max_tokens"], config["max_words"])
    with caplog.at_level(logging.INFO, logger="dataset"):
        loader = create_train_loader(config, DistInfo(), seed=0, device=torch.device("cpu"),
                                     transform=train_transform(config), text_processor=processor,
                                     fields=("image_idx", "caption_weight"))
    assert "caption weights from rule clip" in caplog.text
    batch = next(iter(loader))
    weights = batch["caption_weight"]
    assert weights.dtype == torch.float32 and weights.shape == (config["batch_size_train"],)
    assert ((weights >= 0.5) & (weights <= 1.0)).all()
    assert loader.dataset.deletion_rate == 0.5
