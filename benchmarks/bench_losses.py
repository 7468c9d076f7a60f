"""Speed of FISVL's losses against the per-sample Python loops of the published code, side by side.

The published code builds the affiliation centres and picks the scene loss's hard negatives with a Python
loop over the batch. ``models/losses.py`` does both with matrix operations. This script times forward +
backward of each at the paper's global batch (256 pairs, 512-d, RSITMD-like labels) and checks that the
two give the same loss.

    python benchmarks/bench_losses.py [--batch 256] [--device cpu] [--repeats 20]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.losses import SOFT_TARGET_EPS, affiliation_loss, scene_adaptive_loss  # noqa: E402

TEMP, ALPHA_M, BETA1, BETA2, EPOCH = 0.07, 2.0, -0.0015, 0.02, 5


def affiliation_loop(v: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Centres row by row, as the published loop builds them; then the published two terms."""
    n = len(labels)
    text_centres, image_centres = [], []
    for i in range(n):
        weights = (labels == labels[i]).to(v.dtype) + SOFT_TARGET_EPS
        text_centres.append((weights[:, None] * t).sum(0) / weights.sum())
        image_centres.append((weights[:, None] * v).sum(0) / weights.sum())
    ct, cv = torch.stack(text_centres), torch.stack(image_centres)
    targets = torch.arange(n)
    return (F.cross_entropy(v @ ct.T / TEMP, targets) + F.cross_entropy(cv @ t.T / TEMP, targets)) / 2


def scene_loop(v: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard negatives picked row by row and the thresholded softmax per anchor, as the published code."""
    n = len(labels)
    with torch.no_grad():
        sims = v @ t.T
    hard_text = [int(sims[b].argmax()) for b in range(n)]
    hard_image = [int(sims[:, b].argmax()) for b in range(n)]
    intra, inter = int(math.exp(BETA2 * EPOCH)), int(math.exp(BETA1 * EPOCH))
    total = 0.0
    for feat, hard in ((t, hard_text), (v, hard_image)):
        hard_feat = torch.stack([feat[h] for h in hard])
        per_anchor = []
        for a in range(n):
            logits = hard_feat @ feat[a] / TEMP
            kept = torch.where(logits >= ALPHA_M, logits, torch.zeros_like(logits))
            probs = torch.exp(kept) / (torch.exp(kept).sum() + SOFT_TARGET_EPS)
            weights = torch.tensor([intra if labels[a] == labels[h] else inter for h in hard], dtype=v.dtype)
            per_anchor.append((probs * weights).sum())
        total = total + torch.stack(per_anchor).mean()
    return total / 2


def timed(fn, features: tuple[torch.Tensor, torch.Tensor], repeats: int) -> tuple[float, float]:
    """Median seconds of forward + backward, and the loss value."""
    times, value = [], 0.0
    for _ in range(repeats):
        v, t = (f.detach().clone().requires_grad_() for f in features)
        start = time.perf_counter()
        loss = fn(v, t)
        loss.backward()
        if v.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        value = loss.item()
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(args.batch, 512, generator=generator), dim=-1).to(args.device)
    t = F.normalize(v.cpu() + 0.8 * torch.randn(args.batch, 512, generator=generator), dim=-1).to(args.device)
    labels = torch.randint(0, 32, (args.batch,), generator=generator).to(args.device)
    image_ids = torch.arange(args.batch, device=args.device)
    pairs = {
        "affiliation loss": (lambda a, b: affiliation_loop(a, b, labels),
                             lambda a, b: affiliation_loss(a, b, labels, TEMP)),
        "scene-adaptive loss": (lambda a, b: scene_loop(a, b, labels),
                                lambda a, b: scene_adaptive_loss(a, b, image_ids, labels, TEMP, EPOCH, ALPHA_M,
                                                                 BETA1, BETA2)),
    }
    print(f"forward + backward, batch {args.batch} x 512, on {args.device}, median of {args.repeats}:")
    for name, (loop, vectorised) in pairs.items():
        loop_s, loop_value = timed(loop, (v, t), max(3, args.repeats // 5))
        vec_s, vec_value = timed(vectorised, (v, t), args.repeats)
        assert math.isclose(loop_value, vec_value, rel_tol=1e-4), (name, loop_value, vec_value)
        print(f"  {name:<20} per-sample loop {loop_s * 1e3:8.1f} ms   vectorised {vec_s * 1e3:7.2f} ms   "
              f"x{loop_s / vec_s:6.1f} faster   (loss {vec_value:.5f} both)")


if __name__ == "__main__":
    main()
