"""Command-line options shared by the launcher (run.py) and the worker (Retrieval.py). Imports no torch,
so the launcher can still set CUDA_VISIBLE_DEVICES before torch starts."""
from __future__ import annotations

import argparse
import os


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options the launcher forwards to the worker unchanged."""
    parser.add_argument("--checkpoint", default="-1", help="weights to start from or to evaluate; -1 = none")
    parser.add_argument("--evaluate", action="store_true",
                        help="evaluate only (the --split split): the --checkpoint, or without one the pretrained "
                             "weights the config names (zero-shot)")
    parser.add_argument("--allow_random_eval", action="store_true",
                        help="with --evaluate and no --checkpoint: evaluate even though some parts of the model "
                             "would be randomly initialised (a chance-level check)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="split for --evaluate")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue a run: 'latest' (output_dir/checkpoint_last.pth) or a checkpoint path")
    parser.add_argument("--bs", type=int, default=-1, help="if > 0, the global train batch (split over processes)")
    parser.add_argument("--seed", type=int, default=42, help="seed; each process uses seed + rank")


def parse_run_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then give back to the overrides a ``KEY=VALUE`` that ``--resume``'s optional value swallowed:
    ``--resume optimizer.lr=1e-4`` means "resume the latest checkpoint, with this override"."""
    args = parser.parse_args(argv)
    if args.resume is not None and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides = [args.resume, *args.overrides]
        args.resume = "latest"
    return args
