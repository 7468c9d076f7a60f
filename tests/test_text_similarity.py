"""AMFMN's prior text similarity: equal to the released per-pair formula, independent of the chunking, cached safely."""
from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from nltk.stem import PorterStemmer
from nltk.translate.bleu_score import sentence_bleu

import dataset.text_similarity as text_similarity
from dataset.captions import ENGLISH_STOP_WORDS, word_tokens
from dataset.text_similarity import cached_prior_text_similarity, prior_text_similarity

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
RSITMD_TRAIN = SHARED_DATASETS / "RSITMD" / "finetune_json" / "rsitmd_train.json"

# Hand-written images (their captions are the BLEU references) and the cases each one covers.
HAND_IMAGES = [
    # periods inside the text, a word repeated in one reference (clipping), a reference that has no
    # content word once stop words are gone ("It is what it is.")
    ["A bridge crosses the river. Cars drive on it.", "the bridge over the river is long .",
     "It is what it is.", "bridge, bridge and bridge over water"],
    # references of 7, 9 and 1 tokens: brevity penalty both ways, and the tie between 7 and 9
    ["small white boats are in the harbor", "small white boats are in the quiet blue harbor", "boats"],
    # punctuation, abbreviations and a decimal number
    ["Tennis courts, a pool; and (green) trees!", "The U.S. road is 3.5 m. wide near the St. Mary school.",
     "two tennis courts and a swimming pool"],
    # an exact duplicate of a caption of another image, and a short caption (BLEU ~0 unless exact)
    ["the bridge over the river is long .", "a pool"],
]
HAND_EXTRA_CAPTIONS = [
    "zebras graze quietly",  # no unigram in common with any reference
    "trees near the bridge and boats in the harbor pool",  # unigrams and bigrams in common, no 4-gram
    "bridge bridge bridge bridge bridge bridge",  # more repeats than any reference has: clipped
    "small white boats are in the harbor .",  # 8 tokens: references of 7 and 9 are equally close
    "small white boats are in",  # shorter than the closest reference
    "many small white boats are in the quiet blue harbor near the old stone pier",  # longer than all
    "",  # no tokens at all
]
HAND_CAPTIONS = [text for captions in HAND_IMAGES for text in captions] + HAND_EXTRA_CAPTIONS

# --- Reference: the released per-pair loop (Rct/generate_t2i_sim_matrix.py), with the module's tokenizer and
# stop-word list in place of word_tokenize and nltk.corpus.stopwords, which need downloaded nltk data.
_STEMMER = PorterStemmer()
_RELEASED_STOP_WORDS = list(ENGLISH_STOP_WORDS) + [",", "."]


@functools.lru_cache(maxsize=None)  # the released code redoes this per pair; caching it changes no value
def _released_preprocess(text: str) -> tuple[list[str], list[str]]:
    words = [_STEMMER.stem(word.lower()) for word in word_tokens(text)]
    return words, [word for word in words if word not in _RELEASED_STOP_WORDS]


def released_scores(references: Sequence[str], caption: str) -> tuple[float, float]:
    """(score1, score2) of one image and one caption, as the released code computes them."""
    reference_words = [_released_preprocess(text)[0] for text in references]
    reference_content = [_released_preprocess(text)[1] for text in references]
    words, content = _released_preprocess(caption)
    if words in reference_words:
        score1 = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nltk warns about every n-gram order without a match
            score1 = sentence_bleu(reference_words, words, weights=(0.25, 0.25, 0.25, 0.25))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mean of no reference is NaN, with a warning
        score2 = np.mean([len(set(ref) & set(content)) / len(ref) for ref in reference_content if len(ref) != 0])
    return score1, score2


def released_similarity(image_captions: Sequence[Sequence[str]], captions: Sequence[str]) -> np.ndarray:
    return np.array([[np.mean(released_scores(references, caption)) for caption in captions]
                     for references in image_captions])


def rsitmd_sample() -> tuple[list[list[str]], list[str]]:
    """30 RSITMD train images (20 spread over the file, 10 with a period inside a caption) and their captions."""
    if not RSITMD_TRAIN.is_file():
        pytest.skip(f"{RSITMD_TRAIN} is absent (the shared datasets folder is not mounted)")
    groups: dict[str, list[str]] = {}
    for entry in json.loads(RSITMD_TRAIN.read_text(encoding="utf-8")):
        groups.setdefault(entry["image"], []).append(entry["caption"])
    images = list(groups.values())
    inner_period = [group for group in images if any(". " in text.strip() for text in group)]
    chosen = images[::len(images) // 20][:20] + inner_period[:10]
    return chosen, [text for group in chosen for text in group]


# --- Tokenisation


def test_tokenize_splits_sentence_ends_inside_the_text_only() -> None:
    assert word_tokens("Some buildings. There are trees.") == ["Some", "buildings", ".", "There", "are", "trees", "."]
    assert word_tokens("a road in the U.S. is 3.5 m wide") == ["a", "road", "in", "the", "U.S.", "is", "3.5", "m", "wide"]
    assert word_tokens("trees, grass and houses .\n") == ["trees", ",", "grass", "and", "houses", "."]


def test_stop_words_are_nltks_english_list() -> None:
    assert len(ENGLISH_STOP_WORDS) == len(set(ENGLISH_STOP_WORDS)) == 179
    assert {"i", "the", "there", "is", "wouldn't", "should've"} <= set(ENGLISH_STOP_WORDS)


# --- Equality with the released formula


def test_hand_written_cases_match_the_released_formula() -> None:
    expected = released_similarity(HAND_IMAGES, HAND_CAPTIONS)
    assert not np.isnan(expected).any()
    got = prior_text_similarity(HAND_IMAGES, HAND_CAPTIONS)
    assert got.dtype == np.float32 and got.shape == (len(HAND_IMAGES), len(HAND_CAPTIONS))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_hand_written_cases_exercise_what_they_claim() -> None:
    """The cases above reach the branches of the released formula they are meant for."""
    column = {text: j for j, text in enumerate(HAND_CAPTIONS)}
    assert released_scores(HAND_IMAGES[3], "a pool")[0] == 1.0  # exact duplicate with BLEU ~0
    assert released_similarity(HAND_IMAGES, ["zebras graze quietly"]).max() == 0.0
    no_4gram = released_scores(HAND_IMAGES[1], "trees near the bridge and boats in the harbor pool")
    assert 0 < no_4gram[0] < 1e-70 and no_4gram[1] > 0  # nltk's "zero": the smallest float in the geometric mean
    # The tie of 7 and 9 reference tokens goes to 7, so the 8-token caption has no brevity penalty.
    tie = released_scores(HAND_IMAGES[1], "small white boats are in the harbor .")[0]
    assert tie == pytest.approx((7 / 8 * 6 / 7 * 5 / 6 * 4 / 5) ** 0.25)
    got = prior_text_similarity(HAND_IMAGES, HAND_CAPTIONS)
    assert got[:, column["zebras graze quietly"]].max() == 0.0
    no_4gram_column = column["trees near the bridge and boats in the harbor pool"]
    assert got[1, no_4gram_column] == pytest.approx(no_4gram[1] / 2, abs=1e-7)


def test_image_without_content_words_scores_bleu_only() -> None:
    """Released: score 2 is the mean of nothing (NaN); here it is 0, so S is BLEU / 2."""
    images = [["It is what it is.", "There are some."]]
    captions = ["There are some.", "there is what it is", "ducks"]
    got = prior_text_similarity(images, captions)
    for j, caption in enumerate(captions):
        score1, score2 = released_scores(images[0], caption)
        assert np.isnan(score2)
        assert got[0, j] == pytest.approx(score1 / 2, abs=1e-7)


def test_real_rsitmd_captions_match_the_released_formula() -> None:
    images, captions = rsitmd_sample()
    assert any(". " in text.strip() for text in captions)
    expected = released_similarity(images, captions)
    np.testing.assert_allclose(prior_text_similarity(images, captions), expected, rtol=0, atol=1e-6)


# --- Chunking and arguments


def test_chunked_equals_unchunked() -> None:
    whole = prior_text_similarity(HAND_IMAGES, HAND_CAPTIONS, chunk=len(HAND_IMAGES))
    for chunk in (1, 3, 1000):
        assert np.array_equal(prior_text_similarity(HAND_IMAGES, HAND_CAPTIONS, chunk=chunk), whole)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="chunk"):
        prior_text_similarity(HAND_IMAGES, HAND_CAPTIONS, chunk=0)
    with pytest.raises(ValueError, match="at least one caption"):
        prior_text_similarity([["a pond"], []], ["a pond"])
    with pytest.raises(ValueError, match="need images and captions"):
        prior_text_similarity([["a pond"]], [])


# --- Cache


@pytest.fixture
def cache_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=text_similarity.__name__)
    return caplog


def _computations(caplog: pytest.LogCaptureFixture) -> int:
    return sum("computing the prior text similarity" in record.getMessage() for record in caplog.records)


def test_cache_is_written_once_then_memory_mapped(tmp_path: Path, cache_log: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "prior.npy"
    first = cached_prior_text_similarity(path, HAND_IMAGES, HAND_CAPTIONS)
    np.testing.assert_array_equal(first, prior_text_similarity(HAND_IMAGES, HAND_CAPTIONS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.npy", "prior.npy.json"]  # no temporary file left
    assert _computations(cache_log) == 1

    old = 1_000_000_000  # an mtime no rewrite could keep
    for file in tmp_path.iterdir():
        os.utime(file, ns=(old, old))
    second = cached_prior_text_similarity(path, HAND_IMAGES, HAND_CAPTIONS)
    assert isinstance(second, np.memmap) and second.mode == "r"
    np.testing.assert_array_equal(second, first)
    assert all(file.stat().st_mtime_ns == old for file in tmp_path.iterdir())
    assert _computations(cache_log) == 1
    assert not [record for record in cache_log.records if record.levelno >= logging.WARNING]


def test_changed_captions_recompute(tmp_path: Path, cache_log: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "prior.npy"
    cached_prior_text_similarity(path, HAND_IMAGES, HAND_CAPTIONS)
    regrouped = [HAND_IMAGES[0] + HAND_IMAGES[1]] + HAND_IMAGES[2:]  # same texts, other grouping
    for images, captions in ((HAND_IMAGES, HAND_CAPTIONS[:-1]), (regrouped, HAND_CAPTIONS)):
        got = cached_prior_text_similarity(path, images, captions)
        np.testing.assert_array_equal(got, prior_text_similarity(images, captions))
    assert _computations(cache_log) == 3
    assert sum("other captions" in record.getMessage() for record in cache_log.records) == 2


@pytest.mark.parametrize("damage", ["truncated matrix", "garbage matrix", "broken sidecar", "missing sidecar"])
def test_unusable_cache_is_recomputed_with_a_warning(tmp_path: Path, cache_log: pytest.LogCaptureFixture,
                                                     damage: str) -> None:
    path = tmp_path / "prior.npy"
    sidecar = tmp_path / "prior.npy.json"
    expected = cached_prior_text_similarity(path, HAND_IMAGES, HAND_CAPTIONS).copy()
    if damage == "truncated matrix":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "garbage matrix":
        path.write_bytes(b"not a numpy file")
    elif damage == "broken sidecar":
        sidecar.write_text("{", encoding="utf-8")
    else:
        sidecar.unlink()
    got = cached_prior_text_similarity(path, HAND_IMAGES, HAND_CAPTIONS)
    np.testing.assert_array_equal(got, expected)
    assert _computations(cache_log) == 2
    assert any(record.levelno == logging.WARNING and "unusable" in record.getMessage() for record in cache_log.records)
    # The repaired cache is used as it is on the next call.
    cached_prior_text_similarity(path, HAND_IMAGES, HAND_CAPTIONS)
    assert _computations(cache_log) == 2


def test_cache_only_appears_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new matrix reaches its name by one rename of a complete file from the same folder, and the old
    sidecar is gone by then, so a crash in between can never pair the new matrix with the old fingerprint."""
    path = tmp_path / "prior.npy"
    sidecar = tmp_path / "prior.npy.json"
    cached_prior_text_similarity(path, HAND_IMAGES, HAND_CAPTIONS[:-1])
    renames: list[tuple[Path, np.ndarray]] = []
    real_replace = os.replace

    def observed_replace(source: str | Path, target: str | Path) -> None:
        if Path(target) == path:
            assert not sidecar.exists()
            renames.append((Path(source), np.load(source)))
        real_replace(source, target)

    monkeypatch.setattr(text_similarity.os, "replace", observed_replace)
    cached_prior_text_similarity(path, HAND_IMAGES, HAND_CAPTIONS)
    assert len(renames) == 1
    source, content = renames[0]
    assert source.parent == tmp_path and source.name.endswith(".tmp")
    np.testing.assert_array_equal(content, prior_text_similarity(HAND_IMAGES, HAND_CAPTIONS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.npy", "prior.npy.json"]


def test_failed_computation_leaves_the_old_cache_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "prior.npy"
    before = cached_prior_text_similarity(path, HAND_IMAGES, HAND_CAPTIONS).copy()
    with pytest.raises(ValueError):
        cached_prior_text_similarity(path, HAND_IMAGES + [[]], HAND_CAPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.npy", "prior.npy.json"]
    np.testing.assert_array_equal(cached_prior_text_similarity(path, HAND_IMAGES, HAND_CAPTIONS), before)
