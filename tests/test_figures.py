"""The figures of a run: recall@K from the ranks the metrics use, log records and stage switches, and the PNGs
that training, --evaluate and tools/plot_log.py write."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import Retrieval
from utils.figures import read_log, recall_at_k, sample_queries, stage_switches
from utils.metrics import retrieval_metrics, retrieval_ranks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import plot_log  # noqa: E402

SPLIT_FIGURES = ("test_recall_at_k.png", "test_text_to_image.png", "test_image_to_text.png")


def test_recall_at_k_agrees_with_the_metrics() -> None:
    torch.manual_seed(0)
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(30)]
    txt2img = [i for i in range(30) for _ in range(5)]
    sims = torch.randn(30, 150)
    metrics = retrieval_metrics(sims, img2txt, txt2img)
    i2t, t2i = retrieval_ranks(sims, img2txt, txt2img)
    txt, img = recall_at_k(i2t, 50), recall_at_k(t2i, 50)
    for k in (1, 5, 10):
        assert txt[k - 1] == pytest.approx(metrics[f"txt_r{k}"]) and img[k - 1] == pytest.approx(metrics[f"img_r{k}"])
    assert txt[-1] <= 100 and (txt[1:] >= txt[:-1]).all() and recall_at_k(torch.zeros(4, dtype=torch.long), 3)[0] == 100


def test_read_log_keeps_the_epoch_records_and_names_a_bad_line(tmp_path: Path) -> None:
    records = [{"epoch": 0, "stage": 0, "train_loss_contr": "1.2"}, {"epoch": 1, "stage": 1}, {"epoch": 2, "stage": 1}]
    log = tmp_path / "log.txt"
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + json.dumps({"best_epoch": 2}) + "\nbest epoch: 2\n")
    assert read_log(log) == records
    assert stage_switches(records) == [1]
    log.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"log.txt, line 2: not a JSON record"):
        read_log(log)


def test_the_query_sample_is_fixed_and_spread() -> None:
    assert sample_queries(4, 100) == [0, 33, 66, 99]
    assert sample_queries(6, 3) == [0, 1, 2]


def is_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_training_evaluation_and_plot_log_write_figures(tiny_config_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Retrieval.main(["--config", str(tiny_config_path), "--output_dir", str(run), "--device", "cpu",
                    "schedular.epochs=2"])
    for name in ("training_curves.png", *SPLIT_FIGURES):
        is_png(run / "figures" / name)

    evaluated = tmp_path / "eval"
    Retrieval.main(["--config", str(tiny_config_path), "--output_dir", str(evaluated), "--device", "cpu",
                    "--evaluate", "--checkpoint", str(run / "checkpoint_best.pth")])
    assert sorted(p.name for p in (evaluated / "figures").iterdir()) == sorted(SPLIT_FIGURES)

    one = plot_log.main([str(run), "--out", str(tmp_path / "one.png")])
    two = plot_log.main([str(run), str(run / "log.txt"), "--out", str(tmp_path / "two.png")])
    assert is_png(two)[0] > 1.5 * is_png(one)[0]  # a column per run

    quiet = tmp_path / "quiet"
    Retrieval.main(["--config", str(tiny_config_path), "--output_dir", str(quiet), "--device", "cpu",
                    "--evaluate", "--checkpoint", str(run / "checkpoint_best.pth"), "figures=false"])
    assert not (quiet / "figures").exists()
