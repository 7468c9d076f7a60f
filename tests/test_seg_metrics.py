"""Segmentation scores: hand-worked confusion matrices, a numpy reference written from the formulas of SIRS's
``metrics.py`` (``Evaluator``), batching, errors, and the meter's sum over 2 gloo processes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_gloo_worker
from utils.seg_metrics import SEG_KEYS, SegmentationMeter, confusion_matrix, segmentation_scores

WORKER = Path(__file__).with_name("dist_seg_worker.py")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def scores_of(pred: list, target: list, num_classes: int) -> tuple[torch.Tensor, dict[str, float]]:
    matrix = confusion_matrix(torch.tensor(pred), torch.tensor(target), num_classes)
    return matrix, segmentation_scores(matrix)


def assert_scores(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(SEG_KEYS)
    for key in SEG_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_three_classes_with_ignored_pixels() -> None:
    """target [[0 0 1 1] [2 2 255 1]], pred [[0 1 1 1] [2 0 2 0]]: the 255 pixel is left out, 7 remain.

    rows = target: [[1 1 0] [1 2 0] [1 0 1]]; 4 of 7 correct -> pixel accuracy 57.14 %.
    class accuracy: 1/2, 2/3, 1/2 -> 55.56 %.
    IoU: 1/(2+3-1) = 1/4, 2/(3+3-2) = 1/2, 1/(2+1-1) = 1/2 -> mIoU 1.25/3 = 41.67 %.
    FWIoU: 2/7 * 1/4 + 3/7 * 1/2 + 2/7 * 1/2 = 3/7 = 42.86 %.
    """
    matrix, scores = scores_of([[0, 1, 1, 1], [2, 0, 2, 0]], [[0, 0, 1, 1], [2, 2, 255, 1]], 3)
    assert matrix.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]] and matrix.dtype == torch.long
    assert_scores(scores, {"seg_pixel_acc": 400 / 7, "seg_class_acc": 100 * (1 / 2 + 2 / 3 + 1 / 2) / 3,
                           "seg_miou": 100 * 1.25 / 3, "seg_fwiou": 300 / 7})


def test_a_class_absent_from_the_target() -> None:
    """4 classes; target [0 0 0 1 1 1], pred [0 0 2 1 1 0]: class 2 is predicted but never in the target,
    class 3 is in neither.

    rows = target: [[2 0 1 0] [1 2 0 0] [0 0 0 0] [0 0 0 0]]; 4 of 6 correct -> 66.67 %.
    class accuracy over the classes in the target (0, 1): 2/3, 2/3 -> 66.67 % (class 2 has 0/0: left out).
    IoU: 2/(3+3-2) = 1/2, 2/(3+2-2) = 2/3, 0/(0+1-0) = 0, class 3 0/0 left out -> mIoU (1/2 + 2/3 + 0)/3 = 38.89 %.
    FWIoU: 3/6 * 1/2 + 3/6 * 2/3 = 58.33 %.
    """
    matrix, scores = scores_of([0, 0, 2, 1, 1, 0], [0, 0, 0, 1, 1, 1], 4)
    assert matrix.tolist() == [[2, 0, 1, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert_scores(scores, {"seg_pixel_acc": 400 / 6, "seg_class_acc": 400 / 6,
                           "seg_miou": 100 * (1 / 2 + 2 / 3) / 3, "seg_fwiou": 100 * (1 / 4 + 1 / 3)})


def test_a_perfect_prediction_scores_100_with_an_absent_class() -> None:
    """target = pred = [0 1 2 2] with 4 classes: a diagonal matrix; class 3 (in neither) is left out of the
    means, so every score is 100 (counting it as 0 would give a class accuracy and mIoU of 75)."""
    matrix, scores = scores_of([0, 1, 2, 2], [0, 1, 2, 2], 4)
    assert matrix.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
    assert_scores(scores, dict.fromkeys(SEG_KEYS, 100.0))


def test_a_constant_predictor() -> None:
    """Every pixel predicted as class 0; target [0 0 0 1 2 2].

    rows = target: [[3 0 0] [1 0 0] [2 0 0]]; 3 of 6 correct -> 50 %.
    class accuracy: 1, 0, 0 -> 33.33 %. IoU: 3/(3+6-3) = 1/2, 0, 0 -> mIoU 16.67 %. FWIoU: 3/6 * 1/2 = 25 %.
    """
    matrix, scores = scores_of([0] * 6, [0, 0, 0, 1, 2, 2], 3)
    assert matrix.tolist() == [[3, 0, 0], [1, 0, 0], [2, 0, 0]]
    assert_scores(scores, {"seg_pixel_acc": 50.0, "seg_class_acc": 100 / 3, "seg_miou": 100 / 6, "seg_fwiou": 25.0})


def sirs_reference(pred: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[np.ndarray, dict[str, float]]:
    """SIRS's Evaluator, written out: the matrix counts the pixels whose target lies in 0..C-1 (so 255 drops
    out), and the means are numpy nanmeans over the per-class ratios (0/0 = NaN is left out). Fractions there,
    percentages here."""
    keep = (target >= 0) & (target < num_classes)
    matrix = np.bincount(num_classes * target[keep].astype(int) + pred[keep],
                         minlength=num_classes ** 2).reshape(num_classes, num_classes).astype(float)
    diag, rows, cols = np.diag(matrix), matrix.sum(1), matrix.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = diag / (rows + cols - diag)
        freq = rows / matrix.sum()
        scores = {"seg_pixel_acc": diag.sum() / matrix.sum(), "seg_class_acc": np.nanmean(diag / rows),
                  "seg_miou": np.nanmean(iou), "seg_fwiou": (freq[freq > 0] * iou[freq > 0]).sum()}
    return matrix, {key: 100 * value for key, value in scores.items()}


@pytest.mark.parametrize("num_classes, seed", [(2, 0), (5, 1), (15, 2), (15, 3)])
def test_against_sirs_formulas(num_classes: int, seed: int) -> None:
    """Random masks of 15-class foreground maps (mostly background, as RSITMD-SS), some classes absent, some
    only predicted, about 5 % ignore pixels."""
    gen = np.random.default_rng(seed)
    shape = (4, 32, 32)
    present = gen.choice(num_classes, size=max(1, num_classes // 2), replace=False)
    target = np.where(gen.random(shape) < 0.6, 0, gen.choice(present, size=shape))
    target[gen.random(shape) < 0.05] = 255
    pred = np.where(gen.random(shape) < 0.7, np.where(target == 255, 0, target), gen.integers(0, num_classes, shape))
    want_matrix, want = sirs_reference(pred, target, num_classes)
    matrix = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target).to(torch.uint8), num_classes)
    np.testing.assert_array_equal(matrix.numpy(), want_matrix)
    got = segmentation_scores(matrix)
    for key in SEG_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key


@pytest.mark.parametrize("device", DEVICES)
def test_batches_sum_to_the_whole_and_the_meter_takes_logits(device: str) -> None:
    """The per-batch matrices add up to the whole split's, on the tensors' device; the meter's argmax of
    logits gives the same matrix and scores as the class maps."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 7, 9, 10, generator=gen).to(device)
    target = torch.randint(0, 7, (6, 9, 10), generator=gen)
    target[torch.rand(6, 9, 10, generator=gen) < 0.1] = 255
    target = target.to(device)
    whole = confusion_matrix(logits.argmax(1), target, 7)
    assert whole.device.type == device and int(whole.sum()) == int((target != 255).sum())
    parts = [confusion_matrix(p.argmax(1), t, 7) for p, t in zip(logits.split(2), target.split(2))]
    assert torch.equal(torch.stack(parts).sum(0), whole)
    meter = SegmentationMeter(7, device)
    for p, t in zip(logits.split(4), target.split(4)):
        meter.update(p, t)
    assert torch.equal(meter.confusion(), whole)
    assert meter.compute() == segmentation_scores(whole)
    classes = SegmentationMeter(7, device)
    classes.update(logits.argmax(1), target)
    assert torch.equal(classes.local, whole)


def test_predictions_at_ignored_pixels_are_not_looked_at() -> None:
    matrix = confusion_matrix(torch.tensor([1, 255, -3]), torch.tensor([1, 255, 255]), 2)
    assert matrix.tolist() == [[0, 0], [0, 1]]
    assert confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 2, ignore_index=0).tolist() == [[0, 0], [0, 1]]


@pytest.mark.parametrize("pred, target, message", [
    ([0, 3, 1], [0, 1, 1], r"class indices must lie in 0\.\.2 \(ignore index 255\): 1 labelled pixels are "
                           r"predicted as 3$"),
    ([0, -1, 1], [0, 1, 1], r"predicted as -1$"),
    ([0, 1, 1], [0, 3, 254], r"2 target pixels hold 3, 254$"),
    ([5, 1], [3, 1], r"1 target pixels hold 3; 1 labelled pixels are predicted as 5$"),
])
def test_out_of_range_classes_are_errors(pred: list, target: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        confusion_matrix(torch.tensor(pred), torch.tensor(target), 3)


def test_bad_inputs_are_errors() -> None:
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="pred must hold integer class indices, got dtype torch.float32"):
        confusion_matrix(labels.float(), labels, 3)
    with pytest.raises(ValueError, match=r"pred \(2, 3\) and target \(6,\) must have one shape"):
        confusion_matrix(labels, labels.flatten(), 3)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        confusion_matrix(labels, labels, 0)
    with pytest.raises(ValueError, match="counts no labelled pixel"):
        segmentation_scores(confusion_matrix(labels, torch.full((2, 3), 255), 3))
    with pytest.raises(ValueError, match=r"a confusion matrix is \[C, C\], got shape \(2, 3\)"):
        segmentation_scores(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \[B, 4, \.\.\.\] \(classes on dim 1\), got shape \(2, 3,"):
        SegmentationMeter(4, "cpu").update(torch.randn(2, 3, 5), torch.zeros(2, 5, dtype=torch.long))


def test_two_gloo_processes_sum_to_the_one_process_matrix(tmp_path: Path) -> None:
    """Each of 2 processes counts its share of the batches; the meter's all-reduce gives every process the
    matrix (and scores) of one process that saw them all, and leaves its own counts as they were."""
    one, two = run_gloo_worker(WORKER, tmp_path / "one.pt", 1), run_gloo_worker(WORKER, tmp_path / "two.pt", 2)
    assert torch.equal(one["local"], one["confusion"])
    assert 0 < int(two["local"].sum()) < int(one["confusion"].sum())  # rank 0 saw only its share
    assert torch.equal(two["confusion"], one["confusion"])
    assert two["scores"] == one["scores"]
