"""CLIP's byte-pair tokenizer as a text processor: open_clip's own (its vocabulary ships inside the package, so it
works offline), after the same ``pre_caption`` cleaning as every training caption."""
from __future__ import annotations

from typing import Any, Sequence

import open_clip
import torch

from dataset.captions import pre_caption

from ..encoders.open_clip_towers import architecture, quiet_open_clip


class ClipTokenizerProcessor:
    """Raw strings -> ``{"input_ids": [B, context_length]}`` by ``open_clip.get_tokenizer`` of the architecture
    (zero-padded, end-of-text kept at truncation, as open_clip does). ``state()`` carries the architecture, so a
    checkpoint rebuilds the same tokenizer."""

    kind = "open_clip"

    def __init__(self, arch: str | dict[str, Any], max_words: int) -> None:
        self.name, self.config = architecture(arch)
        self.max_words = max_words
        with quiet_open_clip():
            self.tokenizer = open_clip.get_tokenizer(self.name)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ClipTokenizerProcessor:
        return cls({"name": state["name"], "config": state["config"]}, state["max_words"])

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "config": self.config, "max_words": self.max_words}

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer([pre_caption(text, self.max_words) for text in texts])}
