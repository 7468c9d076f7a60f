"""Command-line options shared by the launcher (run.py) and the worker (Retrieval.py). Imports no torch,
so the launcher can still set CUDA_VISIBLE_DEVICES before torch starts."""
from __future__ import annotations

import argparse


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options the launcher forwards to the worker unchanged."""
    parser.add_argument("--checkpoint", default="-1", help="weights to start from or to evaluate; -1 = none")
    parser.add_argument("--evaluate", action="store_true", help="evaluate only (the --split split)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="split for --evaluate")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue a run: 'latest' (output_dir/checkpoint_last.pth) or a checkpoint path")
    parser.add_argument("--bs", type=int, default=-1, help="if > 0, the global train batch (split over processes)")
    parser.add_argument("--seed", type=int, default=42, help="seed; each process uses seed + rank")
