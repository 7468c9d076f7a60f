"""Run by tests/test_seg_metrics.py: a SegmentationMeter over fixed batches of logits and masks (ignore pixels
included). Under torchrun each process updates with its contiguous share of the batches (2 of 5 and 3 of 5 on
2 processes), as evaluation shards images; run plainly it takes all of them. Rank 0 saves its own matrix, the
summed one and the scores."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils.distributed as dist_utils  # noqa: E402
from utils.seg_metrics import SegmentationMeter  # noqa: E402

NUM_CLASSES, BATCHES = 5, 5


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits [2, 5, 6, 7], mask [2, 6, 7]) pairs; about a tenth of the mask pixels hold the ignore index."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(BATCHES):
        logits = torch.randn(2, NUM_CLASSES, 6, 7, generator=gen)
        mask = torch.randint(0, NUM_CLASSES, (2, 6, 7), generator=gen)
        mask[torch.rand(2, 6, 7, generator=gen) < 0.1] = 255
        out.append((logits, mask))
    return out


def main(output: str) -> None:
    dist_utils.init_distributed("cpu")
    meter = SegmentationMeter(NUM_CLASSES, "cpu")
    mine = dist_utils.shard_range(BATCHES)
    for logits, mask in batches()[mine.start:mine.stop]:
        meter.update(logits, mask)
    result = {"local": meter.local.clone(), "confusion": meter.confusion(), "scores": meter.compute()}
    if dist_utils.get_rank() == 0:
        torch.save(result, output)
    dist_utils.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
