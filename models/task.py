"""A model and its objective in one module, so that DDP wraps both and the training loop stays generic."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import RetrievalModel
from .objective import RetrievalObjective


class RetrievalTask(nn.Module):
    """``forward(batch, epoch)`` returns the named loss terms and their total under ``loss``."""

    def __init__(self, model: RetrievalModel, objective: RetrievalObjective) -> None:
        super().__init__()
        if not model.scores_are_dot_products:
            dot_losses = [name for name, loss in objective.losses.items() if not loss.uses_model_similarity]
            if dot_losses:
                raise ValueError(f"the losses {dot_losses} score pairs by dot products of the embeddings, but model "
                                 f"{type(model).__name__} scores each (image, caption) pair with its own head; use "
                                 f"the triplet loss (stages: [{{name: triplet, start_epoch: 0, losses: {{triplet: 1}}}}])")
        self.model = model
        self.objective = objective

    @property
    def sample_fields(self) -> tuple[str, ...]:
        """Every per-sample field the data pipeline must carry for the model and the losses."""
        return tuple(dict.fromkeys([*self.model.sample_fields, *self.objective.sample_fields]))

    def forward(self, batch: dict[str, Any], epoch: int) -> dict[str, torch.Tensor]:
        return self.objective(self.model(batch), batch, epoch, self.model.similarity)
