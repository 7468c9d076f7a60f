"""Caption text: cleaning as PIR/FISVL's ``pre_caption`` (fisvl-method.md §6: the punctuation is deleted,
where upstream X-VLM replaces it with a space) and FISVL's training-time random word deletion."""
from __future__ import annotations

import random
import re

_PUNCTUATION = re.compile(r"([,.'!?\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Lower-case, drop ``,.'!?"()*#:;~``, map ``-`` and ``/`` to spaces, keep ``max_words`` words.

    Raises ``ValueError`` when nothing is left: a blank caption is a data error, never a silent sample.
    """
    caption = _PUNCTUATION.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    if not caption:
        raise ValueError("pre_caption yields invalid text (the caption is empty after cleaning)")
    return caption


def delete_words(caption: str, rate: float) -> str:
    """Training-time text augmentation (FISVL): drop each word independently with probability ``rate``.

    Uses Python's ``random`` (the dataset seeds it per sample). A caption is never emptied: when every
    word would go, one random word is kept. ``rate`` 0 returns the caption without drawing any numbers,
    so enabling nothing leaves the random stream of the image augmentation untouched.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"word deletion rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return caption
    words = caption.split()
    kept = [word for word in words if random.random() >= rate]
    return " ".join(kept) if kept else random.choice(words)
