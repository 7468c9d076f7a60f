"""The BERT WordPiece tokenizer, built only from a local folder and checked to have really loaded."""
from __future__ import annotations

from pathlib import Path

from transformers import BertTokenizerFast


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
