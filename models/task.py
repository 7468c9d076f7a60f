"""A model and its objective in one module, so that DDP wraps both and the training loop stays generic."""
from __future__ import annotations

import torch
from torch import nn


class RetrievalTask(nn.Module):
    """``forward(batch, epoch)`` returns the named loss terms and their total under ``loss``."""

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        features = self.model(batch["images"], batch["input_ids"], batch["attention_mask"])
        return self.objective(features, batch, epoch)
