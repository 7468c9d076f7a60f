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
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from utils.config import Key, register_keys
from utils.weights import Remapped, StateDict, WeightsError, patterns_under, with_prefix

from ._registry import register_model
from .dual_encoder import DualEncoder, random_init
from .encoders.resnet import PriorCNN
from .fusion import SFGS, GraphReasoning
from .text import TextProcessor

log = logging.getLogger(__name__)

register_keys("FISVL (fisvl)", {
    "fgis": Key((bool,), True, "FISVL: fuse CNN global/local tokens with the Swin tokens by graph reasoning"),
    "conv_arch": Key((str,), "resnet50", "FISVL/PIR prior CNN (torchvision layout)",
                     choices=("resnet18", "resnet34", "resnet50")),
    "resnet_ckpt": Key((str,), None, "prior CNN weights (FISVL/PIR; torchvision layout, e.g. RSP's ResNet-50)",
                       is_path=True),
    "finetune_conv": Key((bool,), False, "train the prior CNN (FISVL/PIR keep it frozen)"),
    "conv_bn_train_mode": Key((bool,), True, "frozen CNN's BatchNorm in train mode, so batch statistics are used "
                              "and running statistics drift (as published); false = eval mode"),
    "sfgs": Key((str,), "frozen", "FISVL's SFGS token: frozen (as published: random and never trained), "
                "trainable, or off", choices=("frozen", "trainable", "off")),
    "img_gcn_step": Key((int,), 2, "FISVL: graph-reasoning steps over the image nodes"),
    "dropout_r": Key((float,), 0.2, "dropout of the fusion blocks (FISVL/PIR)"),
})


class FISVL(DualEncoder):
    """Ablation switches: ``fgis`` (the whole fusion), ``sfgs`` (frozen / trainable / off), ``img_gcn_step``,
    ``finetune_conv`` and ``conv_bn_train_mode`` (the frozen CNN's BatchNorm as published, or in eval mode)."""

    encoder_names = ("vision_encoder", "text_encoder", "conv_encoder")

    def __init__(self, config: dict[str, Any], text_processor: TextProcessor | None = None) -> None:
        super().__init__(config, text_processor)
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

    def encoders(self) -> dict[str, nn.Module]:
        return {**super().encoders(), "conv_encoder": self.conv_encoder} if self.use_fgis else super().encoders()

    def pretrained_sources(self, config: dict[str, Any]) -> dict[str, str | None]:
        sources = super().pretrained_sources(config)
        return {**sources, "conv_encoder": config["resnet_ckpt"] or None} if self.use_fgis else sources

    def load_pretrained(self, config: dict[str, Any], parts: Iterable[str] | None = None) -> None:
        parts = list(self.encoders()) if parts is None else list(parts)
        super().load_pretrained(config, [part for part in parts if part != "conv_encoder"])
        if "conv_encoder" not in parts:
            return
        path = config["resnet_ckpt"]
        if not path:
            random_init("conv_encoder", config, "resnet_ckpt is not set" + (
                "" if self.finetune_conv else "; the prior CNN is frozen, so it stays random"))
            return
        if not Path(path).is_file():
            raise WeightsError(f"resnet_ckpt not found: {path} (the prior CNN's weights, e.g. RSP's "
                               f"aid_28-rsp-resnet-50-ckpt.pth; see the README's weights section)")
        self.conv_encoder.load_pretrained(path, patterns_under(config["allow_missing_weights"], "conv_encoder."))

    def remap_checkpoint(self, state: StateDict) -> Remapped:
        """Released FISVL checkpoints keep SFGS inside the ResNet (``conv_encoder.loc_fea1.*``); it moves to
        ``sfgs.*`` (:func:`remap_released_sfgs`) before the encoders' own remaps."""
        return super().remap_checkpoint(remap_released_sfgs(state))


def remap_released_sfgs(state: StateDict) -> StateDict:
    """``conv_encoder.loc_fea1.*`` of the published code -> this model's ``sfgs.*``.

    The published attention computes softmax(linear_k(x) linear_v(x)^T / 8) linear_q(x) (its ``att(v, k, q)``
    receives them in that order, fisvl-method.md §2.4), so torch's packed in-projection is
    [query; key; value] = [linear_k; linear_v; linear_q]. ``fmp_weight`` [1, 128, d] is the fusion weight.
    """
    released = "conv_encoder.loc_fea1."
    if not any(k.startswith(released) for k in state):
        return state
    out = {k: v for k, v in state.items() if not k.startswith(released)}
    sfgs = with_prefix(state, released)
    attention = with_prefix(sfgs, "sfgs.wsa.")
    names = {"conv_filter.": "conv_filter.", "sfgs.conv2d_block_11.": "branches.0.",
             "sfgs.conv2d_block_33.": "branches.1.", "sfgs.conv2d_block_55.": "branches.2.",
             "sfgs.fc.linear.": "token_proj.0.", "sfgs.wsa.mhatt.linear_merge.": "attention.self_attn.out_proj.",
             "sfgs.wsa.ffn.net.0.": "attention.linear1.", "sfgs.wsa.ffn.net.3.": "attention.linear2.",
             "sfgs.wsa.norm1.": "attention.norm1.", "sfgs.wsa.norm2.": "attention.norm2."}
    for key, value in sfgs.items():
        for old, new in names.items():
            if key.startswith(old):
                out[f"sfgs.{new}{key[len(old):]}"] = value
    for kind in ("weight", "bias"):
        packed = [attention.get(f"mhatt.linear_{role}.{kind}") for role in ("k", "v", "q")]
        if all(t is not None for t in packed):
            out[f"sfgs.attention.self_attn.in_proj_{kind}"] = torch.cat(packed)
    if "fmp_weight" in attention:
        out["sfgs.fusion_weight"] = attention["fmp_weight"].squeeze(0)
    return out


@register_model("fisvl")
def fisvl(config: dict[str, Any], text_processor: TextProcessor | None = None) -> FISVL:
    """The paper's model; the paper's losses and stages come from the config."""
    return FISVL(config, text_processor)
