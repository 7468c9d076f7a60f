"""Run by tests/test_distributed.py: one training step of a small two-tower model on a fixed global batch.

Under torchrun every process takes its contiguous share of the batch and the model is wrapped in DDP;
run plainly it is the single-process reference. Rank 0 saves the logged loss and the gradients.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils.distributed as dist_utils  # noqa: E402
from models.objective import ContrastiveObjective  # noqa: E402
from models.task import RetrievalTask  # noqa: E402

GLOBAL_BATCH = 8
IMAGE_IDS = [0, 0, 1, 2, 2, 3, 3, 3]  # positives cross the rank boundary (ids 2 and 3 sit on both halves)


class TwoTowers(nn.Module):
    """Linear towers with the retrieval models' forward signature and a learnable temperature."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(12, 6)
        self.text = nn.Linear(10, 6)
        self.temp = nn.Parameter(torch.tensor(0.07))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return {"image_feat": F.normalize(self.image(images), dim=-1),
                "text_feat": F.normalize(self.text(input_ids), dim=-1), "temp": self.temp}


def one_step(local_loss: bool, gather_with_grad: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    batch = {"images": torch.randn(GLOBAL_BATCH, 12, generator=gen),
             "input_ids": torch.randn(GLOBAL_BATCH, 10, generator=gen),
             "attention_mask": torch.ones(GLOBAL_BATCH, 1), "image_idx": torch.tensor(IMAGE_IDS)}
    mine = dist_utils.shard_range(GLOBAL_BATCH)
    batch = {k: v[mine.start:mine.stop] for k, v in batch.items()}
    task: nn.Module = RetrievalTask(TwoTowers(), ContrastiveObjective(6e-5, gather_with_grad, local_loss))
    if dist_utils.is_initialized():
        task = nn.parallel.DistributedDataParallel(task)
    losses = task(batch, epoch=0)
    losses["loss"].backward()
    out = {"loss": dist_utils.all_reduce_mean(losses["loss"]).detach()}
    out.update({name: p.grad.detach().clone() for name, p in task.named_parameters()})
    return {k.removeprefix("module."): v for k, v in out.items()}


def main(output: str) -> None:
    dist_utils.init_distributed("cpu")
    results = {f"local={local}, gather_with_grad={with_grad}": one_step(local, with_grad)
               for local, with_grad in ((True, True), (False, True), (False, False))}
    if dist_utils.get_rank() == 0:
        torch.save(results, output)
    dist_utils.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
