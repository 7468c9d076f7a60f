"""The training objective: gather features and the declared batch fields across processes once, then
apply every registered loss the stages name, weighted by the active stage."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from dataset.annotations import TrainAnnotations
from utils.config import Key, register_keys
from utils.distributed import gather_features, get_rank, get_world_size

from ._registry import get_loss
from .losses import LossInputs, RetrievalLoss, dot_product_scores

register_keys("Objective (gathering across processes)", {
    "gather_with_grad": Key((bool,), True, "all-gather features with gradients flowing back to every process"),
    "local_loss": Key((bool,), True, "each process computes its own query rows against the gathered batch"),
})


@dataclass(frozen=True)
class Stage:
    """A span of epochs from ``start_epoch`` with its loss terms (registered loss names) and weights.

    ``caption_weights`` turns ``contr`` into the weighted contrastive loss (each caption's logits scaled
    by its weight).
    """

    name: str
    start_epoch: int
    losses: dict[str, float]
    caption_weights: bool = False

    def describe(self) -> str:
        terms = [f"{'weighted ' if name == 'contr' and self.caption_weights else ''}{name} x {weight:g}"
                 for name, weight in self.losses.items()]
        return f"stage '{self.name}' from epoch {self.start_epoch}: " + " + ".join(terms)


def local_rows(local_batch: int, gathered: int) -> slice | None:
    """This process's rows in a gathered batch (``None`` = all rows, i.e. one process)."""
    world = get_world_size()
    if world == 1:
        return None
    if gathered != local_batch * world:
        raise RuntimeError(f"local loss needs equal batches on every process: {gathered} gathered rows, "
                           f"{local_batch} local x {world} processes")
    return slice(get_rank() * local_batch, (get_rank() + 1) * local_batch)


class RetrievalObjective(nn.Module):
    """Every loss term the stages name, on the global batch; the total weights them by the active stage.

    All terms are computed and returned each step (so each is logged every epoch, as FISVL logs its scene
    loss after switching it off); terms the stage leaves out run without autograd.

    ``local_loss`` (with ``gather_with_grad``) makes each process compute only its own query rows against
    the gathered batch: after DDP's gradient averaging the gradients equal those of one process holding
    the whole batch.
    """

    def __init__(self, losses: dict[str, RetrievalLoss], gather_with_grad: bool = True,
                 local_loss: bool = True) -> None:
        super().__init__()
        if local_loss and not gather_with_grad:
            raise ValueError("local_loss needs gather_with_grad: true (other processes' rows send gradients back)")
        self.losses = nn.ModuleDict(losses)
        self.gather_with_grad, self.local_loss = gather_with_grad, local_loss
        self.stage = Stage("all", 0, {name: 1.0 for name in losses})

    @property
    def gathered_fields(self) -> tuple[str, ...]:
        """The batch fields the losses read across processes (``image_idx`` always)."""
        fields = ["image_idx"] + [f for loss in self.losses.values() for f in loss.sample_fields]
        return tuple(dict.fromkeys(fields))

    @property
    def sample_fields(self) -> tuple[str, ...]:
        """Every batch field the losses read: the gathered ones and those read on each process alone."""
        return tuple(dict.fromkeys([*self.gathered_fields,
                                    *(f for loss in self.losses.values() for f in loss.local_fields)]))

    def leaves_model_outputs_unread(self, stages: Iterable[Stage]) -> bool:
        """Whether some stage's losses read none of the model's outputs beyond the embeddings (the triplet loss
        alone): the model's temperature then gets no gradient, which DDP must be told."""
        return any(not any(self.losses[name].model_outputs for name in stage.losses) for stage in stages)

    def prepare(self, annotations: TrainAnnotations, run_dir: Path) -> None:
        """Let each loss compute its dataset-level state (AMFMN's prior text similarity) before training."""
        for loss in self.losses.values():
            loss.prepare(annotations, run_dir)

    def set_stage(self, stage: Stage) -> None:
        self.stage = stage

    def forward(self, features: dict[str, torch.Tensor], batch: dict[str, Any], epoch: int,
                similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``similarity``: the model's score of every (image, caption) pair, for the losses that use it."""
        local_batch = features["image_feat"].shape[0]
        image_feat = gather_features(features["image_feat"], self.gather_with_grad)
        text_feat = gather_features(features["text_feat"], self.gather_with_grad)
        fields = {name: gather_features(batch[name], with_grad=False) for name in self.gathered_fields}
        rows = local_rows(local_batch, image_feat.shape[0]) if self.local_loss else None
        inputs = LossInputs(image_feat, text_feat, fields, features, rows, local_batch, epoch,
                            self.stage.caption_weights, similarity or dot_product_scores, batch)
        losses: dict[str, torch.Tensor] = {}
        for name, loss in self.losses.items():
            with torch.set_grad_enabled(torch.is_grad_enabled() and name in self.stage.losses):
                losses[f"loss_{name}"] = loss(inputs)
        total = sum(weight * losses[f"loss_{name}"] for name, weight in self.stage.losses.items())
        return {"loss": total, **losses}


def build_objective(config: dict[str, Any], stages: Iterable[Stage]) -> RetrievalObjective:
    """One module per loss that some stage names, in order of first appearance."""
    names = dict.fromkeys(name for stage in stages for name in stage.losses)
    return RetrievalObjective({name: get_loss(name)(config) for name in names}, config["gather_with_grad"],
                              config["local_loss"])
