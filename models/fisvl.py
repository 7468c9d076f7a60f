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

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from utils.config import Key, register_keys
from utils.weights import Remapped, StateDict, with_prefix

from ._registry import register_model
from .fusion import SFGS, GraphReasoning
from .dual_encoder import DualEncoder
from .prior import PriorCNN, fusion_steps
from .text import TextProcessor

register_keys("FISVL (fisvl)", {
    "fgis": Key((bool,), True, "FISVL: fuse CNN global/local tokens with the Swin tokens by graph reasoning"),
    "sfgs": Key((str,), "frozen", "FISVL's SFGS token: frozen (as published: random and never trained), "
                "trainable, or off", choices=("frozen", "trainable", "off")),
    "img_gcn_step": Key((int,), 2, "FISVL: graph-reasoning steps over the image nodes"),
})


class FGIS(PriorCNN):
    """The FGIS block as a mixin before a model's towers in the bases (``FISVL``, ``FISVLClip``): the prior CNN's
    nodes, the graph steps and ``head_img``; :meth:`fuse` refines a pooled image embedding with the image's tokens.
    ``fgis: false`` builds none of it; ``use_prior`` (the CNN and SFGS nodes) is the subclass's to choose."""

    def __init__(self, config: dict[str, Any], text_processor: TextProcessor | None = None,
                 use_prior: bool = True) -> None:
        self.use_fgis = config["fgis"]
        super().__init__(config, text_processor, use_prior=self.use_fgis and use_prior)
        if not self.use_fgis:
            return
        dim = self.embed_dim
        published = config["init"] == "published"
        self.sfgs_trainable = config["sfgs"] == "trainable"
        self.sfgs = None
        if self.use_prior and config["sfgs"] != "off":
            self.sfgs = SFGS(self.conv_encoder.stem_channels, dim, config["dropout_r"]).requires_grad_(self.sfgs_trainable)
            if published:
                self.sfgs.init_as_published()
        self.img_gcn = fusion_steps(lambda: GraphReasoning(dim), config["img_gcn_step"], published)
        self.head_img = nn.Linear(dim, dim)
        self.fgis_dropout = nn.Dropout(config["dropout_r"])

    def frozen_parts(self) -> list[nn.Module]:
        """The frozen CNN and, unless it trains, SFGS."""
        sfgs = [self.sfgs] if self.use_prior and self.sfgs is not None and not self.sfgs_trainable else []
        return super().frozen_parts() + sfgs

    def prior_nodes(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The CNN global token and, with SFGS, the fine-grained token; frozen parts run without autograd."""
        if not self.use_prior:
            return []
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune_conv):
            stem, pooled = self.conv_encoder.forward_prior(images)
        nodes = [self.fgis_dropout(self.conv_proj(pooled))]
        if self.sfgs is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.sfgs_trainable):
                nodes.append(self.sfgs(stem))
        return nodes

    def fuse(self, images: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """L2norm(pooled + Dropout(head_img(GR^K([prior nodes; pooled; tokens])[pooled node]))) for ``pooled``
        ``[B, d]`` and ``tokens`` ``[B, L, d]``; L2norm(pooled) without FGIS."""
        if not self.use_fgis:
            return F.normalize(pooled, dim=-1)
        prior = self.prior_nodes(images)
        nodes = torch.cat([*(node[:, None] for node in prior), pooled[:, None], tokens], 1)
        for step in self.img_gcn:
            nodes = step(nodes)
        fused = nodes[:, len(prior)]  # the pooled-token node
        return F.normalize(pooled + self.fgis_dropout(self.head_img(fused)), dim=-1)


class FISVL(FGIS, DualEncoder):
    """Ablation switches: ``fgis`` (the whole fusion), ``sfgs`` (frozen / trainable / off), ``img_gcn_step``,
    ``finetune_conv`` and ``conv_bn_train_mode`` (the frozen CNN's BatchNorm as published, or in eval mode);
    ``init: published`` starts the graph steps equal and SFGS as the published ResNet initialises it."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_proj(self.vision_encoder.forward_tokens(images))  # [B, 1 + L, d]
        return self.fuse(images, tokens[:, 0], tokens[:, 1:])

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
