"""SIRS (Zhu et al., "SIRS: Multitask Joint Learning for Remote Sensing Foreground-Entity Image-Text
Retrieval", TGRS 2024; baselines.md §5): AMFMN's lineage with a segmentation task learnt beside retrieval.

Image: a fine-tuned ResNet's four stages; a decoder predicts the 15 classes of RSITMD-SS masks and SSA
multiplies the summed foreground logits into every stage; AMW pools each stage, maps it to d and compares
each with the caption. Text: the lineage's word-vocabulary branch (the released code: skip-thoughts).

AMW averages the four cosines cos(v_s, t) with equal weights. For unit vectors that average is the dot
product of the mean of the four unit image vectors with the unit text vector, so the image embedding here is
that mean: the model stays a dual encoder (dot-product scores, fast evaluation) with exactly the released
score.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dataset.masks import NUM_CLASSES
from utils.config import Key, register_keys
from utils.weights import Remapped, StateDict

from ._registry import register_model
from .amfmn import AMFMNLineage
from .fusion.segmentation import SSA, SSA_DOWNSAMPLING, SSA_NORMALISATION, SegmentationDecoder
from .text import TextProcessor

AMW_POOLING = ("mean", "max", "median")

register_keys("SIRS (sirs)", {
    "seg_decoder": Key((bool,), True, "build the segmentation decoder (trained with the seg loss on masks); false: "
                       "retrieval only, SIRS's RSICD/UCM setting"),
    "ssa": Key((bool,), True, "SSA: the decoder's summed foreground logits multiply every stage (needs seg_decoder)"),
    "ssa_downsampling": Key((str,), "averagePooling", "how SSA resizes the foreground map to each stage",
                            choices=SSA_DOWNSAMPLING),
    "ssa_normalisation": Key((str,), "None", "SSA's normalisation of each weighted stage", choices=SSA_NORMALISATION),
    "amw": Key((bool,), True, "AMW: one vector per stage, the four cosines averaged; false: one vector from stage 4"),
    "amw_pooling": Key((str,), "mean", "AMW: how each stage is pooled over space", choices=AMW_POOLING),
}, models=("sirs",))


def spatial_pool(stage: torch.Tensor, how: str) -> torch.Tensor:
    """[B, C, H, W] -> [B, C] by the mean, the maximum or the (lower) median over positions."""
    flat = stage.flatten(2)
    if how == "mean":
        return flat.mean(-1)
    return flat.amax(-1) if how == "max" else flat.median(-1).values


class SIRS(AMFMNLineage):
    """``forward`` adds ``seg_logits`` [B, classes, H, W] for the segmentation loss; ``segment(images)`` gives
    them for evaluation; ``encode_image`` is the AMW image embedding."""

    def __init__(self, config: dict[str, Any], text_processor: TextProcessor | None = None) -> None:
        super().__init__(config, text_processor)
        if config["ssa"] and not config["seg_decoder"]:
            raise ValueError("ssa: true needs seg_decoder: true (SSA multiplies the decoder's foreground into the "
                             "stages; the released code crashes on this combination)")
        channels, dim = self.image_encoder.stage_channels, config["embed_dim"]
        self.decoder = SegmentationDecoder(channels, NUM_CLASSES) if config["seg_decoder"] else None
        self.seg_classes = NUM_CLASSES if config["seg_decoder"] else 0
        self.ssa = SSA(channels, config["ssa_downsampling"], config["ssa_normalisation"]) if config["ssa"] else None
        self.pooling = config["amw_pooling"]
        self.stage_proj = nn.ModuleList(nn.Linear(width, dim) for width in channels) if config["amw"] else None
        self.global_proj = None if config["amw"] else nn.Linear(self.image_encoder.width, dim)

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image embedding and the segmentation logits (``None`` without a decoder)."""
        stages = self.image_encoder.forward_stages(images)
        logits = self.decoder(stages) if self.decoder is not None else None
        if self.ssa is not None:
            stages = self.ssa(stages, logits)
        if self.stage_proj is None:
            return F.normalize(self.global_proj(stages[-1].mean(dim=(2, 3))), dim=-1), logits
        vectors = [F.normalize(proj(spatial_pool(stage, self.pooling)), dim=-1)
                   for proj, stage in zip(self.stage_proj, stages)]
        return torch.stack(vectors).mean(0), logits

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_features(images)[0]

    def encode_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.encode_words(text), dim=-1)

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise NotImplementedError("this SIRS has no segmentation decoder (seg_decoder: false)")
        return self.image_features(images)[1]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image_emb, logits = self.image_features(batch["images"])
        out = {"image_feat": image_emb, "text_feat": self.encode_text(batch["text"])}
        return out if logits is None else {**out, "seg_logits": logits}

    def remap_checkpoint(self, state: StateDict) -> Remapped:
        """This project's names, or SIRS's released ``IRSeg`` ones: ``extract_feature.resnet``,
        ``visual_feature.mapping1-4`` (AMW) or ``visual_feature.linear``, the decoder's used layers,
        ``ss_attention.norm1-4``, ``text_feature``; the decoder's never-called layers are reported unused."""
        if not any(key.startswith("extract_feature.") for key in state):
            return Remapped(dict(state))
        renames = {f"visual_feature.mapping{k + 1}.": f"stage_proj.{k}." for k in range(4)}
        renames |= {f"ss_attention.norm{k + 1}.": f"ssa.norms.{k}." for k in range(4)}
        renames |= {f"decoder.{name}.": f"decoder.{name}." for name in
                    ("latlayer1", "latlayer2", "latlayer3", "semantic_branch", "gn1", "conv3")}
        renames["visual_feature.linear."] = "global_proj."
        return self.remap_released(state, renames, "extract_feature.resnet.")


@register_model("sirs")
def sirs(config: dict[str, Any], text_processor: TextProcessor | None = None) -> SIRS:
    """SIRS: retrieval by AMW with SSA, trained jointly with foreground segmentation (the seg loss)."""
    return SIRS(config, text_processor)
