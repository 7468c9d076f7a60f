"""retrieval_metrics against a plain per-query loop with X-VLM's itm_eval logic and a stable tie rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.metrics import METRIC_KEYS, chance_metrics, retrieval_metrics


def loop_reference(sims: np.ndarray, img2txt: list[list[int]], txt2img: list[int]) -> dict[str, float]:
    """X-VLM's itm_eval, one query at a time, with ties broken by candidate index (stable descending sort)."""
    ranks_i2t = np.zeros(sims.shape[0])
    for i, row in enumerate(sims):
        order = np.argsort(-row, kind="stable")
        ranks_i2t[i] = min(np.where(order == c)[0][0] for c in img2txt[i])
    ranks_t2i = np.zeros(sims.shape[1])
    for c, column in enumerate(sims.T):
        order = np.argsort(-column, kind="stable")
        ranks_t2i[c] = np.where(order == txt2img[c])[0][0]
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
    from utils.metrics import retrieval_ranks

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
