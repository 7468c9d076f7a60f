"""PIR's attention blocks (Pan et al., ACM MM 2023; baselines.md §1.2), the steps of its progressive attention
encoders: VIR / Spatial-PAE on the image tokens, LCA / Temporal-PAE on the text tokens.

Post-norm blocks of width d, ``heads`` heads, dropout p. Parameter names are the published ones (``mhatt`` or
``mhatt_cross`` with ``linear_{v,k,q,merge}``, ``ffn.{0,1,3}``, ``norm1``, ``norm2``), so that PIR's released
checkpoints load as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MHAtt(nn.Module):
    """Multi-head attention MHAtt(v, k, q): softmax(q k^T / sqrt(d_head)) v per head, then ``linear_merge``; the
    output has the query's length. ``key_padding`` [B, L_k] (True at [PAD]) keeps padded keys out, as the
    published ``masked_fill(mask, -1e9)`` would."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by head {heads}")
        self.heads, self.dropout = heads, dropout
        self.linear_v = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_q = nn.Linear(dim, dim)
        self.linear_merge = nn.Linear(dim, dim)

    def forward(self, v: torch.Tensor, k: torch.Tensor, q: torch.Tensor,
                key_padding: torch.Tensor | None = None) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:  # [B, L, d] -> [B, heads, L, d / heads]
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        attend = None if key_padding is None else ~key_padding[:, None, None, :]
        out = F.scaled_dot_product_attention(split(self.linear_q(q)), split(self.linear_k(k)), split(self.linear_v(v)),
                                             attn_mask=attend, dropout_p=self.dropout if self.training else 0.0)
        return self.linear_merge(out.transpose(1, 2).flatten(2))


def feed_forward(dim: int) -> nn.Sequential:
    """PIR's FFN: d -> 2d -> LayerNorm -> GELU -> d (``ffn.0``, ``ffn.1``, ``ffn.3``)."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class MHSA(nn.Module):
    """Self-attention block: x <- LN(x + Drop(MHAtt(x, x, x))); x <- LN(x + Drop(FFN(x)))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.mhatt = MHAtt(dim, heads, dropout)
        self.ffn = feed_forward(dim)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.dropout2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.mhatt(x, x, x, key_padding)))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class CroSA(nn.Module):
    """Cross-attention block CroSA(x, y): y <- LN(y + Drop(MHAtt(v=y, k=y, q=x))); y <- LN(y + Drop(FFN(y))).
    The queries come from x but the residual is y's, so x and y have the same length."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.mhatt_cross = MHAtt(dim, heads, dropout)
        self.ffn = feed_forward(dim)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(dim)
        self.dropout2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm1(y + self.dropout1(self.mhatt_cross(y, y, x, key_padding)))
        return self.norm2(y + self.dropout2(self.ffn(y)))
