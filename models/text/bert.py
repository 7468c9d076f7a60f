"""BERT WordPiece text processing: PIR/FISVL's caption cleaning, then a tokenizer built only from local
files and checked to have really loaded."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import BertTokenizerFast

from dataset.captions import pre_caption

# The files that define a BERT tokenizer (vocab.txt alone is enough; the others are kept when present).
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


class TokenizerError(RuntimeError):
    pass


def build_tokenizer(folder: str) -> BertTokenizerFast:
    """Load ``folder/vocab.txt``; never the hub.

    transformers 5 silently returns a 5-token dummy tokenizer for names it cannot find, so the loaded
    vocabulary size is compared with the line count of ``vocab.txt``.
    """
    vocab = Path(folder) / "vocab.txt"
    if not vocab.is_file():
        raise TokenizerError(f"text_encoder folder {folder!r} has no vocab.txt (a BERT folder with vocab.txt "
                             f"and, for pretrained runs, its weights is expected)")
    with vocab.open(encoding="utf-8") as handle:
        expected = sum(1 for _ in handle)
    tokenizer = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.vocab_size != expected:
        raise TokenizerError(f"tokenizer from {vocab} has {tokenizer.vocab_size} tokens but the file has "
                             f"{expected} lines: the vocabulary did not load")
    return tokenizer


class BertWordPieceProcessor:
    """Raw strings -> ``{"input_ids", "attention_mask"}``: ``pre_caption`` (as training captions), then
    WordPiece, padded to the longest text and cut at ``max_tokens``.

    It carries the tokenizer's files as text (``state()``), so a checkpoint rebuilds it with no folder at hand.
    """

    kind = "bert_wordpiece"

    def __init__(self, files: dict[str, str], max_tokens: int, max_words: int, source: str = "") -> None:
        self.files, self.max_tokens, self.max_words = dict(files), max_tokens, max_words
        with tempfile.TemporaryDirectory() as folder:
            for name, text in self.files.items():
                (Path(folder) / name).write_text(text, encoding="utf-8")
            try:
                self.tokenizer = build_tokenizer(folder)
            except TokenizerError as err:
                raise TokenizerError(f"{source or 'saved tokenizer'}: {err}") from None

    @classmethod
    def from_folder(cls, folder: str, max_tokens: int, max_words: int) -> BertWordPieceProcessor:
        """The tokenizer files of a BERT folder (the ``text_encoder`` key)."""
        build_tokenizer(folder)  # the folder's own checks, with its own path in the message
        files = {name: (Path(folder) / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
                 if (Path(folder) / name).is_file()}
        return cls(files, max_tokens, max_words, source=folder)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BertWordPieceProcessor:
        return cls(state["files"], state["max_tokens"], state["max_words"])

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "files": self.files, "max_tokens": self.max_tokens, "max_words": self.max_words}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        cleaned = [pre_caption(text, self.max_words) for text in texts]
        tokens = self.tokenizer(cleaned, padding="longest", truncation=True, max_length=self.max_tokens,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
