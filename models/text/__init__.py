"""Text processors: a callable from raw strings to the dict of tensors a model's ``encode_text`` takes.

Each cleans its input as training captions are cleaned, so a search query and a caption take the same
steps, and each can say what rebuilds it (``state()``), so a checkpoint carries it.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from .bert import BertWordPieceProcessor, TokenizerError, build_tokenizer
from .clip_tokenizer import ClipTokenizerProcessor
from .vocab import VocabularyError, WordVocabProcessor

__all__ = ["BertWordPieceProcessor", "ClipTokenizerProcessor", "TextProcessor", "TokenizerError", "VocabularyError",
           "WordVocabProcessor", "build_tokenizer", "processor_from_state"]


class TextProcessor(Protocol):
    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def state(self) -> dict[str, Any]: ...


_KINDS: dict[str, Any] = {processor.kind: processor for processor in (BertWordPieceProcessor, ClipTokenizerProcessor,
                                                               WordVocabProcessor)}


def processor_from_state(state: dict[str, Any]) -> TextProcessor:
    """Rebuild a processor from what its ``state()`` returned (a checkpoint's ``text_processor``)."""
    kind = state.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown text processor kind {kind!r}; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[kind].from_state(state)
