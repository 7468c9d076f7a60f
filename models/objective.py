"""Training objectives: gather features across processes, then apply the pure losses of ``losses.py``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from utils.distributed import gather_features, get_rank, get_world_size

from .losses import contrastive_loss


def local_rows(local_batch: int, gathered: int) -> slice | None:
    """This process's rows in a gathered batch (``None`` = all rows, i.e. one process)."""
    world = get_world_size()
    if world == 1:
        return None
    if gathered != local_batch * world:
        raise RuntimeError(f"local loss needs equal batches on every process: {gathered} gathered rows, "
                           f"{local_batch} local x {world} processes")
    return slice(get_rank() * local_batch, (get_rank() + 1) * local_batch)


class ContrastiveObjective(nn.Module):
    """Multi-positive contrastive loss over the global batch.

    ``local_loss`` (with ``gather_with_grad``) makes each process compute only its own query rows
    against the gathered batch: logits memory is linear in the global batch and, after DDP's gradient
    averaging, the gradients equal those of one process holding the whole batch.
    """

    def __init__(self, soft_target_eps: float, gather_with_grad: bool = True, local_loss: bool = True) -> None:
        super().__init__()
        if local_loss and not gather_with_grad:
            raise ValueError("local_loss needs gather_with_grad: true (other processes' rows send gradients back)")
        self.eps = soft_target_eps
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def forward(self, features: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                epoch: int) -> dict[str, torch.Tensor]:
        image_feat = gather_features(features["image_feat"], self.gather_with_grad)
        text_feat = gather_features(features["text_feat"], self.gather_with_grad)
        image_ids = gather_features(batch["image_idx"], with_grad=False)
        rows = local_rows(features["image_feat"].shape[0], image_feat.shape[0]) if self.local_loss else None
        loss = contrastive_loss(image_feat, text_feat, image_ids, features["temp"], eps=self.eps, rows=rows)
        return {"loss": loss, "loss_contr": loss}


def build_objective(config: dict[str, Any]) -> nn.Module:
    return ContrastiveObjective(config["soft_target_eps"], config["gather_with_grad"], config["local_loss"])
