"""AMFMN's multiscale visual self-attention (MVSA, ``VSA_Module``; baselines.md §3.1): a saliency mask from the
ResNet's low- and high-level maps gates the global image vector.

Parameter names are the released ones (``LF_conv``, ``HF_conv``, ``conv1x1_1``, ``conv1x1_2``,
``solo_attention``). As released, without the paper's PReLU and L2 normalisation (Eqs. 14-19).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MVSA(nn.Module):
    """``forward(stages, global_vector)``: low = [f1, up2(f2)], high = [f3, up2(f4)]; the low map through a 3x3
    stride-4 conv and the high map through a 1x1 conv (``channels`` each) meet at stride 16; their concatenation
    plus the high map's channel mean goes through two 1x1 convs, a main map and a sigmoid gate; their product,
    flattened, gives the mask sigmoid(Linear(...)) over the global vector."""

    def __init__(self, stage_channels: list[int], image_res: int, embed_dim: int, channels: int = 3,
                 out_channels: int = 1) -> None:
        super().__init__()
        if image_res % 32:
            raise ValueError(f"MVSA needs image_res divisible by 32 (the ResNet's stride), got {image_res}")
        c1, c2, c3, c4 = stage_channels
        self.LF_conv = nn.Conv2d(c1 + c2, channels, kernel_size=3, stride=4)
        self.HF_conv = nn.Conv2d(c3 + c4, channels, kernel_size=1)
        self.conv1x1_1 = nn.Conv2d(2 * channels, out_channels, kernel_size=1)
        self.conv1x1_2 = nn.Conv2d(2 * channels, out_channels, kernel_size=1)
        self.solo_attention = nn.Linear(out_channels * (image_res // 16) ** 2, embed_dim)

    def forward(self, stages: list[torch.Tensor], global_vector: torch.Tensor) -> torch.Tensor:
        f1, f2, f3, f4 = stages
        low = self.LF_conv(torch.cat([f1, F.interpolate(f2, scale_factor=2.0, mode="nearest")], dim=1))
        high = self.HF_conv(torch.cat([f3, F.interpolate(f4, scale_factor=2.0, mode="nearest")], dim=1))
        both = torch.cat([low, high], dim=1)
        both = both + high.mean(dim=1, keepdim=True)
        saliency = self.conv1x1_1(both) * torch.sigmoid(self.conv1x1_2(both))
        return global_vector * torch.sigmoid(self.solo_attention(saliency.flatten(1)))
