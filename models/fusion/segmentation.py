"""SIRS's segmentation parts (Zhu et al., TGRS 2024; baselines.md §5.1): the FPN-style decoder that predicts
foreground classes from the ResNet's stages, and SSA, which multiplies the predicted foreground into every
stage before the retrieval embedding is pooled.

Parameter names are the released ``seg_fpn_decoder_check``'s (``latlayer1-3``, ``semantic_branch``, ``gn1``,
``conv3``). The released decoder also builds layers it never calls (a ResNet bottom-up path, ``toplayer``,
``smooth1-3``, ``conv2``, ``gn2``); they are not built here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SSA_DOWNSAMPLING = ("averagePooling", "maxPooling", "interpolation")
SSA_NORMALISATION = ("None", "batchNorm", "groupNorm")


class SegmentationDecoder(nn.Module):
    """Stages 1-3 -> 1x1 laterals to 256 channels -> one shared 1x1 "semantic branch" (256 -> 128) + GroupNorm
    + ReLU -> upsampled to stage 1's size and summed -> 1x1 conv to the classes -> x4 bilinear upsampling: logits
    at the input resolution. Stage 4 is not used, as released."""

    def __init__(self, stage_channels: list[int], num_classes: int) -> None:
        super().__init__()
        c1, c2, c3, _ = stage_channels
        self.latlayer1 = nn.Conv2d(c3, 256, kernel_size=1)
        self.latlayer2 = nn.Conv2d(c2, 256, kernel_size=1)
        self.latlayer3 = nn.Conv2d(c1, 256, kernel_size=1)
        self.semantic_branch = nn.Conv2d(256, 128, kernel_size=1)
        self.gn1 = nn.GroupNorm(128, 128)
        self.conv3 = nn.Conv2d(128, num_classes, kernel_size=1)

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3, _ = stages
        height, width = f1.shape[-2:]

        def semantic(lateral: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.gn1(self.semantic_branch(lateral)))
            return F.interpolate(out, size=(height, width), mode="bilinear", align_corners=True)

        summed = semantic(self.latlayer1(f3)) + semantic(self.latlayer2(f2)) + semantic(self.latlayer3(f1))
        return F.interpolate(self.conv3(summed), size=(4 * height, 4 * width), mode="bilinear", align_corners=True)


class SSA(nn.Module):
    """Semantic-guided spatial attention (the released ``SMA``): the sum of the foreground logits (classes 1...,
    raw, no softmax) resized to each stage (``downsampling``) multiplies that stage, optionally followed by a
    BatchNorm or GroupNorm per stage (``normalisation``)."""

    def __init__(self, stage_channels: list[int], downsampling: str = "averagePooling",
                 normalisation: str = "None") -> None:
        super().__init__()
        if downsampling not in SSA_DOWNSAMPLING:
            raise ValueError(f"ssa_downsampling must be one of {SSA_DOWNSAMPLING}, got {downsampling!r}")
        if normalisation not in SSA_NORMALISATION:
            raise ValueError(f"ssa_normalisation must be one of {SSA_NORMALISATION}, got {normalisation!r}")
        self.downsampling = downsampling
        norms = {"batchNorm": lambda c: nn.BatchNorm2d(c), "groupNorm": lambda c: nn.GroupNorm(16, c),
                 "None": lambda c: nn.Identity()}[normalisation]
        self.norms = nn.ModuleList(norms(channels) for channels in stage_channels)

    def resize(self, attention: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.downsampling == "averagePooling":
            return F.adaptive_avg_pool2d(attention, size)
        if self.downsampling == "maxPooling":
            return F.adaptive_max_pool2d(attention, size)
        return F.interpolate(attention, size=size, mode="bilinear", align_corners=False)

    def forward(self, stages: list[torch.Tensor], logits: torch.Tensor) -> list[torch.Tensor]:
        foreground = logits[:, 1:].sum(dim=1, keepdim=True)
        return [norm(stage * self.resize(foreground, stage.shape[-2:])) for stage, norm in zip(stages, self.norms)]
