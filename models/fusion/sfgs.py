"""SFGS, the Scene Fine-Grained Sensing module (from SWAN, Pan et al. ICMR 2023; fisvl-method.md §2.4).

It turns the CNN stem map into one fine-grained token: three convolution branches with growing receptive
fields (1x1, 3x3/3, 5x5/5) pooled to a 16x16 grid give 128 channel tokens of 256 values; a linear layer
lifts them to the embedding width, one post-norm transformer layer lets them attend to each other, and a
learned weight per token fuses them into a single vector.
"""
from __future__ import annotations

import math

import torch
from torch import nn

GRID = 16  # pooled side of every branch, so each channel token has GRID * GRID values
BRANCHES = ((1, 32), (3, 32), (5, 64))  # (kernel = stride, output channels): 128 channel tokens in all
FILTER_CHANNELS = 32
HEADS = 8


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, stride=kernel, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class SFGS(nn.Module):
    """``forward(stem [B, C, H, W]) -> [B, embed_dim]``."""

    def __init__(self, in_channels: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.conv_filter = nn.Sequential(*_conv_bn_relu(in_channels, FILTER_CHANNELS, 1))
        self.branches = nn.ModuleList(
            nn.Sequential(*_conv_bn_relu(FILTER_CHANNELS, channels, kernel), nn.AdaptiveAvgPool2d(GRID))
            for kernel, channels in BRANCHES)
        self.token_proj = nn.Sequential(nn.Linear(GRID * GRID, embed_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.attention = nn.TransformerEncoderLayer(embed_dim, HEADS, dim_feedforward=2 * embed_dim, dropout=dropout,
                                                    activation="gelu", batch_first=True)
        self.attention.dropout = nn.Identity()  # the published feed-forward has no inner dropout
        num_tokens = sum(channels for _, channels in BRANCHES)
        self.fusion_weight = nn.Parameter(torch.randn(num_tokens, embed_dim))

    def init_as_published(self) -> None:
        """Re-initialise as the published code does, where SFGS sits inside the ResNet before its init loop: the
        convolutions get kaiming-normal fan-out weights, and the attention's projections are four plain
        ``nn.Linear`` (kaiming-uniform weights, uniform biases) instead of nn.MultiheadAttention's xavier
        in-projection and zero biases. The other layers already start as published."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        attention = self.attention.self_attn
        nn.init.kaiming_uniform_(attention.in_proj_weight, a=math.sqrt(5))  # fan_in = d, as for each nn.Linear(d, d)
        bound = 1 / math.sqrt(attention.embed_dim)
        nn.init.uniform_(attention.in_proj_bias, -bound, bound)
        nn.init.uniform_(attention.out_proj.bias, -bound, bound)

    def forward(self, stem: torch.Tensor) -> torch.Tensor:
        filtered = self.conv_filter(stem)
        tokens = torch.cat([branch(filtered).flatten(2) for branch in self.branches], 1)  # [B, 128, GRID^2]
        tokens = self.attention(self.token_proj(tokens))
        # The published fusion, mean over e of (W^T X)[e], is a weighted sum of tokens with weights mean_e W[n, e].
        return torch.einsum("n,bnd->bd", self.fusion_weight.mean(1), tokens)
