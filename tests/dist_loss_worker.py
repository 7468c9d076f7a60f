"""Run by tests/test_distributed.py: one training step of a small two-tower model on a fixed global batch,
with FISVL's loss terms (contrastive, affiliation, scene-adaptive; weighted contrastive in stage 2) and with
PIR's triplet loss (a sum, where the others are means).

Under torchrun every process takes its contiguous share of the batch and the model is wrapped in DDP;
run plainly it is the single-process reference. Rank 0 saves the logged loss and the gradients.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils.distributed as dist_utils  # noqa: E402
from models import RetrievalModel, get_loss  # noqa: E402
from models.objective import RetrievalObjective, Stage  # noqa: E402
from models.task import RetrievalTask  # noqa: E402

GLOBAL_BATCH = 8
IMAGE_IDS = [0, 0, 1, 2, 2, 3, 3, 3]  # positives cross the rank boundary (ids 2 and 3 sit on both halves)
LABELS = [0, 0, 1, 0, 0, 1, 1, 1]  # scenes, also across the boundary
CAPTION_WEIGHTS = [1.0, 0.95, 1.0, 1.0, 0.95, 1.0, 0.95, 1.0]
LOSS_CONFIG = {"soft_target_eps": 6e-5, "temp2": 0.05, "affil_symmetric": False, "scene_mode": "published",
               "alpha_m": 2.0, "beta1": -0.0015, "beta2": 0.02, "triplet_margin": 0.2, "triplet_max_violation": False,
               "triplet_margin_mode": "fixed", "adaptive_margin_gamma": 0.6, "adaptive_margin_beta": 5.0,
               "triplet_normalise": False}
# (loss names, stage, local_loss, gather_with_grad, config changes); the 1-process run builds affiliation
# centres per 4 rows, which is what each of 2 processes does with its own batch of 4 (affil_center_chunk 0).
ALL_LOSSES = ("contr", "affil", "scene")
TRIPLET = Stage("triplet", 0, {"triplet": 1.0})
CASES = {
    "stage1 local": (ALL_LOSSES, Stage("s1", 0, {"contr": 1.0, "affil": 1.0, "scene": 1.0}), True, True, {}),
    "stage1 gathered": (ALL_LOSSES, Stage("s1", 0, {"contr": 1.0, "affil": 1.0, "scene": 1.0}), False, True, {}),
    "stage2 weighted": (ALL_LOSSES, Stage("s2", 10, {"contr": 1.0, "affil": 1.0}, True), True, True, {}),
    "xvlm gather": (("contr",), Stage("c", 0, {"contr": 1.0}), False, False, {}),
    "triplet local": (("triplet",), TRIPLET, True, True, {}),
    "triplet gathered": (("triplet",), TRIPLET, False, True, {}),
    "triplet hardest": (("triplet",), TRIPLET, True, True, {"triplet_max_violation": True}),
    "triplet xvlm gather": (("triplet",), TRIPLET, False, False, {}),
}


class TwoTowers(RetrievalModel):
    """Linear towers with the retrieval models' interface (``forward(batch)``) and a learnable temperature;
    the affiliation temperature belongs to the affiliation loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(12, 6)
        self.text = nn.Linear(10, 6)
        self.temp = nn.Parameter(torch.tensor(0.07))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.text(text["input_ids"]), dim=-1)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {**super().forward(batch), "temp": self.temp}


def shard(batch: dict[str, Any], rows: slice) -> dict[str, Any]:
    """This process's rows of every tensor of a batch (the text dict too)."""
    return {k: shard(v, rows) if isinstance(v, dict) else v[rows] for k, v in batch.items()}


def one_step(names: tuple[str, ...], stage: Stage, local_loss: bool, gather_with_grad: bool,
             changes: dict[str, Any]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    batch = {"images": torch.randn(GLOBAL_BATCH, 12, generator=gen),
             "text": {"input_ids": torch.randn(GLOBAL_BATCH, 10, generator=gen),
                      "attention_mask": torch.ones(GLOBAL_BATCH, 1)},
             "image_idx": torch.tensor(IMAGE_IDS), "label": torch.tensor(LABELS),
             "caption_weight": torch.tensor(CAPTION_WEIGHTS)}
    mine = dist_utils.shard_range(GLOBAL_BATCH)
    batch = shard(batch, slice(mine.start, mine.stop))
    chunk = 0 if dist_utils.is_initialized() else GLOBAL_BATCH // 2
    config = {**LOSS_CONFIG, "affil_center_chunk": chunk, **changes}
    objective = RetrievalObjective({name: get_loss(name)(config) for name in names}, gather_with_grad, local_loss)
    objective.set_stage(stage)
    task: nn.Module = RetrievalTask(TwoTowers(), objective)
    if dist_utils.is_initialized():  # the affiliation loss's temperature is unused in a stage without it, and
        # the model's temperature in a stage that reads no model output (the triplet loss), as Retrieval.py decides
        unused = ("affil" in names and "affil" not in stage.losses) or objective.leaves_model_outputs_unread([stage])
        task = nn.parallel.DistributedDataParallel(task, find_unused_parameters=unused)
    losses = task(batch, epoch=3)
    losses["loss"].backward()
    out = {name: dist_utils.all_reduce_mean(value).detach() for name, value in losses.items()}
    out.update({name: p.grad.detach().clone() for name, p in task.named_parameters() if p.grad is not None})
    return {k.removeprefix("module."): v for k, v in out.items()}


def main(output: str) -> None:
    dist_utils.init_distributed("cpu")
    results = {name: one_step(*case) for name, case in CASES.items()}
    if dist_utils.get_rank() == 0:
        torch.save(results, output)
    dist_utils.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
