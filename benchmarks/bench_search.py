"""Speed and recall of the search index's FAISS choices, side by side, and the indexing throughput of
``tools/search.py index``.

1. For N random vectors of the model's width (512, L2-normalised float32): build time, query latency p50 /
   p95 (single queries, and batches of 100) and recall@10 against exact search, for ``flat`` (exact),
   ``hnsw`` and ``ivf`` built exactly as ``models/search_index.py`` builds them (same parameters). The data
   is clustered (points around ``--centres`` random centres with noise, as embeddings of real imagery are):
   on uniform random vectors every neighbour is nearly as far as any other and approximate recall means
   little.
2. Images/s of ``update_index`` (what ``index`` runs: decoding in DataLoader workers, embedding in batches,
   shards, the FAISS index) over the demo images with the demo CLIP checkpoint on CPU.

    python benchmarks/bench_search.py [--quick] [--sizes 100000 1000000] [--skip hnsw] [--no_indexing]

--quick measures 10k and 100k vectors (a CPU check); the default is 100k and 1M.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.search_index import FAISS_KINDS, build_faiss, tune  # noqa: E402

DIM, TOP = 512, 10
DEMO_ROOT = ROOT / ".cache" / "demo"


def clustered(n: int, centres: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors, each a random centre plus Gaussian noise of norm about ``noise``."""
    rows = centres[rng.integers(0, len(centres), n)]
    rows += rng.standard_normal(rows.shape, dtype=np.float32) * (noise / np.sqrt(DIM))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def latencies(index, queries: np.ndarray, batch: int, repeats: int) -> tuple[float, float]:
    """p50 and p95 in ms of ``index.search`` over ``repeats`` batches of ``batch`` queries."""
    times = []
    for start in range(0, repeats * batch, batch):
        chunk = queries[start % len(queries):][:batch]
        began = time.perf_counter()
        index.search(chunk, TOP)
        times.append(1000 * (time.perf_counter() - began))
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def bench_vectors(n: int, kinds: list[str], args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.centres, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data = np.concatenate([clustered(min(100_000, n - s), centres, args.noise, rng) for s in range(0, n, 100_000)])
    queries = clustered(args.queries, centres, args.noise, rng)
    truth, reference = None, None
    for kind in ["flat", *kinds]:
        began = time.perf_counter()
        index, params = build_faiss(data, kind)
        built = time.perf_counter() - began
        tune(index, kind, params)
        _, found = index.search(queries, TOP)
        if kind == "flat":
            truth = found
        recall = float((found[:, :, None] == truth[:, None, :]).any(axis=2).mean())  # share of the exact top 10 found
        single = latencies(index, queries, 1, args.single)
        batch = latencies(index, queries, 100, args.batches)
        reference = reference or single[0]
        described = ", ".join(f"{k}={v}" for k, v in params.items()) or "exact"
        print(f"| {n:,} | {kind} ({described}) | {built:.1f} s | {single[0]:.2f} / {single[1]:.2f} ms | "
              f"{reference / single[0]:.1f}x | {batch[0]:.1f} / {batch[1]:.1f} ms | {recall:.3f} |", flush=True)
        del index


def bench_indexing(args: argparse.Namespace) -> None:
    """images/s of update_index over the demo images (a demo CLIP with its initial weights: speed does not
    depend on the weights)."""
    import torch

    from dataset.synthetic import DemoSpec, ensure_demo_dataset
    from models import build_model, load_retriever
    from models.objective import build_objective
    from models.search_index import IndexOptions, update_index
    from Retrieval import model_state
    from scheduler import parse_stages
    from utils.config import load_config

    root = ensure_demo_dataset(args.demo_root, DemoSpec()) if args.demo_root == DEMO_ROOT else args.demo_root
    config = load_config(ROOT / "configs" / "demo_clip.yaml", [f"clip_model={ROOT / 'configs' / 'config_clip_demo.json'}"])
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "demo_clip.pth"
        torch.manual_seed(0)
        model = build_model(config, pretrained=False)
        torch.save(model_state(model, build_objective(config, parse_stages(config)), config, 0, 0.0, "val"), checkpoint)
        retriever = load_retriever(checkpoint)
        options = IndexOptions(batch_size=64, workers=args.workers, precision="fp32")
        began = time.perf_counter()
        summary = update_index(Path(folder) / "idx", checkpoint, [str(root / "images")], retriever, options,
                               log=lambda line: None)
        seconds = time.perf_counter() - began
    print(f"| `tools/search.py index` ({summary['embedded']:,} demo images, demo CLIP, batch 64, "
          f"{args.workers} workers, CPU) | {seconds:.1f} s | {summary['embedded'] / seconds:.0f} images/s |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10k and 100k vectors instead of 100k and 1M")
    parser.add_argument("--sizes", type=int, nargs="+", help="numbers of vectors (overrides --quick)")
    parser.add_argument("--skip", nargs="*", default=[], choices=[k for k in FAISS_KINDS if k != "flat"],
                        help="approximate indexes not to build (exact search is the reference, always run)")
    parser.add_argument("--centres", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.8, help="norm of the noise around a unit centre")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall@10")
    parser.add_argument("--single", type=int, default=200, help="single queries timed")
    parser.add_argument("--batches", type=int, default=20, help="batches of 100 queries timed")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the indexing run")
    parser.add_argument("--no_indexing", action="store_true", help="skip the images/s measurement")
    parser.add_argument("--demo_root", type=Path, default=DEMO_ROOT,
                        help="the demo dataset to index (the default one is generated when missing)")
    args = parser.parse_args(argv)
    import faiss

    sizes = args.sizes or ([10_000, 100_000] if args.quick else [100_000, 1_000_000])
    kinds = [k for k in ("hnsw", "ivf") if k not in args.skip]
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; {DIM}-d unit vectors around "
          f"{args.centres} centres, noise {args.noise}; {args.queries} queries for recall@10", flush=True)
    print("| vectors | index | build | single query p50 / p95 | speed-up over exact (p50) | batch of 100 p50 / p95 "
          "| recall@10 |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for n in sizes:
        bench_vectors(n, kinds, args)
    if not args.no_indexing:
        print("\n| indexing | time | throughput |\n|---|---|---|", flush=True)
        bench_indexing(args)


if __name__ == "__main__":
    main()
