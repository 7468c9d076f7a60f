"""Repeated trainings (AMFMN and SIRS report the mean over several runs): one folder and seed per run, which
runs already finished, and the mean and sample standard deviation of what each run recorded in its
``log.txt``. Imports no torch, so the launcher can plan the runs before torch starts."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from utils.protocol import entry_names

SPLITS = ("test", "val")


@dataclass(frozen=True)
class RepeatRun:
    """One run of a repeated training: its folder, its seed, and how ``--resume`` treats it."""

    folder: Path
    seed: int
    finished: bool  # its log.txt has the closing line: --resume skips it
    resume: str | None  # "latest" to continue its checkpoint_last.pth, None to start it


def _records(folder: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``folder/log.txt`` (legacy_log_footer's ``best epoch: N`` is not JSON), or none."""
    path = folder / "log.txt"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("{")]


def closing_record(folder: Path) -> dict[str, Any] | None:
    """The closing line of ``folder/log.txt``, written once the last epoch finished, or None."""
    records = _records(folder)
    return records[-1] if records and "best_epoch" in records[-1] else None


def plan_repeats(output_dir: Path, seed: int, repeats: int, resume: bool) -> list[RepeatRun]:
    """Runs ``output_dir/run_<k>`` with seeds ``seed + k``. With ``resume``, a finished run is skipped, an
    unfinished one continues its ``checkpoint_last.pth``, and one that never finished an epoch starts again."""
    runs = []
    for index in range(repeats):
        folder = output_dir / f"run_{index}"
        finished = resume and closing_record(folder) is not None
        resume_from = "latest" if resume and (folder / "checkpoint_last.pth").is_file() else None
        runs.append(RepeatRun(folder, seed + index, finished, resume_from))
    return runs


def run_results(folder: Path) -> dict[str, Any]:
    """The test and val recalls (and ``r_mean``) of a finished run's selected checkpoint, as its log.txt
    recorded them, and the paper protocol's mean of its last epochs on test when the run computed it."""
    closing = closing_record(folder)
    if closing is None or "test_at_best" not in closing:
        raise ValueError(f"{folder / 'log.txt'} has no closing line with test_at_best: the run did not finish")
    test = closing["test_at_best"]
    best = next(record for record in _records(folder) if record.get("epoch") == closing["best_epoch"])
    return {"best_epoch": closing["best_epoch"], "selected_on": closing["selected_on"], "test": test,
            "val": {key: best[f"val_{key}"] for key in test}, **{name: closing[name] for name in entry_names(closing)}}


def summarise(runs: list[RepeatRun]) -> dict[str, Any]:
    """Every run's results, and their mean and sample standard deviation (n - 1; None for one run): of the
    selected checkpoints' test and val scores, and of the paper protocol's entry when every run has it."""
    results = [{"run": run.folder.name, "seed": run.seed, **run_results(run.folder)} for run in runs]
    entries = [*SPLITS, *(name for name in entry_names(results[0]) if all(name in result for result in results))]

    def over_runs(entry: str, reduce: Callable[[list[float]], float]) -> dict[str, float]:
        return {key: reduce([result[entry][key] for result in results]) for key in results[0][entry]}

    return {"repeats": len(runs), "runs": results,
            "mean": {entry: over_runs(entry, statistics.fmean) for entry in entries},
            "std": {entry: over_runs(entry, statistics.stdev) for entry in entries} if len(runs) > 1 else None}
