"""Caption text: cleaning as PIR/FISVL's ``pre_caption`` (fisvl-method.md §6: the punctuation is deleted,
where upstream X-VLM replaces it with a space), FISVL's training-time random word deletion, and the word
tokens of the AMFMN lineage (``word_tokens``)."""
from __future__ import annotations

import random
import re

from nltk.tokenize import NLTKWordTokenizer

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


# nltk's English stop-word list as the AMFMN lineage used it (179 words; nltk's corpus files are a download,
# so the list is written out here).
ENGLISH_STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
that that'll these those am is are was were be been being have has had having do does did doing a an the and but
if or because as until while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don don't should
should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
weren weren't won won't wouldn wouldn't
""".split())

_WORD_TOKENIZER = NLTKWordTokenizer()  # the per-sentence tokenizer inside nltk's word_tokenize


def word_tokens(text: str) -> list[str]:
    """nltk's ``word_tokenize`` for captions (the AMFMN lineage's tokeniser), without the punkt sentence model
    it downloads: the Treebank word tokeniser it applies per sentence, and a sentence end inside the text split
    off as punkt would for ordinary captions (``"roofs. A car"`` -> ``roofs . A car``). Words with another
    period (``U.S.``, ``3.5``) keep theirs; punkt would also keep the period of abbreviations it knows."""
    tokens = _WORD_TOKENIZER.tokenize(text)
    split: list[str] = []
    for position, token in enumerate(tokens):
        # the tokenizer splits the text's final period itself; a sentence end inside the text stays glued
        inner_sentence_end = position < len(tokens) - 1 and token.endswith(".") and token.count(".") == 1
        if inner_sentence_end and len(token) > 1:
            split.extend((token[:-1], "."))
        else:
            split.append(token)
    return split
