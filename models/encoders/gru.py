"""The AMFMN paper's text encoder (Yuan et al., TGRS 2021, Eqs. 10-12; baselines.md §3.2): trainable word
embeddings over the dataset vocabulary and a bidirectional GRU whose forward and backward states are averaged
at every word, then over the caption's words."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class BiGRUTextEncoder(nn.Module):
    """``forward(input_ids [B, L], lengths [B]) -> [B, width]``. Packed sequences: the padding after a caption
    never reaches the GRU, so a caption's embedding does not depend on the batch it is in."""

    def __init__(self, vocab_size: int, word_dim: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, width, batch_first=True, bidirectional=True)
        self.width = width

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embedding(input_ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=input_ids.shape[1])
        per_word = (states[..., :self.width] + states[..., self.width:]) / 2  # zero at padded positions
        return per_word.sum(1) / lengths.to(per_word)[:, None]
