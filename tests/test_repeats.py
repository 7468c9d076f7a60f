"""``run.py --repeats N``: N complete runs with consecutive seeds, their summary, and a resume that skips the
finished runs; through the real command line on the tiny demo data, one epoch per run."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run
from conftest import without_timing
from utils.repeats import plan_repeats

ROOT = Path(__file__).resolve().parents[1]


def run_py(config: Path, output_dir: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "run.py"), "--config", str(config), "--output_dir", str(output_dir),
               "--dist", "cpu", *args, "schedular.epochs=1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def log_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]


def records_without_timing(records: list[dict]) -> list[dict]:
    return [without_timing(record) for record in records]


@pytest.fixture(scope="module")
def repeated(tiny_config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("repeats") / "two"
    result = run_py(tiny_config_path, out, "--repeats", "2", "--seed", "7")
    return out, result.stdout + result.stderr


def test_two_runs_and_their_summary(repeated: tuple[Path, str]) -> None:
    out, output = repeated
    assert sorted(p.name for p in out.iterdir()) == ["run_0", "run_1", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["repeats"] == 2 and [r["seed"] for r in summary["runs"]] == [7, 8]
    recorded = {"test": [], "val": []}
    for k, result in enumerate(summary["runs"]):
        records = log_records(out / f"run_{k}")
        closing = records[-1]
        best = next(record for record in records if record.get("epoch") == closing["best_epoch"])
        assert result["run"] == f"run_{k}" and result["best_epoch"] == closing["best_epoch"]
        assert result["test"] == closing["test_at_best"]
        assert result["val"] == {key: best[f"val_{key}"] for key in closing["test_at_best"]}
        recorded["test"].append(result["test"])
        recorded["val"].append(result["val"])
    for split, runs in recorded.items():
        for key in runs[0]:
            values = [r[key] for r in runs]
            assert summary["mean"][split][key] == statistics.fmean(values)
            assert summary["std"][split][key] == statistics.stdev(values)
    assert "test mean" in output and "val std" in output


def test_runs_differ_by_seed(repeated: tuple[Path, str]) -> None:
    out, _ = repeated
    first, second = (torch.load(out / f"run_{k}" / "checkpoint_last.pth", weights_only=True) for k in (0, 1))
    assert first["model"].keys() == second["model"].keys()
    assert any(not torch.equal(first["model"][name], second["model"][name]) for name in first["model"])


def test_resume_finishes_only_the_unfinished_run(repeated: tuple[Path, str], tiny_config_path: Path,
                                                 tmp_path: Path) -> None:
    """The first run finished, the second never started: --resume skips the first and trains the second,
    which equals the uninterrupted repeat's."""
    out, _ = repeated
    shutil.copytree(out / "run_0", tmp_path / "run_0")
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "run_0").rglob("*") if p.is_file()}
    result = run_py(tiny_config_path, tmp_path, "--repeats", "2", "--seed", "7", "--resume")
    assert "run_0 finished earlier (seed 7): skipped" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert records_without_timing(log_records(tmp_path / "run_1")) == records_without_timing(log_records(out / "run_1"))
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads((out / "summary.json").read_text())


def test_one_explicit_repeat_under_torchrun(tiny_config_path: Path, tmp_path: Path) -> None:
    """--repeats 1 still uses run_0/ and writes a summary (no standard deviation); two processes."""
    run_py(tiny_config_path, tmp_path, "--repeats", "1", "--nproc_per_node", "2", "--bs", "32",
           env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["repeats"] == 1 and summary["std"] is None
    assert summary["mean"]["test"] == log_records(tmp_path / "run_0")[-1]["test_at_best"]
    assert "global batch 32" in (tmp_path / "run_0" / "run.log").read_text()


def test_plan_resumes_a_run_with_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "run_0").mkdir()
    (tmp_path / "run_0" / "checkpoint_last.pth").write_bytes(b"")
    (tmp_path / "run_0" / "log.txt").write_text('{"epoch": 0}\n')
    plan = plan_repeats(tmp_path, 42, 2, resume=True)
    assert [(p.folder.name, p.seed, p.finished, p.resume) for p in plan] == [("run_0", 42, False, "latest"),
                                                                              ("run_1", 43, False, None)]
    assert [p.resume for p in plan_repeats(tmp_path, 42, 2, resume=False)] == [None, None]


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "--repeats is a number of runs >= 1, got 0"),
    (["--repeats", "-2"], "--repeats is a number of runs >= 1, got -2"),
    (["--repeats", "2", "--evaluate"], "cannot be combined with --evaluate"),
    (["--repeats", "2", "--resume", "x.pth"], "it takes no checkpoint path"),
])
def test_invalid_repeats_are_refused(args: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=message):
        run.main(["--output_dir", str(tmp_path / "never"), "--dist", "cpu", *args])
    assert not (tmp_path / "never").exists()
