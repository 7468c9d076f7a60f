"""GaLR's multivariate re-rank against its published per-query loops, the two-matrix recalls, and the
``rerank`` evaluation option on a tiny model."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset import create_eval_split
from models import build_model
from models.evaluation import check_rerank, embed_split, evaluate_split
from models.inference import similarity_matrix
from utils.config import ConfigError, load_config
from utils.metrics import METRIC_KEYS, NonFiniteScoresError, retrieval_metrics
from utils.rerank import multivariate_rerank


def published_i2t_rerank_optim(sim: np.ndarray, K1: int, Wp1: float, Wp2: float) -> np.ndarray:
    """GaLR ``postprocessing/rerank.py: i2t_rerank_optim`` as published, loops included, except: K1 is capped at
    the number of candidates (published: IndexError) and every argsort is stable (published: numpy's default,
    which breaks ties arbitrarily)."""
    K1 = min(max(10, K1), sim.shape[1])
    size_i = sim.shape[0]
    sort_i2t = np.argsort(-sim, 1, kind="stable")
    sort_t2i = np.argsort(-sim, 0, kind="stable")
    new_sims = np.zeros_like(sim, dtype=np.float32)
    sort_i2t_re = np.copy(sort_i2t)[:, :K1]
    address = np.array([])
    for i in range(size_i):
        for j in range(K1):
            all_prob = np.sum(sim[:, sort_i2t[i][j]])
            p1 = sim[i][sort_i2t[i][j]] / all_prob
            new_sims[i][sort_i2t[i][j]] = Wp1 * p1
            p2 = np.exp(-0.05 * (j + 1))
            new_sims[i][sort_i2t[i][j]] += p2
            result_t = sort_i2t[i][j]
            query = sort_t2i[:, result_t]
            tmp = np.where(query == i)[0][0]
            address = np.append(address, tmp)
        sort = np.argsort(address, kind="stable")
        address = np.array([])
        rank = sort_i2t_re[i][sort]
        for idx, tmp in enumerate(rank):
            p3 = np.exp(-0.05 * (float(idx) + 1))
            new_sims[i][tmp] += Wp2 * p3
    return new_sims


def published_t2i_rerank_optim(sim: np.ndarray, K1: int, Wp1: float, Wp2: float) -> np.ndarray:
    return np.transpose(published_i2t_rerank_optim(np.transpose(sim), K1, Wp1, Wp2))


def published_recalls(i2t_sims: np.ndarray, t2i_sims: np.ndarray) -> dict[str, float]:
    """GaLR's ``acc_i2t2_train`` / ``acc_t2i2_train`` (5 consecutive captions per image) with a stable
    descending sort instead of a reversed ascending one."""
    n_img = i2t_sims.shape[0]
    ranks_i2t = np.zeros(n_img)
    for index in range(n_img):
        inds = np.argsort(-i2t_sims[index], kind="stable")
        ranks_i2t[index] = min(np.where(inds == i)[0][0] for i in range(5 * index, 5 * index + 5))
    ranks_t2i = np.zeros(5 * n_img)
    columns = t2i_sims.T
    for index in range(n_img):
        for i in range(5):
            inds = np.argsort(-columns[5 * index + i], kind="stable")
            ranks_t2i[5 * index + i] = np.where(inds == index)[0][0]
    out = {f"txt_r{k}": 100.0 * np.mean(ranks_i2t < k) for k in (1, 5, 10)}
    out.update({f"img_r{k}": 100.0 * np.mean(ranks_t2i < k) for k in (1, 5, 10)})
    out["r_mean"] = np.mean([out[k] for k in METRIC_KEYS[:-1]])
    return out


def assert_matches_published(scores: torch.Tensor, k: int, wp1: float = 0.3, wp2: float = 1.1) -> None:
    i2t, t2i = multivariate_rerank(scores, k, wp1, wp2)
    sim = scores.double().numpy()
    assert i2t.shape == t2i.shape == scores.shape and i2t.dtype == scores.dtype
    np.testing.assert_allclose(i2t.numpy(), published_i2t_rerank_optim(sim, k, wp1, wp2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t2i.numpy(), published_t2i_rerank_optim(sim, k, wp1, wp2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_img, n_txt, k", [
    (20, 100, 30),   # t2i: 20 images < K1 = 30 candidates
    (40, 200, 30),
    (7, 35, 5),      # K1 = max(10, 5); t2i has 7 candidates
    (3, 4, 50),      # k above both sides
    (12, 60, 1),
])
def test_matches_the_published_loops(n_img: int, n_txt: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n_img * 1000 + n_txt + k)
    assert_matches_published(torch.rand(n_img, n_txt, generator=gen), k)


def test_matches_the_published_loops_with_signed_scores_and_other_weights() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(30, 150, generator=gen, dtype=torch.float64) + 0.5
    assert_matches_published(scores, 25, wp1=1.0, wp2=0.7)


def test_ties_follow_the_stable_rule() -> None:
    """Duplicated captions and coarse scores: every sort's ties go to the lower index, as in utils.metrics."""
    gen = torch.Generator().manual_seed(2)
    scores = torch.randint(1, 5, (15, 75), generator=gen).double() / 4
    scores[:, 10:20] = scores[:, 0:10]
    assert_matches_published(scores, 30)


def test_keeps_the_scores_device() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    scores = torch.rand(50, 250, generator=torch.Generator().manual_seed(3))
    on_gpu = multivariate_rerank(scores.cuda())
    assert all(t.is_cuda for t in on_gpu)
    for got, want in zip(on_gpu, multivariate_rerank(scores)):
        torch.testing.assert_close(got.cpu(), want)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        multivariate_rerank(torch.rand(4, 20), k=0)
    with pytest.raises(ValueError, match=r"\[n_images, n_texts\]"):
        multivariate_rerank(torch.rand(20))
    with pytest.raises(NonFiniteScoresError):
        multivariate_rerank(torch.tensor([[1.0, float("nan")], [0.5, 0.2]]))
    with pytest.raises(ValueError, match="sum to 0"):
        multivariate_rerank(torch.tensor([[1.0, 0.5], [-1.0, 0.2]]))


def test_recalls_from_two_matrices() -> None:
    """i2t recalls from ``sims``, t2i recalls from ``t2i_sims``; one matrix given twice is today's result."""
    gen = torch.Generator().manual_seed(4)
    a, b = torch.rand(10, 50, generator=gen), torch.rand(10, 50, generator=gen)
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(10)]
    txt2img = [c // 5 for c in range(50)]
    alone_a, alone_b = retrieval_metrics(a, img2txt, txt2img), retrieval_metrics(b, img2txt, txt2img)
    assert retrieval_metrics(a, img2txt, txt2img, t2i_sims=a) == alone_a
    both = retrieval_metrics(a, img2txt, txt2img, t2i_sims=b)
    assert {k: both[k] for k in ("txt_r1", "txt_r5", "txt_r10")} == {k: alone_a[k] for k in ("txt_r1", "txt_r5", "txt_r10")}
    assert {k: both[k] for k in ("img_r1", "img_r5", "img_r10")} == {k: alone_b[k] for k in ("img_r1", "img_r5", "img_r10")}
    with pytest.raises(ValueError, match="t2i_sims must have the shape"):
        retrieval_metrics(a, img2txt, txt2img, t2i_sims=b[:, :40])


@pytest.fixture(scope="module")
def tiny_model_and_split(tiny_config_path: Path) -> tuple:
    config = load_config(tiny_config_path)
    torch.manual_seed(0)
    model = build_model(config, pretrained=False).eval()
    split = create_eval_split(config, "test", torch.device("cpu"), model.eval_transform)
    image_emb, text_emb = embed_split(model, split, config, torch.device("cpu"))
    return config, model, split, similarity_matrix(model, image_emb, text_emb)


@pytest.mark.parametrize("k, wp1, wp2", [(30, 0.3, 1.1), (12, 1.0, 0.7)])
def test_evaluation_with_mr_gives_the_published_recalls(tiny_model_and_split: tuple, k: int, wp1: float,
                                                        wp2: float, caplog: pytest.LogCaptureFixture) -> None:
    config, model, split, sims = tiny_model_and_split
    assert split.annotations.txt2img == [c // 5 for c in range(5 * len(split.annotations.img2txt))]
    options = {**config, "rerank": "galr_mr", "rerank_k": k, "rerank_wp1": wp1, "rerank_wp2": wp2}
    with caplog.at_level(logging.INFO):
        got = evaluate_split(model, split, options, torch.device("cpu"))
    sim = sims.double().numpy()
    want = published_recalls(published_i2t_rerank_optim(sim, k, wp1, wp2), published_t2i_rerank_optim(sim, k, wp1, wp2))
    assert {key: got[key] for key in METRIC_KEYS} == pytest.approx(want)
    assert "multivariate re-rank (k %d" % k in caplog.text


def test_default_evaluation_is_unchanged(tiny_model_and_split: tuple, caplog: pytest.LogCaptureFixture) -> None:
    config, model, split, sims = tiny_model_and_split
    assert config["rerank"] == "none"
    with caplog.at_level(logging.INFO):
        got = evaluate_split(model, split, config, torch.device("cpu"))
    want = retrieval_metrics(sims, split.annotations.img2txt, split.annotations.txt2img)
    assert {key: got[key] for key in METRIC_KEYS} == want
    assert "re-rank" not in caplog.text


def test_rerank_keys_are_checked(tiny_config_path: Path) -> None:
    config = load_config(tiny_config_path, ["rerank=galr_mr"])
    assert (config["rerank_k"], config["rerank_wp1"], config["rerank_wp2"]) == (30, 0.3, 1.1)
    with pytest.raises(ConfigError, match="'rerank'.*not one of"):
        load_config(tiny_config_path, ["rerank=mr"])
    with pytest.raises(ConfigError, match=r"tiny.yaml: key 'rerank_k'"):
        check_rerank(load_config(tiny_config_path, ["rerank=galr_mr", "rerank_k=0"]), str(tiny_config_path))
