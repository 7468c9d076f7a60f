"""Similarity graph reasoning (the SGR block of SGRAF, Diao et al. AAAI 2021), as FISVL uses it over image nodes."""
from __future__ import annotations

import torch
from torch import nn


class GraphReasoning(nn.Module):
    """One step over a fully connected graph of nodes [B, N, d]:

        A = softmax_rows(query(N) key(N)^T)   (no 1/sqrt(d) scaling, as published)
        N <- ReLU(update(A N))

    Parameter names follow the published checkpoints (``graph_query_w``, ``graph_key_w``, ``sim_graph_w``).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.graph_query_w = nn.Linear(dim, dim)
        self.graph_key_w = nn.Linear(dim, dim)
        self.sim_graph_w = nn.Linear(dim, dim)
        for layer in (self.graph_query_w, self.graph_key_w, self.sim_graph_w):
            nn.init.xavier_uniform_(layer.weight)  # U(+-sqrt(6 / (fan_in + fan_out))), as SGRAF
            nn.init.zeros_(layer.bias)

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        edges = torch.softmax(self.graph_query_w(nodes) @ self.graph_key_w(nodes).transpose(1, 2), dim=-1)
        return torch.relu(self.sim_graph_w(edges @ nodes))
