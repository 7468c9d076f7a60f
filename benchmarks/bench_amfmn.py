"""Speed of the AMFMN lineage's two pair-wise computations against the released code's way, side by side.

1. Pairwise scoring at evaluation: ``similarity_matrix`` (blocks of 64 images x 1,024 captions, the
   ``[v; t]`` layers of ``fusion_att`` applied as W_v v + W_t t) against AMFMN's ``shard_dis`` structure
   (a Python loop over 128 x 128 shards, each concatenating [v; t] for every pair of the shard, as the
   released ``CrossAttention`` does), at RSITMD's test size (452 images x 2,260 captions), 512-d; both give
   the same scores.
2. Prior text similarity for the adaptive margin: ``prior_text_similarity`` (sparse matrix products) against
   the released per-pair loop (``Rct/generate_t2i_sim_matrix.py``: nltk's ``sentence_bleu`` and the stem
   overlap, pair by pair) on the demo captions (``--images`` images x all their captions); both give the
   same matrix.

    python benchmarks/bench_amfmn.py [--device cpu] [--images 40] [--only scoring|similarity]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset.captions import ENGLISH_STOP_WORDS, word_tokens  # noqa: E402
from dataset.synthetic import DemoSpec, ensure_demo_dataset  # noqa: E402
from dataset.text_similarity import prior_text_similarity  # noqa: E402
from models.amfmn import pairwise_cosine  # noqa: E402
from models.fusion import VisualGuidedText  # noqa: E402


class FusionOnly(torch.nn.Module):
    """The smallest model with AMFMN's pairwise score, so that only the scoring is timed."""

    def __init__(self, dim: int, chunks: tuple[int, int]) -> None:
        super().__init__()
        self.guided_text = VisualGuidedText("fusion_att", dim)
        self.similarity_chunks = chunks

    def similarity(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return pairwise_cosine(v, self.guided_text(v, t))


def released_shards(head: VisualGuidedText, images: torch.Tensor, captions: torch.Tensor, shard: int = 128) -> torch.Tensor:
    """AMFMN's ``shard_dis``: shard by shard, [v; t] built for every pair, both layers applied to it."""
    scores = torch.zeros(images.shape[0], captions.shape[0], device=images.device)
    for i in range(0, images.shape[0], shard):
        for j in range(0, captions.shape[0], shard):
            v, t = images[i:i + shard], captions[j:j + shard]
            joint = torch.cat([v[:, None, :].expand(-1, t.shape[0], -1), t[None, :, :].expand(v.shape[0], -1, -1)], -1)
            guided = head.cross_attention_fc1(joint) * head.cross_attention_fc2(joint)
            expanded = v[:, None, :].expand(-1, t.shape[0], -1)
            scores[i:i + shard, j:j + shard] = ((expanded * guided).sum(-1)
                                                / (expanded.norm(dim=-1) * guided.norm(dim=-1)).clamp(min=1e-8))
    return scores


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall time in ms of ``repeats`` calls after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


@torch.no_grad()
def bench_scoring(device: torch.device) -> None:
    from models.inference import similarity_matrix

    torch.manual_seed(0)
    model = FusionOnly(512, (64, 1024)).to(device).eval()
    images, captions = torch.randn(452, 512, device=device), torch.randn(2260, 512, device=device)
    released_ms, released = timed(lambda: released_shards(model.guided_text, images, captions), 3, device)
    ours_ms, ours = timed(lambda: similarity_matrix(model, images, captions), 3, device)
    assert torch.allclose(ours, released, atol=1e-5), (ours - released).abs().max()
    print(f"pairwise scoring, fusion_att, 452 x 2,260, 512-d ({device}): released shards {released_ms:.0f} ms | "
          f"similarity_matrix {ours_ms:.0f} ms | {released_ms / ours_ms:.1f}x faster, same scores")


def released_prior(image_captions: list[list[str]], captions: list[str]) -> np.ndarray:
    """``Rct/generate_t2i_sim_matrix.py``'s per-pair loop (word_tokenize replaced by the same tokeniser)."""
    from nltk.stem import PorterStemmer
    from nltk.translate.bleu_score import sentence_bleu

    stemmer, stop = PorterStemmer(), list(ENGLISH_STOP_WORDS) + [",", "."]

    def preprocess(text: str) -> tuple[list[str], list[str]]:
        words = [stemmer.stem(word.lower()) for word in word_tokens(text)]
        return words, [word for word in words if word not in stop]

    out = np.zeros((len(image_captions), len(captions)))
    for i, references in enumerate(image_captions):
        visual = [preprocess(text) for text in references]
        for j, caption in enumerate(captions):
            words, content = preprocess(caption)
            bleu = 1.0 if words in [v[0] for v in visual] else sentence_bleu([v[0] for v in visual], words)
            overlap = np.mean([len(set(v[1]) & set(content)) / len(v[1]) for v in visual if v[1]])
            out[i, j] = np.mean([bleu, overlap])
    return out


def bench_similarity(images: int) -> None:
    import json
    import tempfile
    import warnings

    with tempfile.TemporaryDirectory() as folder:
        root = ensure_demo_dataset(Path(folder), DemoSpec(train_per_class=max(1, images // 10), val_per_class=1,
                                                          test_per_class=1, image_size=32))
        entries = json.loads((root / "demo_train.json").read_text())
    groups: dict[str, list[str]] = {}
    for entry in entries:
        groups.setdefault(entry["image"], []).append(entry["caption"])
    image_captions = list(groups.values())[:images]
    captions = [caption for group in image_captions for caption in group]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns for every pair without a 4-gram match
        start = time.perf_counter()
        released = released_prior(image_captions, captions)
        released_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = prior_text_similarity(image_captions, captions)
    ours_s = time.perf_counter() - start
    assert np.allclose(ours, released, atol=1e-5), np.abs(ours - released).max()
    pairs = len(image_captions) * len(captions)
    print(f"prior text similarity, {len(image_captions)} images x {len(captions)} captions ({pairs:,} pairs): "
          f"released per-pair loop {released_s:.2f} s | prior_text_similarity {ours_s * 1000:.0f} ms | "
          f"{released_s / ours_s:.0f}x faster, same matrix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--only", choices=("scoring", "similarity"))
    args = parser.parse_args()
    if args.only in (None, "scoring"):
        bench_scoring(torch.device(args.device))
    if args.only in (None, "similarity"):
        bench_similarity(args.images)


if __name__ == "__main__":
    main()
