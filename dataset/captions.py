"""Caption cleaning as PIR/FISVL's ``pre_caption`` (fisvl-method.md §6: the punctuation is deleted, where
upstream X-VLM replaces it with a space)."""
from __future__ import annotations

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
