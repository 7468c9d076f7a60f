"""The command line end to end: train a tiny model, kill it mid-run, resume, compare, evaluate; torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import read_log, without_timing

ROOT = Path(__file__).resolve().parents[1]


def run_py(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), *args]


@pytest.fixture(scope="module")
def default_loader_config(tiny_config_path: Path) -> Path:
    """The tiny config with the default loader settings (4 persistent workers), as a user runs it."""
    path = tiny_config_path.with_name("tiny_default_loader.yaml")
    lines = [line for line in tiny_config_path.read_text().splitlines() if not line.startswith("num_workers")]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def uninterrupted(default_loader_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "nested" / "uninterrupted"
    subprocess.run(run_py("--config", str(default_loader_config), "--output_dir", str(out), "--dist", "cpu"),
                   check=True, cwd=ROOT, timeout=600)
    return out


def test_training_outputs(uninterrupted: Path) -> None:
    epochs, summary = read_log(uninterrupted)
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    for key in ("train_lr", "train_loss_contr", "val_txt_r1", "val_img_r10", "val_r_mean", "test_txt_r1",
                "test_r_mean", "samples_per_s"):
        assert key in epochs[0]
    assert isinstance(epochs[0]["train_loss_contr"], str) and isinstance(epochs[0]["val_r_mean"], float)
    assert summary["selected_on"] == "val"
    best = max(epochs, key=lambda r: r["val_r_mean"])
    assert summary["best_epoch"] == best["epoch"] and summary["test_at_best"]["r_mean"] == best["test_r_mean"]
    saved_best = torch.load(uninterrupted / "checkpoint_best.pth", weights_only=True)
    assert saved_best["epoch"] == best["epoch"] and set(saved_best) >= {"model", "config", "epoch", "metric"}
    assert (uninterrupted / "config.yaml").is_file()
    assert any((uninterrupted / "tensorboard").iterdir())
    assert not list(uninterrupted.glob(".*.tmp"))


def killed_mid_epoch(command: list[str], out: Path, epoch: int) -> None:
    """Run ``command`` and SIGKILL it (and its loader workers) once epoch ``epoch`` has logged a step."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    marker = f"Train Epoch: [{epoch}] [ 1/"
    while process.poll() is None and time.time() < deadline:
        if (out / "run.log").exists() and marker in (out / "run.log").read_text():
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_interrupted_run_resumes_as_if_never_stopped(uninterrupted: Path, default_loader_config: Path,
                                                     tmp_path: Path) -> None:
    """Killed in the middle of epoch 1 with the default loader (4 persistent workers), resumed: the same
    log lines and bit-identical weights as the run that was never stopped."""
    out = tmp_path / "interrupted"
    command = run_py("--config", str(default_loader_config), "--output_dir", str(out), "--dist", "cpu")
    killed_mid_epoch(command, out, epoch=1)
    stopped_at = torch.load(out / "checkpoint_last.pth", weights_only=True)["train_state"]["epoch"]
    assert stopped_at == 1, "the run was not stopped in the middle of epoch 1"

    subprocess.run([*command, "--resume"], check=True, cwd=ROOT, timeout=600)
    resumed_epochs, resumed_summary = read_log(out)
    epochs, summary = read_log(uninterrupted)
    assert [without_timing(r) for r in resumed_epochs] == [without_timing(r) for r in epochs]
    assert resumed_summary == summary
    a = torch.load(out / "checkpoint_last.pth", weights_only=True)
    b = torch.load(uninterrupted / "checkpoint_last.pth", weights_only=True)
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key


def test_evaluate_reproduces_the_logged_test_score(uninterrupted: Path, default_loader_config: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "eval"
    subprocess.run(run_py("--config", str(default_loader_config), "--output_dir", str(out), "--evaluate",
                          "--checkpoint", str(uninterrupted / "checkpoint_best.pth")), check=True, cwd=ROOT, timeout=600)
    result = json.loads((out / "eval_results.json").read_text())
    _, summary = read_log(uninterrupted)
    for key, value in summary["test_at_best"].items():
        assert round(result[key], 2) == value
    assert result["split"] == "test" and result["r_mean"] > result["chance_r_mean"]


def test_two_processes_with_torchrun(tiny_config_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    result = subprocess.run(run_py("--config", str(tiny_config_path), "--output_dir", str(out), "--dist", "cpu",
                                   "--nproc_per_node", "2", "--bs", "32", "schedular.epochs=1"),
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    epochs, summary = read_log(out)
    assert len(epochs) == 1 and summary["best_epoch"] == 0
    assert "global batch 32" in (out / "run.log").read_text()


def test_bad_override_stops_with_the_key_named(tiny_config_path: Path, tmp_path: Path) -> None:
    result = subprocess.run(run_py("--config", str(tiny_config_path), "--output_dir", str(tmp_path / "x"),
                                   "optimizer.lrr=1"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?)" in result.stderr


def test_evaluation_split_over_two_processes_matches_one(uninterrupted: Path, tiny_config_path: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "eval2"
    result = subprocess.run(run_py("--config", str(tiny_config_path), "--output_dir", str(out), "--evaluate",
                                   "--dist", "cpu", "--nproc_per_node", "2",
                                   "--checkpoint", str(uninterrupted / "checkpoint_best.pth")),
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sharded = json.loads((out / "eval_results.json").read_text())
    _, summary = read_log(uninterrupted)
    for key, value in summary["test_at_best"].items():
        assert round(sharded[key], 2) == value
    assert sharded["n_images"] == 20 and sharded["n_texts"] == 100


def test_load_retriever_in_an_empty_folder_reproduces_the_test_recalls(uninterrupted: Path,
                                                                       default_loader_config: Path,
                                                                       tmp_path: Path) -> None:
    """The selected checkpoint alone (no config, JSON or vocabulary beside it) embeds the test split into the
    recalls the run logged for it."""
    from utils.config import load_config

    config = load_config(default_loader_config)
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from dataset.annotations import load_eval_annotations
from models import load_retriever
from utils.metrics import retrieval_metrics
retriever = load_retriever({str(uninterrupted / "checkpoint_best.pth")!r})
ann = load_eval_annotations({config["test_file"]!r}, {config["image_root"]!r}, 30)
scores = retriever.similarity(retriever.encode_images(ann.image_paths), retriever.encode_texts(ann.texts))
print(json.dumps(retrieval_metrics(scores, ann.img2txt, ann.txt2img)))
"""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-c", script], cwd=empty, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    _, summary = read_log(uninterrupted)
    assert {k: round(v, 2) for k, v in metrics.items()} == summary["test_at_best"]
