"""SIRS's paper protocol (``protocol: mean_of_last_epochs_on_test``) through the real command line on the tiny
demo data: the last N epochs evaluated on test and averaged in a labelled entry, selection on val untouched,
the default protocol's outputs unchanged, the entry averaged over ``--repeats``, and a resume that gives the
same closing line."""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run
from conftest import read_log, without_timing
from utils.config import ConfigError
from utils.metrics import METRIC_KEYS
from utils.protocol import mean_of_last_epochs

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["protocol=mean_of_last_epochs_on_test", "protocol_last_epochs=2", "batch_size_train=80"]
ENTRY, ENTRY_1 = "test_mean_of_last_2_epochs", "test_mean_of_last_1_epochs"
LABEL = "paper protocol (SIRS): mean of the last 2 epochs on test — not a model selection"
# the closing line's keys under the default protocol, as before the paper protocol existed
DEFAULT_CLOSING = {"best_epoch", "selected_on", "val_r_mean_at_best", "test_at_best", "test_at_last",
                   "best_on_test_epoch_for_comparison_only", "test_r_mean_best_on_test"}


def command(config: Path, output_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), "--config", str(config), "--output_dir", str(output_dir),
            "--dist", "cpu", *args]


def run_py(config: Path, output_dir: Path, *args: str) -> str:
    result = subprocess.run(command(config, output_dir, *args), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def paper_repeats(tiny_config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two 3-epoch runs (seeds 42, 43) under the paper protocol with N = 2."""
    out = tmp_path_factory.mktemp("protocol") / "repeats"
    return out, run_py(tiny_config_path, out, "--repeats", "2", *PAPER)


@pytest.fixture(scope="module")
def static_pair(tiny_config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The default and the paper protocol (N = 1) over 2 epochs with test evaluated only when val improves
    (eval_test_every_epoch: false) and a learning rate of 0: val never improves after epoch 0, so only the
    protocol can make epoch 1 evaluate test."""
    folder = tmp_path_factory.mktemp("protocol_static")
    common = ["eval_test_every_epoch=false", "optimizer.lr=0", "schedular.epochs=2", "batch_size_train=80"]
    run_py(tiny_config_path, folder / "default", *common)
    run_py(tiny_config_path, folder / "paper", *common, "protocol=mean_of_last_epochs_on_test",
           "protocol_last_epochs=1")
    return folder / "default", folder / "paper"


def test_the_closing_line_holds_the_mean_of_the_last_epochs_on_test(paper_repeats: tuple[Path, str]) -> None:
    out, _ = paper_repeats
    for run_dir in (out / "run_0", out / "run_1"):
        epochs, closing = read_log(run_dir)
        assert [r["epoch"] for r in epochs] == [0, 1, 2]
        assert closing["protocol"] == "mean_of_last_epochs_on_test" and closing["protocol_epochs"] == [1, 2]
        assert closing[ENTRY] == {k: statistics.fmean(r[f"test_{k}"] for r in epochs[1:]) for k in METRIC_KEYS}
        assert closing[ENTRY] != {k: epochs[2][f"test_{k}"] for k in METRIC_KEYS}  # not just the last epoch
        # selection is still on val
        best = max(epochs, key=lambda r: r["val_r_mean"])
        assert closing["selected_on"] == "val" and closing["best_epoch"] == best["epoch"]
        assert set(closing) == DEFAULT_CLOSING | {"protocol", "protocol_epochs", ENTRY}
        table = (run_dir / "run.log").read_text()
        row = next(line for line in table.splitlines() if line.startswith(LABEL))
        assert row.split("|")[-1].strip() == f"{closing[ENTRY]['r_mean']:.2f}"


def test_repeats_average_the_entry_over_runs(paper_repeats: tuple[Path, str]) -> None:
    out, output = paper_repeats
    summary = json.loads((out / "summary.json").read_text())
    entries = [read_log(out / f"run_{k}")[1][ENTRY] for k in (0, 1)]
    assert [result[ENTRY] for result in summary["runs"]] == entries
    assert list(summary["mean"]) == ["test", "val", ENTRY]
    for key in METRIC_KEYS:
        assert summary["mean"][ENTRY][key] == statistics.fmean(entry[key] for entry in entries)
        assert summary["std"][ENTRY][key] == statistics.stdev(entry[key] for entry in entries)
    assert f"{LABEL} (mean over runs)" in output and f"{LABEL} (std over runs)" in output


def test_the_protocol_evaluates_test_in_its_epochs_and_changes_nothing_else(static_pair: tuple[Path, Path]) -> None:
    default, paper = static_pair
    default_epochs, default_closing = read_log(default)
    paper_epochs, paper_closing = read_log(paper)
    assert ["test_r_mean" in r for r in default_epochs] == [True, False]  # only the selected epoch 0
    assert ["test_r_mean" in r for r in paper_epochs] == [True, True]
    assert set(default_closing) == DEFAULT_CLOSING - {"test_at_last"}
    assert "paper protocol" not in (default / "run.log").read_text()
    added = {k: v for k, v in paper_epochs[1].items() if k.startswith("test_")}
    assert set(added) == {f"test_{k}" for k in METRIC_KEYS}
    assert [without_timing(r) for r in default_epochs] == [without_timing(paper_epochs[0]),
                                                           without_timing({k: v for k, v in paper_epochs[1].items()
                                                                           if k not in added})]
    assert paper_closing[ENTRY_1] == {k: paper_epochs[1][f"test_{k}"] for k in METRIC_KEYS}
    extra = {"protocol", "protocol_epochs", ENTRY_1, "test_at_last"}
    assert {k: v for k, v in paper_closing.items() if k not in extra} == default_closing


def killed_mid_epoch(command_line: list[str], out: Path, epoch: int) -> None:
    """Run the command and SIGKILL it once epoch ``epoch`` has logged its first step."""
    process = subprocess.Popen(command_line, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if (out / "run.log").exists() and f"Train Epoch: [{epoch}] [" in (out / "run.log").read_text():
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_a_resumed_run_keeps_its_test_evaluations(paper_repeats: tuple[Path, str], tiny_config_path: Path,
                                                  tmp_path: Path) -> None:
    """Killed in epoch 2, after epoch 1 (the first averaged epoch) was evaluated on test, and resumed: the
    same records and the same closing line as run_0 (seed 42), which was never stopped."""
    out = tmp_path / "resumed"
    killed_mid_epoch(command(tiny_config_path, out, *PAPER), out, epoch=2)
    finished = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert finished == [0, 1], "the run was not stopped in epoch 2"
    run_py(tiny_config_path, out, "--resume", *PAPER)
    resumed, closing = read_log(out)
    reference, reference_closing = read_log(paper_repeats[0] / "run_0")
    assert [without_timing(r) for r in resumed] == [without_timing(r) for r in reference]
    assert closing == reference_closing


def test_the_mean_takes_every_numeric_test_value_and_needs_every_epoch(static_pair: tuple[Path, Path]) -> None:
    """A segmentation score logged on test is averaged like the recalls; a missing epoch is an error."""
    epochs, _ = read_log(static_pair[1])
    history = [{**r, "test_seg_miou": 10.0 * r["epoch"], "test_note": "x"} for r in epochs]
    mean = mean_of_last_epochs(history, range(0, 2))
    assert mean["seg_miou"] == 5.0 and "note" not in mean and mean["r_mean"] == epochs[0]["test_r_mean"]
    history[1] = {k: v for k, v in history[1].items() if not k.startswith("test_")}
    with pytest.raises(ValueError, match=r"over epochs \[0, 1\], but only epochs \[0\] of them were evaluated"):
        mean_of_last_epochs(history, range(0, 2))


@pytest.mark.parametrize("n", [4, 0])
def test_a_count_the_run_cannot_have_is_refused(n: int, tiny_config_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"key 'protocol_last_epochs': .* N must lie in 1\.\.3 "
                                          rf"\(schedular\.epochs\), got {n}$"):
        run.main(["--config", str(tiny_config_path), "--output_dir", str(tmp_path / "never"), "--dist", "cpu",
                  "protocol=mean_of_last_epochs_on_test", f"protocol_last_epochs={n}"])
    assert not (tmp_path / "never").exists()
