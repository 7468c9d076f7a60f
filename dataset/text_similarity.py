"""Prior text similarity S(T, T_I) between a caption T and the captions T_I of an image I.

AMFMN (Yuan et al., TGRS 2021, baselines.md §3.4) makes the triplet margin adapt to this prior:
alpha = gamma (e^beta - e^(beta S)) / (e^beta - 1), so a negative caption that describes the anchor image
well gets a small margin. As released (``Rct/generate_t2i_sim_matrix.py``), S for image i and caption j is
the mean of two scores, both on lower-cased, Porter-stemmed word tokens:

1. BLEU-4 of caption j against image i's captions (nltk ``sentence_bleu``, weights 0.25 x 4, no
   smoothing), or 1 when caption j's token list equals one of them;
2. the mean, over image i's captions whose content list (stems minus ``ENGLISH_STOP_WORDS``, ``','`` and ``'.'``)
   is not empty, of |set(content_i) & set(content_j)| / len(content_i), duplicates counted in the length.

The released code scores every pair in a Python loop (hours for RSITMD's train split). Here each text is
tokenised once, n-grams become sparse count matrices, and both scores become sparse matrix products over
chunks of images, so memory stays bounded and no Python loop runs over pairs.

Measured on the development machine (2 CPU cores, shared with other jobs), default chunk: the RSITMD train
matrix (3,435 images x 17,175 captions) takes 14-20 s, a third of it tokenising, with about 0.15 GB of
working memory besides the 0.24 GB result; RSICD's precomp train split (9,828 x 49,140) takes about 3 min.

Differences from the released code, all outside ordinary captions:

- ``word_tokenize`` first splits the text into sentences with punkt, which needs downloaded nltk data.
  ``word_tokens`` instead splits a trailing '.' off a word inside the text ('river. The' gives 'river', '.',
  'The'), which is what punkt does for ordinary captions. Punkt would keep the period on words it knows
  as abbreviations ('st.', 'dr.'), and on initials and numbers it judges to continue the sentence; here
  they lose it too.
- An image none of whose captions has a content word makes the released score 2 the mean of nothing (NaN);
  here it is 0.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import nltk
import numpy as np
import scipy.sparse as sp
from nltk.stem import PorterStemmer

from .captions import ENGLISH_STOP_WORDS, word_tokens

log = logging.getLogger(__name__)

# Tokens that never count as content words in score 2. As released, they are compared with the stems,
# so stop words that stemming changes ('was' -> 'wa', 'this' -> 'thi') stay content words.
_NON_CONTENT = ENGLISH_STOP_WORDS | {",", "."}

MAX_ORDER = 4  # BLEU-4
FORMAT_VERSION = 1  # part of the cache fingerprint: bump it when the computed values change
DEFAULT_CHUNK = 128  # images per block: about 0.4 GB of working memory for RSICD's 49,140 train captions

_STEMMER = PorterStemmer()


@functools.lru_cache(maxsize=None)
def _stem(token: str) -> str:
    return _STEMMER.stem(token.lower())


def stemmed_tokens(text: str) -> tuple[str, ...]:
    """The tokens both scores compare: ``word_tokens``, then lower-case and Porter-stem each token."""
    return tuple(_stem(token) for token in word_tokens(text))


def _ngram_counts(token_lists: Sequence[tuple[str, ...]],
                  order: int) -> tuple[sp.csr_matrix, list[tuple[str, ...]]]:
    """Counts of each n-gram of one order per text, as a [texts, n-grams] matrix, and its n-gram vocabulary."""
    vocabulary: dict[tuple[str, ...], int] = {}
    rows: list[int] = []
    columns: list[int] = []
    for row, tokens in enumerate(token_lists):
        for start in range(len(tokens) - order + 1):
            columns.append(vocabulary.setdefault(tokens[start:start + order], len(vocabulary)))
            rows.append(row)
    counts = sp.coo_matrix((np.ones(len(rows), dtype=np.int32), (rows, columns)),
                           shape=(len(token_lists), len(vocabulary)))
    return counts.tocsr(), list(vocabulary)  # tocsr sums the repeated (text, n-gram) entries into counts


def _at_least(counts: sp.csr_matrix, level: int) -> sp.csr_matrix:
    """Binary matrix of the entries with a count of at least ``level``."""
    return (counts >= level).astype(np.int32)


def _one_hot(rows: np.ndarray, columns: np.ndarray, shape: tuple[int, int],
             values: np.ndarray | None = None) -> sp.csr_matrix:
    """Sparse matrix with ``values`` (default 1) at (rows, columns); repeated positions add up."""
    values = np.ones(len(rows), dtype=np.int32) if values is None else values
    return sp.coo_matrix((values, (rows, columns)), shape=shape).tocsr()


class _Operands:
    """Everything the blocks need, built once per call from each distinct text's tokens.

    BLEU: with m_i(g) the largest count of n-gram g in a caption of image i and c_j(g) its count in caption j,
    the clipped matches sum_g min(c_j(g), m_i(g)) equal sum_{k>=1} [m_i >= k] . [c_j >= k], and [m_i >= k]
    is "some caption of image i has [c >= k]": one sparse product per n-gram order and count level.
    Score 2 is linear in caption j's content-word set: sum over image i's references r of
    w_ir |set_r & set_j|, with w_ir = 1 / (len(content_r) * number of image i's references with content).
    """

    def __init__(self, image_captions: Sequence[Sequence[str]], captions: Sequence[str]) -> None:
        if not image_captions or not captions:
            raise ValueError(f"need images and captions, got {len(image_captions)} images and {len(captions)} captions")
        if any(len(group) == 0 for group in image_captions):
            raise ValueError("every image needs at least one caption (BLEU has no reference otherwise)")
        references = [text for group in image_captions for text in group]
        texts = list(dict.fromkeys(references + list(captions)))
        row_of = {text: row for row, text in enumerate(texts)}
        token_lists = [stemmed_tokens(text) for text in texts]  # each distinct text once
        self.n_images, self.n_captions = len(image_captions), len(captions)

        # Reference k (flattened over images) is text reference_rows[k] of image reference_image[k].
        references_per_image = np.array([len(group) for group in image_captions], dtype=np.int64)
        reference_image = np.repeat(np.arange(self.n_images), references_per_image)
        reference_rows = np.array([row_of[text] for text in references], dtype=np.int64)
        caption_rows = np.array([row_of[text] for text in captions], dtype=np.int64)
        image_texts = _one_hot(reference_image, reference_rows, (self.n_images, len(texts)))

        # BLEU's clipped matches: per order, per count level, ([images, n-grams], [n-grams, captions]).
        counts_by_order = [_ngram_counts(token_lists, order) for order in range(1, MAX_ORDER + 1)]
        self.levels: list[list[tuple[sp.csr_matrix, sp.csr_matrix]]] = []
        for counts, _ in counts_by_order:
            order_levels = []
            for level in range(1, (counts.max() if counts.nnz else 0) + 1):
                text_level = _at_least(counts, level)
                order_levels.append((_at_least(image_texts @ text_level, 1), text_level[caption_rows].T.tocsr()))
            self.levels.append(order_levels)

        lengths = np.array([len(tokens) for tokens in token_lists], dtype=np.int64)
        self.caption_lengths = lengths[caption_rows]
        # n-grams per caption and order, at least 1 as nltk's denominator; BLEU uses their product.
        self.ngram_product = np.prod([np.maximum(self.caption_lengths - (order - 1), 1)
                                      for order in range(1, MAX_ORDER + 1)], axis=0).astype(np.float64)
        self.brevity, self.length_column = _brevity_penalties(
            lengths[reference_rows], references_per_image, self.caption_lengths)

        # Exact token-list matches: [images, distinct lists] @ [distinct lists, captions] > 0.
        list_ids: dict[tuple[str, ...], int] = {}
        list_of_text = np.array([list_ids.setdefault(tokens, len(list_ids)) for tokens in token_lists])
        self.image_lists = _one_hot(reference_image, list_of_text[reference_rows], (self.n_images, len(list_ids)))
        self.caption_lists = _one_hot(list_of_text[caption_rows], np.arange(self.n_captions),
                                      (len(list_ids), self.n_captions))

        # Score 2: content-word sets over the unigram vocabulary, weighted per image as in the class docstring.
        unigram_counts, unigrams = counts_by_order[0]
        content_columns = [column for column, (word,) in enumerate(unigrams) if word not in _NON_CONTENT]
        content_counts = unigram_counts[:, content_columns]
        content_sets = (content_counts > 0).astype(np.float64)
        content_lengths = np.asarray(content_counts.sum(axis=1)).ravel()[reference_rows]
        used = content_lengths > 0
        with_content_per_image = np.bincount(reference_image[used], minlength=self.n_images)
        weights = 1.0 / (content_lengths[used] * with_content_per_image[reference_image[used]])
        image_weights = _one_hot(reference_image[used], reference_rows[used], (self.n_images, len(texts)), weights)
        self.image_content = (image_weights @ content_sets).tocsr()
        self.caption_content = content_sets[caption_rows].T.tocsr()

    def _matches(self, images: slice, order: int) -> np.ndarray:
        """BLEU's clipped n-gram matches of one order, int32 [block, captions]."""
        matches = np.zeros((images.stop - images.start, self.n_captions), dtype=np.int32)
        for image_level, caption_level in self.levels[order - 1]:
            matches += (image_level[images] @ caption_level).toarray()
        return matches

    def block(self, images: slice) -> np.ndarray:
        """S for a block of images and all captions, float64 [block, captions]."""
        # BLEU = brevity * (product of the 4 precisions) ** (1/4). nltk without smoothing replaces a zero
        # precision of order 2-4 by the smallest float, so its BLEU is then about 1e-77 where this gives 0.
        matched = self._matches(images, 1).astype(np.float64)
        for order in range(2, MAX_ORDER + 1):
            matched *= self._matches(images, order)
        brevity = self.brevity[images][:, self.length_column]
        bleu = brevity * np.sqrt(np.sqrt(matched / self.ngram_product))
        exact = (self.image_lists[images] @ self.caption_lists).toarray() > 0
        score1 = np.where(exact, 1.0, bleu)

        score2 = (self.image_content[images] @ self.caption_content).toarray()
        return (score1 + score2) / 2


def _brevity_penalties(reference_lengths: np.ndarray, references_per_image: np.ndarray,
                       caption_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BLEU's brevity penalty per image and distinct caption length, and each caption's column.

    As nltk: against the closest reference length r (ties to the shorter), 1 for a caption longer than r,
    else exp(1 - r / length). (An empty caption, where nltk's penalty is 0, has no match, so BLEU is 0 anyway.)
    """
    distinct, column = np.unique(caption_lengths, return_inverse=True)
    scale = int(max(reference_lengths.max(), distinct.max())) + 1
    # The order (distance, length) as one integer: the smallest per image is nltk's choice.
    key = np.abs(reference_lengths[:, None] - distinct[None, :]) * scale + reference_lengths[:, None]
    starts = np.concatenate(([0], np.cumsum(references_per_image)[:-1]))
    closest = np.minimum.reduceat(key, starts, axis=0) % scale
    length = np.maximum(distinct, 1)[None, :]
    return np.where(length > closest, 1.0, np.exp(1.0 - closest / length)), column


def _blocks(image_captions: Sequence[Sequence[str]], captions: Sequence[str],
            chunk: int) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (image rows, similarity block) over consecutive chunks of ``chunk`` images."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of images, got {chunk}")
    operands = _Operands(image_captions, captions)
    for start in range(0, operands.n_images, chunk):
        rows = slice(start, min(start + chunk, operands.n_images))
        yield rows, operands.block(rows)


def prior_text_similarity(image_captions: Sequence[Sequence[str]], captions: Sequence[str],
                          chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """AMFMN's prior similarity S, float32 [images, captions], equal to the released per-pair formula.

    ``image_captions[i]`` are image i's captions (the BLEU references); ``captions`` are the captions to
    score, usually all captions of the split in order. ``chunk`` images are scored at a time, which bounds
    the working memory; the result itself is held in memory (4 bytes per pair).
    """
    similarity = np.empty((len(image_captions), len(captions)), dtype=np.float32)
    for rows, block in _blocks(image_captions, captions, chunk):
        similarity[rows] = block
    return similarity


def _fingerprint(image_captions: Sequence[Sequence[str]], captions: Sequence[str]) -> str:
    """sha256 of everything the matrix depends on: the texts, their grouping and the code producing it."""
    payload = json.dumps({"format_version": FORMAT_VERSION, "nltk": nltk.__version__,
                          "image_captions": [list(references) for references in image_captions],
                          "captions": list(captions)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _load_cached(path: Path, expected: dict[str, object]) -> np.ndarray | None:
    """The cached matrix, memory-mapped, when its sidecar matches ``expected``; otherwise None, with a log line."""
    if not path.exists() and not _sidecar(path).exists():
        return None
    try:
        stored = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        if stored != expected:
            log.warning("prior text similarity cache %s was made from other captions or code; recomputing", path)
            return None
        matrix = np.load(path, mmap_mode="r")
        if matrix.shape != tuple(expected["shape"]) or matrix.dtype != np.float32:
            raise ValueError(f"it holds {matrix.dtype} {matrix.shape}")
        return matrix
    except (OSError, EOFError, ValueError) as error:  # no sidecar, broken JSON, truncated or malformed .npy
        log.warning("prior text similarity cache %s is unusable (%s); recomputing", path, error)
        return None


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A fresh temporary file in ``path``'s folder (so os.replace onto ``path`` is atomic), removed if left over."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def cached_prior_text_similarity(path: Path, image_captions: Sequence[Sequence[str]],
                                 captions: Sequence[str]) -> np.ndarray:
    """``prior_text_similarity``, stored once at ``path`` (.npy) and memory-mapped read-only afterwards.

    The sidecar ``<path>.json`` holds a fingerprint of the inputs; other inputs, an unreadable file or a
    missing sidecar mean a recomputation (logged). The matrix is written block by block into a temporary
    file in the same folder and renamed into place, so neither a crash nor a concurrent reader ever sees
    a half-written file, and RSICD-sized matrices (1.5-2 GB) need no room in memory.
    """
    path = Path(path)
    expected = {"format_version": FORMAT_VERSION, "fingerprint": _fingerprint(image_captions, captions),
                "shape": [len(image_captions), len(captions)]}
    cached = _load_cached(path, expected)
    if cached is not None:
        return cached

    log.info("computing the prior text similarity of %d images x %d captions into %s",
             len(image_captions), len(captions), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_beside(path) as temporary:
        matrix = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=tuple(expected["shape"]))
        for rows, block in _blocks(image_captions, captions, DEFAULT_CHUNK):
            matrix[rows] = block
        matrix.flush()
        del matrix
        # Drop the old sidecar first: a crash before the new one is written then means a recomputation.
        _sidecar(path).unlink(missing_ok=True)
        os.replace(temporary, path)
    with _temporary_beside(_sidecar(path)) as temporary:
        temporary.write_text(json.dumps(expected, indent=1), encoding="utf-8")
        os.replace(temporary, _sidecar(path))
    return np.load(path, mmap_mode="r")
