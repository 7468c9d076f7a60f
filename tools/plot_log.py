"""Training curves of one or several runs side by side, from their ``log.txt``: every loss term, the learning
rate, and val / test mR per epoch, stage switches marked.

    python tools/plot_log.py output/rsitmd output/rsitmd_clip --out curves.png

Each argument is a run folder or a ``log.txt``; a column is drawn per run, named by its folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.figures import plot_training_curves, read_log  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or log.txt files")
    parser.add_argument("--out", default="training_curves.png", help="PNG to write")
    args = parser.parse_args(argv)
    logs = [Path(run) / "log.txt" if Path(run).is_dir() else Path(run) for run in args.runs]
    runs = {}
    for path in logs:
        records = read_log(path)
        if not records:
            parser.error(f"{path} has no epoch records")
        name = path.parent.name or str(path.parent)
        runs[name if name not in runs else str(path.parent)] = records
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_training_curves(runs, out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
