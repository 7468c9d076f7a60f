"""FISVL (Zhou et al., JSTARS 2024): a Swin + BERT dual encoder whose image embedding is refined by FGIS.

FGIS (fine-grained information supplementation, fisvl-method.md §2.3): a frozen ResNet gives a global token
(layer-4 pooling -> ``conv_proj``) and SFGS a fine-grained local token (from the stem map); with the 50
projected Swin tokens they form a graph of 52 nodes, ``img_gcn_step`` graph-reasoning steps mix them, and
the Swin pooled-token node is read out, passed through ``head_img`` and added to the Swin embedding:

    v = L2norm( V[:, 0] + Dropout(head_img( GR^K([v_cg; v_cl; V])[:, 2] )) )

The text side is the dual encoder's: L2norm(text_proj(BERT [CLS])). Parameter names follow the published
checkpoints (``conv_encoder``, ``conv_proj``, ``img_gcn.{k}``, ``head_img``, ``temp``, ``temp2``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from utils.weights import WeightsError

from ._registry import register_model
from .dual_encoder import DualEncoder
from .encoders.resnet import PriorCNN
from .fusion import SFGS, GraphReasoning

log = logging.getLogger(__name__)


class FISVL(DualEncoder):
    """Ablation switches: ``fgis`` (the whole fusion), ``sfgs`` (frozen / trainable / off), ``img_gcn_step``,
    ``finetune_conv`` and ``conv_bn_train_mode`` (the frozen CNN's BatchNorm as published, or in eval mode)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.use_fgis = config["fgis"]
        if not self.use_fgis:
            return
        dim = config["embed_dim"]
        self.finetune_conv = config["finetune_conv"]
        self.sfgs_trainable = config["sfgs"] == "trainable"
        self.conv_bn_train_mode = config["conv_bn_train_mode"]
        self.conv_encoder = PriorCNN(config["conv_arch"]).requires_grad_(self.finetune_conv)
        self.conv_proj = nn.Linear(self.conv_encoder.width, dim)
        self.sfgs = None
        if config["sfgs"] != "off":
            self.sfgs = SFGS(self.conv_encoder.stem_channels, dim, config["dropout_r"]).requires_grad_(self.sfgs_trainable)
        self.img_gcn = nn.ModuleList(GraphReasoning(dim) for _ in range(config["img_gcn_step"]))
        self.head_img = nn.Linear(dim, dim)
        self.fgis_dropout = nn.Dropout(config["dropout_r"])

    def train(self, mode: bool = True) -> "FISVL":
        """As published, ``train()`` also puts the frozen CNN (and a frozen SFGS) in train mode: batch
        statistics, drifting running statistics, active dropout. ``conv_bn_train_mode: false`` keeps
        the frozen parts in eval mode instead."""
        super().train(mode)
        if mode and self.use_fgis and not self.conv_bn_train_mode:
            for part, trainable in ((self.conv_encoder, self.finetune_conv), (self.sfgs, self.sfgs_trainable)):
                if part is not None and not trainable:
                    part.eval()
        return self

    def prior_nodes(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The CNN global token and, with SFGS, the fine-grained token; frozen parts run without autograd."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune_conv):
            stem, pooled = self.conv_encoder.forward_prior(images)
        nodes = [self.fgis_dropout(self.conv_proj(pooled))]
        if self.sfgs is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.sfgs_trainable):
                nodes.append(self.sfgs(stem))
        return nodes

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_proj(self.vision_encoder.forward_tokens(images))  # [B, 1 + L, d]
        pooled = tokens[:, 0]
        if not self.use_fgis:
            return F.normalize(pooled, dim=-1)
        prior = self.prior_nodes(images)
        nodes = torch.cat([torch.stack(prior, 1), tokens], 1)
        for step in self.img_gcn:
            nodes = step(nodes)
        fused = nodes[:, len(prior)]  # the Swin pooled-token node
        return F.normalize(pooled + self.fgis_dropout(self.head_img(fused)), dim=-1)

    def head_parameter_names(self) -> set[str]:
        """New parameters: everything outside the pretrained Swin, BERT and CNN."""
        return {n for n in super().head_parameter_names() if not n.startswith("conv_encoder.")}

    def load_pretrained(self, config: dict[str, Any]) -> None:
        super().load_pretrained(config)
        if not self.use_fgis:
            return
        path = config["resnet_ckpt"]
        if not path:
            log.warning("prior CNN: random init (resnet_ckpt is not set)%s",
                        "" if self.finetune_conv else "; it is frozen, so it stays random")
            return
        if not Path(path).is_file():
            raise WeightsError(f"resnet_ckpt not found: {path} (the prior CNN's weights, e.g. RSP's "
                               f"aid_28-rsp-resnet-50-ckpt.pth; see the README's weights section)")
        self.conv_encoder.load_pretrained(path)


@register_model("fisvl")
def fisvl(config: dict[str, Any]) -> FISVL:
    """The paper's model; the paper's losses and stages come from the config."""
    return FISVL(config)
