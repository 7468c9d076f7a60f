"""Figures of a run (PNG, written atomically): training curves from ``log.txt`` records, recall@K curves, and
qualitative retrieval sheets (top images per caption, top captions per image).

Plain matplotlib ``Figure`` objects (no pyplot state), so drawing is safe in any process. Images are read by
a function the caller passes, so the same sheets work for any image decoding.
"""
from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from .checkpoint import write_bytes_atomic

RIGHT, WRONG = "#2ca02c", "#d62728"
SPLIT_STYLE = {"val": "#dd8452", "test": "#55a868"}
THUMBNAIL = 160


def save_figure(figure: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    write_bytes_atomic(buffer.getvalue(), path)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The epoch records of a ``log.txt`` (the JSON lines with an ``epoch``); the closing summary line and the
    legacy ``best epoch: N`` footer are left out. A line that is neither is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no log.txt at {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("best epoch:"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not a JSON record ({err})") from err
        if isinstance(record, dict) and "epoch" in record:
            records.append(record)
    return records


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the records that have ``key`` (train values are logged as strings)."""
    pairs = [(r["epoch"], float(r[key])) for r in records if key in r]
    return [e for e, _ in pairs], [v for _, v in pairs]


def stage_switches(records: Sequence[dict[str, Any]]) -> list[int]:
    """The epochs whose record has another ``stage`` than the record before."""
    return [b["epoch"] for a, b in zip(records, records[1:]) if a.get("stage") != b.get("stage")]


def plot_training_curves(runs: dict[str, Sequence[dict[str, Any]]], path: Path) -> None:
    """One column per run: every loss term, the learning rate, and val / test mR per epoch; each stage switch
    (a change of the record's ``stage``) is a dashed vertical line in every panel."""
    figure = Figure(figsize=(5.2 * len(runs), 8.4), layout="constrained")
    axes = figure.subplots(3, len(runs), squeeze=False, sharex="col")
    for column, (name, records) in enumerate(runs.items()):
        losses, lr, recall = axes[:, column]
        for key in sorted({k for r in records for k in r if k.startswith("train_loss_")}):
            losses.plot(*_series(records, key), marker=".", label=key.removeprefix("train_"))
        lr.plot(*_series(records, "train_lr"), marker=".", color="#555555")
        for split, colour in SPLIT_STYLE.items():
            epochs, values = _series(records, f"{split}_r_mean")
            if epochs:
                recall.plot(epochs, values, marker=".", color=colour, label=f"{split} mR")
        switches = stage_switches(records)
        for ax in (losses, lr, recall):
            for epoch in switches:
                ax.axvline(epoch - 0.5, linestyle="--", color="#888888", linewidth=1)
        losses.set_title(name)
        losses.set_ylabel("loss")
        lr.set_ylabel("learning rate")
        recall.set_ylabel("mR (%)")
        recall.set_xlabel("epoch" + (" (dashed: stage switch)" if switches else ""))
        for ax in (losses, recall):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    save_figure(figure, path)


def recall_at_k(ranks: torch.Tensor, max_k: int) -> np.ndarray:
    """``[max_k]`` recalls in % for K = 1..max_k from 0-based ranks (one histogram, then a cumulative sum)."""
    counts = torch.bincount(ranks.clamp(max=max_k).cpu(), minlength=max_k + 1)[:max_k]
    return 100.0 * counts.cumsum(0).double().numpy() / max(len(ranks), 1)


def plot_recall_curves(i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor, path: Path, max_k: int = 50,
                       title: str = "") -> None:
    """Recall@K for K = 1..max_k, image -> text and text -> image."""
    ks = np.arange(1, max_k + 1)
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(ks, recall_at_k(i2t_ranks, max_k), label="image -> text")
    axes.plot(ks, recall_at_k(t2i_ranks, max_k), label="text -> image")
    axes.set(xlabel="K", ylabel="recall@K (%)", ylim=(0, 100), xlim=(1, max_k), title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    save_figure(figure, path)


def sample_queries(count: int, total: int) -> list[int]:
    """A fixed, evenly spread sample of ``count`` indices out of ``total`` (the same in every run)."""
    return sorted(set(np.linspace(0, total - 1, min(count, total)).round().astype(int).tolist()))


def _thumbnail(load_image: Callable[[str], Image.Image], path: str) -> Image.Image:
    image = load_image(path).convert("RGB")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return image


def plot_text_to_image(sims: torch.Tensor, texts: Sequence[str], image_paths: Sequence[str],
                       txt2img: Sequence[int], load_image: Callable[[str], Image.Image], path: Path,
                       queries: int = 6, top: int = 5) -> None:
    """A row per sampled caption: the caption and its ``top`` images, the ground truth framed in green."""
    rows = sample_queries(queries, len(texts))
    best = sims[:, rows].topk(min(top, sims.shape[0]), dim=0).indices.t().tolist()  # [len(rows), top]
    figure = Figure(figsize=(2.0 * (top + 1.6), 2.1 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), top + 1, squeeze=False,
                           gridspec_kw={"width_ratios": [1.6] + [1] * top})
    for row, (caption, images) in enumerate(zip(rows, best)):
        axes[row, 0].text(0, 0.5, textwrap.fill(texts[caption], 28), va="center", fontsize=9)
        axes[row, 0].axis("off")
        for column, image in enumerate(images, 1):
            ax = axes[row, column]
            ax.imshow(_thumbnail(load_image, image_paths[image]))
            ax.set_xticks([])
            ax.set_yticks([])
            right = image == txt2img[caption]
            for spine in ax.spines.values():
                spine.set(color=RIGHT if right else "#bbbbbb", linewidth=4 if right else 1)
            ax.set_title(f"#{column}  {sims[image, caption].item():.3f}", fontsize=8)
    figure.suptitle("text -> image: top images per caption (ground truth framed green)", fontsize=10)
    save_figure(figure, path)


def plot_image_to_text(sims: torch.Tensor, texts: Sequence[str], image_paths: Sequence[str],
                       img2txt: Sequence[Sequence[int]], load_image: Callable[[str], Image.Image], path: Path,
                       queries: int = 6, top: int = 5) -> None:
    """A row per sampled image: the image and its ``top`` captions, correct ones green and ticked."""
    rows = sample_queries(queries, len(image_paths))
    best = sims[rows].topk(min(top, sims.shape[1]), dim=1).indices.tolist()
    figure = Figure(figsize=(10, 2.1 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), 2, squeeze=False, gridspec_kw={"width_ratios": [1, 4]})
    for row, (image, captions) in enumerate(zip(rows, best)):
        axes[row, 0].imshow(_thumbnail(load_image, image_paths[image]))
        axes[row, 0].axis("off")
        text_ax = axes[row, 1]
        text_ax.axis("off")
        text_ax.add_patch(Rectangle((0, 0), 1, 1, fill=False, edgecolor="#dddddd", transform=text_ax.transAxes))
        for line, caption in enumerate(captions):
            right = caption in img2txt[image]
            text_ax.text(0.01, 0.9 - line * 0.19, f"{'✓' if right else '✗'} {sims[image, caption].item():.3f}  "
                         f"{textwrap.shorten(texts[caption], 95)}", color=RIGHT if right else WRONG,
                         fontsize=8.5, va="center", transform=text_ax.transAxes)
    figure.suptitle("image -> text: top captions per image (correct ones green)", fontsize=10)
    save_figure(figure, path)
