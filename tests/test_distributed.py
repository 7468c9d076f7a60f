"""2 gloo processes under torchrun give the same losses and gradients as 1 process on the same global batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_gloo_worker

WORKER = Path(__file__).with_name("dist_loss_worker.py")


def assert_same_sums(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Equal up to float32 rounding of sums taken in another order: an element may differ by 1e-6 of the
    tensor's largest magnitude (a wrong factor or a missing term differs by far more)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()), msg=msg)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp("dist")
    return run_gloo_worker(WORKER, folder / "one.pt", 1), run_gloo_worker(WORKER, folder / "two.pt", 2)


@pytest.mark.parametrize("mode", ["stage1 local", "stage1 gathered", "stage2 weighted"])
def test_two_processes_equal_one(results: tuple[dict, dict], mode: str) -> None:
    """Every loss term (contr, affil with per-process centres, scene) and every gradient match, the affiliation
    loss's own temperature included."""
    one, two = results[0][mode], results[1][mode]
    assert set(one) == set(two)
    assert {"loss_contr", "loss_affil", "loss_scene", "model.temp", "objective.losses.affil.temp"} <= set(one)
    for name in one:
        assert_same_sums(two[name], one[name], msg=f"{mode}: {name}")


def test_xvlm_style_gather_scales_gradients_by_world_size(results: tuple[dict, dict]) -> None:
    """Without gradients through the gather (X-VLM's AllGather), DDP's averaging halves the towers' gradients.

    The temperature is not gathered, so each process already sees its full gradient.
    """
    one, two = results[0]["xvlm gather"], results[1]["xvlm gather"]
    assert_same_sums(two["loss"], one["loss"])
    for name in ("model.image.weight", "model.text.weight"):
        assert_same_sums(two[name] * 2, one[name])
    torch.testing.assert_close(two["model.temp"], one["model.temp"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["triplet local", "triplet gathered", "triplet hardest"])
def test_two_processes_equal_one_for_the_triplet_sum(results: tuple[dict, dict], mode: str) -> None:
    """The triplet loss is a sum over the gathered batch (captions of one image sit on both processes): with
    local rows each process returns its part times 2, so the logged mean and DDP's averaged gradients equal
    one process's. The model's temperature, which the triplet loss does not read, gets no gradient."""
    one, two = results[0][mode], results[1][mode]
    assert set(one) == set(two) == {"loss", "loss_triplet", "model.image.weight", "model.image.bias",
                                    "model.text.weight", "model.text.bias"}
    assert one["loss_triplet"] > 0
    for name in one:
        assert_same_sums(two[name], one[name], msg=f"{mode}: {name}")


def test_xvlm_style_gather_divides_the_triplet_gradients_by_world_size(results: tuple[dict, dict]) -> None:
    """PIR's own setting (X-VLM's AllGather, each process the whole sum): the same loss, half the gradients
    on 2 processes; ``gather_with_grad: false`` and ``local_loss: false`` reproduce it."""
    one, two = results[0]["triplet xvlm gather"], results[1]["triplet xvlm gather"]
    assert_same_sums(two["loss_triplet"], one["loss_triplet"])
    for name in ("model.image.weight", "model.text.weight"):
        assert_same_sums(two[name] * 2, one[name])
