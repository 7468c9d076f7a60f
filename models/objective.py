"""The training objective: gather features across processes, then apply the pure losses of ``losses.py``
with the weights of the active stage (``scheduler.StageSchedule``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scheduler import Stage, loss_terms
from utils.distributed import gather_features, get_rank, get_world_size

from .losses import affiliation_loss, contrastive_loss, scene_adaptive_loss


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
    the whole batch. Affiliation centres are built per ``affil_center_chunk`` rows of the global batch, or
    per process (0), as the published code builds them.
    """

    def __init__(self, terms: set[str], config: dict[str, Any]) -> None:
        super().__init__()
        if config["local_loss"] and not config["gather_with_grad"]:
            raise ValueError("local_loss needs gather_with_grad: true (other processes' rows send gradients back)")
        self.terms = [t for t in ("contr", "affil", "scene") if t in terms]
        self.config = {k: config[k] for k in ("soft_target_eps", "gather_with_grad", "local_loss", "affil_symmetric",
                                              "affil_center_chunk", "scene_mode", "alpha_m", "beta1", "beta2")}
        self.stage = Stage("all", 0, {t: 1.0 for t in self.terms})

    def set_stage(self, stage: Stage) -> None:
        self.stage = stage

    def forward(self, features: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                epoch: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        local_batch = features["image_feat"].shape[0]
        image_feat = gather_features(features["image_feat"], cfg["gather_with_grad"])
        text_feat = gather_features(features["text_feat"], cfg["gather_with_grad"])
        image_ids = gather_features(batch["image_idx"], with_grad=False)
        rows = local_rows(local_batch, image_feat.shape[0]) if cfg["local_loss"] else None
        eps = cfg["soft_target_eps"]
        labels = gather_features(batch["label"], with_grad=False) if {"affil", "scene"} & set(self.terms) else None
        losses: dict[str, torch.Tensor] = {}
        for term in self.terms:
            with torch.set_grad_enabled(torch.is_grad_enabled() and term in self.stage.losses):
                if term == "contr":
                    weights = None
                    if self.stage.caption_weights:
                        weights = gather_features(batch["caption_weight"], with_grad=False).to(image_feat.dtype)
                    value = contrastive_loss(image_feat, text_feat, image_ids, features["temp"], weights, eps, rows)
                elif term == "affil":
                    value = affiliation_loss(image_feat, text_feat, labels, features["temp2"], eps,
                                             cfg["affil_center_chunk"] or local_batch, cfg["affil_symmetric"], rows)
                else:
                    value = scene_adaptive_loss(image_feat, text_feat, image_ids, labels, features["temp"], epoch,
                                                cfg["alpha_m"], cfg["beta1"], cfg["beta2"], cfg["scene_mode"], eps, rows)
            losses[f"loss_{term}"] = value
        total = sum(weight * losses[f"loss_{term}"] for term, weight in self.stage.losses.items())
        return {"loss": total, **losses}


def build_objective(config: dict[str, Any]) -> RetrievalObjective:
    return RetrievalObjective(loss_terms(config), config)
