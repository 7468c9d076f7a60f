"""Word-vocabulary text processing of the AMFMN lineage (AMFMN, GaLR, SIRS): lower-cased word tokens,
punctuation dropped, words outside the vocabulary mapped to ``<unk>``, ids padded with 0 and the lengths
passed to the recurrent encoder.

The vocabulary is AMFMN's public ``*_splits_vocab.json`` (``word2idx`` numbered from 1, ``<unk>`` last; id 0 is
padding) or one built from the training captions as AMFMN's ``vocab.py`` builds it (stop words left out, a
minimum count). The processor carries its word list (``state()``), so a checkpoint needs no vocabulary file.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from dataset.captions import ENGLISH_STOP_WORDS, word_tokens

PAD, UNK = "<pad>", "<unk>"
# The tokens AMFMN's data loader and vocabulary builder drop.
PUNCTUATION = frozenset([",", ".", ":", ";", "?", "(", ")", "[", "]", "&", "!", "*", "@", "#", "$", "%"])


class VocabularyError(ValueError):
    pass


def caption_words(text: str) -> list[str]:
    """A caption's lower-cased word tokens, punctuation dropped (AMFMN's data loader)."""
    return [token for token in word_tokens(text.lower()) if token not in PUNCTUATION]


class WordVocabProcessor:
    """Raw strings -> ``{"input_ids": [B, L] (0-padded), "lengths": [B]}``; ``words[k]`` is the word of id k,
    ``words[0]`` the padding."""

    kind = "word_vocab"

    def __init__(self, words: Sequence[str], source: str = "") -> None:
        if not words or words[0] != PAD or UNK not in words:
            raise VocabularyError(f"{source or 'vocabulary'}: the word list must start with {PAD} and hold {UNK}")
        duplicates = [word for word, count in Counter(words).items() if count > 1]
        if duplicates:
            raise VocabularyError(f"{source or 'vocabulary'}: words listed twice: {duplicates[:5]}")
        self.words = list(words)
        self.ids = {word: index for index, word in enumerate(self.words)}
        self.source = source

    @classmethod
    def from_vocab_file(cls, path: str | Path) -> WordVocabProcessor:
        """AMFMN's ``*_splits_vocab.json``: ``{"word2idx": {word: id}, ...}`` with ids 1..N (``idx2word`` and
        ``idx`` are redundant and ignored)."""
        try:
            word2idx = json.loads(Path(path).read_text(encoding="utf-8"))["word2idx"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise VocabularyError(f"{path}: not an AMFMN vocabulary JSON with a 'word2idx' mapping ({err})") from None
        ids = sorted(word2idx.values()) if all(isinstance(i, int) for i in word2idx.values()) else None
        if ids != list(range(1, len(word2idx) + 1)):
            raise VocabularyError(f"{path}: word2idx ids must be the integers 1..{len(word2idx)}, each once")
        words = [PAD] + sorted(word2idx, key=word2idx.__getitem__)
        return cls(words, source=str(path))

    @classmethod
    def from_captions(cls, captions: Iterable[str], min_count: int, source: str = "training captions") -> WordVocabProcessor:
        """AMFMN's ``build_vocab``: words that are not stop words and occur ``min_count`` times or more, in order
        of first appearance, then ``<unk>``."""
        counts = Counter(word for caption in captions for word in caption_words(caption)
                         if word not in ENGLISH_STOP_WORDS)
        words = [word for word, count in counts.items() if count >= min_count and word not in (PAD, UNK)]
        if not words:
            raise VocabularyError(f"{source}: no word occurs {min_count} times or more; lower vocab_min_count")
        return cls([PAD, *words, UNK], source=f"{source} (min count {min_count})")

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> WordVocabProcessor:
        return cls(state["words"], source=state.get("source", ""))

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "words": self.words, "source": self.source}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        words = caption_words(text)
        if not words:
            raise ValueError(f"text {text!r} has no word tokens")
        unk = self.ids[UNK]
        return [self.ids.get(word, unk) for word in words]

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = [torch.tensor(self.encode(text), dtype=torch.long) for text in texts]
        return {"input_ids": pad_sequence(encoded, batch_first=True, padding_value=0),
                "lengths": torch.tensor([len(ids) for ids in encoded], dtype=torch.long)}
