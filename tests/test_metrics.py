"""retrieval_metrics against a plain per-query loop with X-VLM's itm_eval logic and a stable tie rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.metrics import METRIC_KEYS, NonFiniteScoresError, chance_metrics, retrieval_metrics, retrieval_ranks


def loop_ranks(sims: np.ndarray, img2txt: list[list[int]], txt2img: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """X-VLM's itm_eval ranks, one query at a time, with ties broken by candidate index (stable descending sort)."""
    ranks_i2t = np.zeros(sims.shape[0], dtype=np.int64)
    for i, row in enumerate(sims):
        order = np.argsort(-row, kind="stable")
        ranks_i2t[i] = min(np.where(order == c)[0][0] for c in img2txt[i])
    ranks_t2i = np.zeros(sims.shape[1], dtype=np.int64)
    for c, column in enumerate(sims.T):
        order = np.argsort(-column, kind="stable")
        ranks_t2i[c] = np.where(order == txt2img[c])[0][0]
    return ranks_i2t, ranks_t2i


def loop_reference(sims: np.ndarray, img2txt: list[list[int]], txt2img: list[int]) -> dict[str, float]:
    """Recalls from the per-query loop's ranks."""
    ranks_i2t, ranks_t2i = loop_ranks(sims, img2txt, txt2img)
    out = {f"txt_r{k}": 100.0 * np.mean(ranks_i2t < k) for k in (1, 5, 10)}
    out.update({f"img_r{k}": 100.0 * np.mean(ranks_t2i < k) for k in (1, 5, 10)})
    out["r_mean"] = np.mean([out[k] for k in METRIC_KEYS[:-1]])
    return out


def layout(n_img: int, counts: list[int] | None = None) -> tuple[list[list[int]], list[int]]:
    counts = counts or [5] * n_img
    img2txt, txt2img, next_id = [], [], 0
    for i, count in enumerate(counts):
        img2txt.append(list(range(next_id, next_id + count)))
        txt2img += [i] * count
        next_id += count
    return img2txt, txt2img


def shuffled_layout(gen: np.random.Generator, counts: list[int]) -> tuple[list[list[int]], list[int]]:
    """Captions of an image need not be consecutive: caption ids permuted."""
    img2txt, txt2img = layout(len(counts), counts)
    perm = gen.permutation(len(txt2img))
    img2txt = [[int(perm[c]) for c in caps] for caps in img2txt]
    txt2img = [0] * len(txt2img)
    for i, caps in enumerate(img2txt):
        for c in caps:
            txt2img[c] = i
    return img2txt, txt2img


def assert_ranks_match_loop(sims: np.ndarray, img2txt: list[list[int]], txt2img: list[int], chunk: int = 128) -> None:
    i2t, t2i = retrieval_ranks(torch.from_numpy(sims), img2txt, txt2img, chunk=chunk)
    want_i2t, want_t2i = loop_ranks(sims.astype(np.float64), img2txt, txt2img)
    np.testing.assert_array_equal(i2t.numpy(), want_i2t)
    np.testing.assert_array_equal(t2i.numpy(), want_t2i)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_on_random_scores(seed: int) -> None:
    gen = np.random.default_rng(seed)
    img2txt, txt2img = layout(40)
    perm = gen.permutation(200)  # captions of an image need not be consecutive
    img2txt = [[int(perm[c]) for c in caps] for caps in img2txt]
    txt2img = [0] * 200
    for i, caps in enumerate(img2txt):
        for c in caps:
            txt2img[c] = i
    sims = gen.standard_normal((40, 200)).astype(np.float32)
    got = retrieval_metrics(torch.from_numpy(sims), img2txt, txt2img)
    assert got == pytest.approx(loop_reference(sims, img2txt, txt2img))


def test_matches_loop_with_ties_and_uneven_caption_counts() -> None:
    gen = np.random.default_rng(3)
    counts = [int(c) for c in gen.integers(1, 7, size=30)]
    img2txt, txt2img = layout(30, counts)
    sims = gen.integers(0, 4, size=(30, len(txt2img))).astype(np.float32)  # heavy ties
    got = retrieval_metrics(torch.from_numpy(sims), img2txt, txt2img)
    assert got == pytest.approx(loop_reference(sims, img2txt, txt2img))


def test_small_chunks_give_the_same_ranks() -> None:
    img2txt, txt2img = layout(25)
    sims = torch.randn(25, 125)
    full = retrieval_ranks(sims, img2txt, txt2img)
    chunked = retrieval_ranks(sims, img2txt, txt2img, chunk=7)
    assert all(torch.equal(a, b) for a, b in zip(full, chunked))


def test_perfect_and_hand_worked_scores() -> None:
    img2txt, txt2img = layout(3, [2, 2, 2])
    perfect = torch.full((3, 6), -1.0)
    for i, caps in enumerate(img2txt):
        perfect[i, caps] = 1.0
    assert retrieval_metrics(perfect, img2txt, txt2img) == pytest.approx(dict.fromkeys(METRIC_KEYS, 100.0))
    # image 0's best caption ranks 2nd (caption 4 beats it); captions 1 and 4 rank their image 2nd
    sims = perfect.clone()
    sims[0, 4], sims[0, 1], sims[2, 1] = 2.0, 0.5, 0.8
    got = retrieval_metrics(sims, img2txt, txt2img)
    assert got["txt_r1"] == pytest.approx(200 / 3) and got["txt_r5"] == 100.0
    assert got["img_r1"] == pytest.approx(400 / 6) and got["img_r5"] == 100.0


def test_shape_errors() -> None:
    img2txt, txt2img = layout(2)
    with pytest.raises(ValueError, match="2 x 9"):
        retrieval_metrics(torch.zeros(2, 9), img2txt, txt2img)


def test_chance_matches_random_rankings() -> None:
    img2txt, txt2img = layout(20)
    chance = chance_metrics(img2txt, 100)
    assert chance["img_r5"] == pytest.approx(25.0)
    assert chance["txt_r1"] == pytest.approx(5.0)  # 5 positives among 100 captions
    gen = torch.Generator().manual_seed(0)
    runs = [retrieval_metrics(torch.rand(20, 100, generator=gen), img2txt, txt2img)["r_mean"] for _ in range(300)]
    assert np.mean(runs) == pytest.approx(chance["r_mean"], rel=0.05)


@pytest.mark.parametrize("seed", range(6))
def test_ranks_match_loop_with_many_ties_both_directions(seed: int) -> None:
    """Every rank (not only those under 10) against the loop: uneven counts, scattered ids, few distinct scores."""
    gen = np.random.default_rng(10 + seed)
    n_img = int(gen.integers(2, 40))
    img2txt, txt2img = shuffled_layout(gen, [int(c) for c in gen.integers(1, 8, size=n_img)])
    levels = int(gen.integers(2, 6))
    sims = gen.integers(0, levels, size=(n_img, len(txt2img))).astype(np.float32) / levels
    assert_ranks_match_loop(sims, img2txt, txt2img, chunk=int(gen.integers(1, n_img + 2)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_ranks_match_loop_on_continuous_scores(dtype: type) -> None:
    gen = np.random.default_rng(20)
    img2txt, txt2img = shuffled_layout(gen, [int(c) for c in gen.integers(1, 7, size=50)])
    sims = gen.standard_normal((50, len(txt2img))).astype(dtype)
    sims[:, 5] = sims[:, 9]  # a duplicated caption: tied columns
    assert_ranks_match_loop(sims, img2txt, txt2img, chunk=16)


def test_signed_zeros_tie() -> None:
    gen = np.random.default_rng(21)
    img2txt, txt2img = shuffled_layout(gen, [3, 1, 4, 2, 5])
    sims = gen.choice(np.array([-0.0, 0.0, 1.0], dtype=np.float32), size=(5, 15))
    assert_ranks_match_loop(sims, img2txt, txt2img, chunk=2)


def test_best_positive_tied_with_a_negative() -> None:
    """The stable rule: a negative with the best positive's score outranks it only if its index is lower."""
    img2txt, txt2img = [[1, 3], [0, 2], [4]], [1, 0, 1, 0, 2]
    sims = np.zeros((3, 5), dtype=np.float32)
    sims[0] = [0.9, 0.5, 0.2, 0.9, 0.1]  # best positive 3 (0.9), tied with negative 0 (lower index): rank 1
    sims[1] = [0.7, 0.3, 0.4, 0.7, 0.1]  # best positive 0 (0.7), tied with negative 3 (higher index): rank 0
    sims[2] = [0.6, 0.8, 0.6, 0.2, 0.6]  # positive 4 (0.6) ties 0 and 2 (lower) and loses to 1: rank 3
    i2t, _ = retrieval_ranks(torch.from_numpy(sims), img2txt, txt2img)
    assert i2t.tolist() == [1, 0, 3]
    assert_ranks_match_loop(sims, img2txt, txt2img)


def test_own_image_tied_with_another_image() -> None:
    """Text -> image: a caption's image tied with an image of lower index ranks behind it, not with a higher one."""
    img2txt, txt2img = [[0], [1], [2]], [0, 1, 2]
    sims = np.array([[0.5, 0.4, 0.3],
                     [0.5, 0.4, 0.3],
                     [0.1, 0.4, 0.3]], dtype=np.float32)
    _, t2i = retrieval_ranks(torch.from_numpy(sims), img2txt, txt2img, chunk=1)
    # caption 0: image 0 ties image 1 (higher index) -> 0; caption 1: image 1 ties 0 and 2 (0 lower) -> 1;
    # caption 2: image 2 ties images 0 and 1 (both lower) -> 2
    assert t2i.tolist() == [0, 1, 2]
    assert_ranks_match_loop(sims, img2txt, txt2img, chunk=2)


def test_single_image() -> None:
    img2txt, txt2img = [[2, 0, 1]], [0, 0, 0]
    sims = np.array([[0.2, 0.1, 0.2]], dtype=np.float32)  # best score 0.2 reached first by caption 0
    i2t, t2i = retrieval_ranks(torch.from_numpy(sims), img2txt, txt2img)
    assert i2t.tolist() == [0] and t2i.tolist() == [0, 0, 0]
    assert_ranks_match_loop(sims, img2txt, txt2img)


def test_missing_caption_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(torch.zeros(2, 2), [[0, 1], []], [0, 0])


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("spoil, scores, images, texts", [
    ([((3,), NAN), ((4, 7), -INF)], 11, 2, 10),  # a NaN row and a -inf entry
    ([((2, 4), INF)], 1, 1, 1),  # one inf entry
    ([((slice(None),), NAN)], 60, 6, 10),  # all NaN
])
def test_non_finite_scores_are_refused(spoil: list[tuple[tuple, float]], scores: int, images: int, texts: int) -> None:
    """NaN compares False, so NaN scores would give every target rank 0: 100 % on every recall."""
    img2txt, txt2img = layout(6, [2, 1, 2, 2, 1, 2])
    sims = torch.randn(6, 10)
    for index, value in spoil:
        sims[index] = value
    for fn in (retrieval_metrics, retrieval_ranks):
        with pytest.raises(NonFiniteScoresError) as err:
            fn(sims, img2txt, txt2img)
        assert isinstance(err.value, ValueError)
        message = str(err.value)
        assert f"{scores} of 60 scores are non-finite" in message
        assert f"{images} of 6 images have a non-finite score" in message and f"{texts} of 10 texts" in message
        assert "diverged" in message and "NaN/inf" in message
