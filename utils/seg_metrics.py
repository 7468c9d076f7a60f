"""Semantic-segmentation scores (SIRS's foreground segmentation): a confusion matrix counted on the tensors'
device, and pixel accuracy, mean class accuracy, mIoU and frequency-weighted IoU from it, in percent like
the recalls (``utils.metrics``).

The definitions are those of SIRS's ``metrics.py`` (``Evaluator``), rows = target, columns = prediction:

* pixel accuracy = trace / labelled pixels;
* class accuracy = per class, correct / its target pixels, averaged over the classes present in the target
  (SIRS's ``nanmean``: a class with no target pixel has 0/0 and is left out, even when it is predicted);
* mIoU = per class, correct / (target + predicted - correct), averaged over the classes present in the target
  **or** the prediction (``nanmean`` again: only a class absent from both is 0/0; one that is only predicted
  counts with IoU 0);
* FWIoU = the per-class IoU weighted by the class's share of the target pixels.

Where this differs from SIRS: the scores are percentages (SIRS logs fractions), a matrix with no labelled
pixel is an error (SIRS returns NaN with a warning), and a prediction or target outside 0..C-1 is an error
(SIRS silently drops targets outside 0..C-1, the ignore index 255 among them, and trusts predictions).
Pixels whose target is the ignore index are left out whatever their prediction.
"""
from __future__ import annotations

import torch

import utils.distributed as dist_utils

SEG_KEYS = ("seg_pixel_acc", "seg_class_acc", "seg_miou", "seg_fwiou")
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _out_of_range(values: torch.Tensor, num_classes: int) -> str:
    """The distinct offending values, for an error message (a few of them)."""
    bad = torch.unique(values[(values < 0) | (values >= num_classes)]).tolist()
    return ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """``[C, C]`` int64 counts of (target class, predicted class) over the pixels of ``pred`` and ``target``
    (class maps of one shape, any number of dimensions), on their device, with one ``bincount``.

    Pixels whose target is ``ignore_index`` are left out (their prediction is not looked at). Any other target,
    and the prediction of every labelled pixel, must lie in 0..C-1: a value outside is a ValueError, since it
    means the classes or the ignore index are not the ones the masks were written with.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, tensor in (("pred", pred), ("target", target)):
        if tensor.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"{name} must hold integer class indices, got dtype {tensor.dtype} (take the argmax "
                             f"of logits first)")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")
    if pred.device != target.device:
        raise ValueError(f"pred is on {pred.device} and target on {target.device}: they must share a device")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    labelled = target != ignore_index
    bad_target = labelled & ((target < 0) | (target >= num_classes))
    bad_pred = labelled & ((pred < 0) | (pred >= num_classes))
    if bool((bad_target | bad_pred).any()):  # the only host sync; what is wrong is worked out only here
        problems = []
        if bool(bad_target.any()):
            values = _out_of_range(target[labelled], num_classes)
            problems.append(f"{int(bad_target.sum())} target pixels hold {values}")
        if bool(bad_pred.any()):
            problems.append(f"{int(bad_pred.sum())} labelled pixels are predicted as "
                            f"{_out_of_range(pred[labelled], num_classes)}")
        raise ValueError(f"class indices must lie in 0..{num_classes - 1} (ignore index {ignore_index}): "
                         + "; ".join(problems))
    cells = num_classes * num_classes
    index = torch.where(labelled, target * num_classes + pred, cells)  # ignored pixels go to one extra bin
    return torch.bincount(index, minlength=cells + 1)[:cells].reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """Pixel accuracy, mean class accuracy, mIoU and FWIoU (percent) of a ``[C, C]`` confusion matrix (rows =
    target), with SIRS's conventions for absent classes (see the module docstring)."""
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"a confusion matrix is [C, C], got shape {tuple(confusion.shape)}")
    counts = confusion.double()
    total = counts.sum()
    if not bool(total > 0):
        raise ValueError("the confusion matrix counts no labelled pixel (nothing was added, or every target pixel "
                         "holds the ignore index): no segmentation score can be computed")
    correct, in_target, predicted = counts.diagonal(), counts.sum(1), counts.sum(0)
    union = in_target + predicted - correct
    present = in_target > 0
    iou = correct[union > 0] / union[union > 0]
    scores = {
        "seg_pixel_acc": correct.sum() / total,
        "seg_class_acc": (correct[present] / in_target[present]).mean(),
        "seg_miou": iou.mean(),
        "seg_fwiou": (in_target[present] / total * correct[present] / union[present]).sum(),
    }
    return {key: 100.0 * scores[key].item() for key in SEG_KEYS}


class SegmentationMeter:
    """Sums the confusion matrices of an evaluation's batches on the device, then scores the sum of every
    process's matrix (each process sees its shard of the images)."""

    def __init__(self, num_classes: int, device: torch.device | str, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.local = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``output`` is ``[B, C, ...]`` logits (floating; the class is their argmax over dim 1)
        or integer class maps of ``target``'s shape."""
        if output.is_floating_point():
            if output.dim() < 2 or output.shape[1] != self.num_classes:
                raise ValueError(f"logits must be [B, {self.num_classes}, ...] (classes on dim 1), got shape "
                                 f"{tuple(output.shape)}")
            output = output.argmax(1)
        matrix = confusion_matrix(output, target.to(output.device), self.num_classes, self.ignore_index)
        self.local += matrix.to(self.local.device)

    def confusion(self) -> torch.Tensor:
        """The matrix summed over the processes (this process's alone without torch.distributed)."""
        return dist_utils.all_reduce_sum(self.local)

    def compute(self) -> dict[str, float]:
        """The scores of every process's pixels together; the same on every process."""
        return segmentation_scores(self.confusion())
