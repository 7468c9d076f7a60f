"""FISVL on CLIP (model ``fisvl_clip``): open_clip's towers with FISVL's FGIS block, trained with FISVL's losses
and value-guided stages (which the config names, as for every model).

FGIS reads the CLIP vision tower's patch tokens (projected to the joint width by ``token_proj``) beside its
pooled, projected embedding, and, when the prior CNN is on (``fgis_prior``), the frozen ResNet's global node
and SFGS's fine-grained node; the graph steps refine the pooled node and ``head_img`` adds it to the CLIP
embedding. ``head_img`` starts at zero, so before training the model embeds exactly as the CLIP weights do
and fine-tuning starts from their alignment rather than from a random perturbation of it.

Ablations: ``fgis: false`` (plain CLIP), ``fgis_prior`` (the CNN nodes), ``sfgs`` (off / frozen / trainable),
``img_gcn_step``; the losses and caption weights by the ``stages``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from utils.config import Key, register_keys

from ._registry import register_model
from .clip import CLIPModel
from .encoders.open_clip_towers import ArchitectureError
from .fisvl import FGIS
from .text import TextProcessor

register_keys("FISVL on CLIP (fisvl_clip)", {
    "fgis_prior": Key((bool,), None, "fisvl_clip: the frozen prior CNN's nodes (and SFGS's) in the FGIS graph; "
                      "null = when resnet_ckpt names its weights"),
})


class FISVLClip(FGIS, CLIPModel):
    """CLIP towers, FGIS on the vision tokens; ``fuse`` of :class:`FGIS` gives the image embedding."""

    def __init__(self, config: dict[str, Any], text_processor: TextProcessor | None = None) -> None:
        prior = config["fgis_prior"] if config["fgis_prior"] is not None else bool(config["resnet_ckpt"])
        super().__init__(config, text_processor, use_prior=prior)
        if not self.use_fgis:
            return
        visual = self.clip.visual
        if not hasattr(visual, "output_tokens"):
            raise ArchitectureError(f"fisvl_clip needs the patch tokens of a ViT image tower; the {self.arch_name} "
                                    f"tower ({type(visual).__name__}) does not give them")
        visual.output_tokens = True
        self.token_proj = nn.Linear(visual.transformer.width, self.embed_dim)
        nn.init.zeros_(self.head_img.weight)
        nn.init.zeros_(self.head_img.bias)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if not self.use_fgis:
            return super().encode_image(images)
        pooled, tokens = self.clip.visual(images)
        return self.fuse(images, pooled, self.token_proj(tokens))


@register_model("fisvl_clip")
def fisvl_clip(config: dict[str, Any], text_processor: TextProcessor | None = None) -> FISVLClip:
    """FISVL's FGIS on open_clip's towers; FISVL's losses and stages from the config."""
    return FISVLClip(config, text_processor)
