"""AMFMN's visual-guided text attention (VGA; baselines.md §3.3): each caption's vector is re-weighted by
each image, so the score of an (image, caption) pair is cosine(v, t_v) with t_v depending on both.

Parameter names are the released ``CrossAttention``'s, so its weights load under this module's prefix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GUIDED_ATTENTIONS = ("soft_att", "fusion_att", "similarity_att")


class VisualGuidedText(nn.Module):
    """``forward(visual [I, d], text [T, d]) -> [I, T, d]``, the guided text vector of every pair:

    * ``soft_att``: sigmoid(Linear(v)) * t;
    * ``fusion_att``: sigmoid(Linear_1([v; t])) * Linear_2([v; t]);
    * ``similarity_att``: sigmoid(Linear_v(v) * Linear_t(t)) * Linear_t(t).
    """

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        if kind not in GUIDED_ATTENTIONS:
            raise ValueError(f"att_type must be one of {GUIDED_ATTENTIONS}, got {kind!r}")
        self.kind = kind
        if kind == "soft_att":
            self.cross_attention = nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid())
        elif kind == "fusion_att":
            self.cross_attention_fc1 = nn.Sequential(nn.Linear(2 * dim, dim), nn.Sigmoid())
            self.cross_attention_fc2 = nn.Sequential(nn.Linear(2 * dim, dim))
        else:
            self.fc_visual = nn.Sequential(nn.Linear(dim, dim))
            self.fc_text = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.kind == "soft_att":
            return self.cross_attention(visual)[:, None, :] * text[None, :, :]
        if self.kind == "fusion_att":
            gate = torch.sigmoid(pairwise_linear(self.cross_attention_fc1[0], visual, text))
            return gate * pairwise_linear(self.cross_attention_fc2[0], visual, text)
        mapped_text = self.fc_text(text)[None, :, :]
        return torch.sigmoid(self.fc_visual(visual)[:, None, :] * mapped_text) * mapped_text


def pairwise_linear(linear: nn.Linear, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``linear([v; t])`` for every (image, caption) pair, [I, T, d_out], without building the I x T
    concatenations: with W = [W_v W_t], W [v; t] + b = (W_v v + b) + W_t t, one product per item."""
    split = visual.shape[-1]
    return (F.linear(visual, linear.weight[:, :split], linear.bias)[:, None, :]
            + F.linear(text, linear.weight[:, split:])[None, :, :])
