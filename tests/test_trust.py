"""Faults as a user meets them: a diverging run, --evaluate without a checkpoint, failed resumes, stale
temporary files, bad annotation bytes and bad images; each must stop clearly and leave the run folder true."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import Retrieval
import run as launcher
from conftest import TINY_BERT, TINY_SWIN, write_json
from dataset.annotations import DataError, load_eval_annotations, load_train_annotations
from utils.config import load_config
from utils.finite import NonFiniteError
from utils.weights import WeightsError

DIVERGING_LR = "optimizer.lr=1e6"  # AdamW moves every weight by about 1e6 per step: NaN within a few steps


def worker(config: Path, output_dir: Path, *extra: str) -> dict:
    return Retrieval.main(["--config", str(config), "--output_dir", str(output_dir), "--device", "cpu", *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder except run.log (which records the failure), with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "run.log"}


@pytest.fixture(scope="module")
def finished_run(tiny_config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of one epoch, with its checkpoints."""
    out = tmp_path_factory.mktemp("finished") / "run"
    worker(tiny_config_path, out, "schedular.epochs=1")
    return out


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# --- 1. non-finite training never wins

def test_diverging_run_stops_and_keeps_the_good_best_checkpoint(finished_run: Path, tiny_config_path: Path,
                                                                 tmp_path: Path) -> None:
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    with pytest.raises(NonFiniteError) as err:
        worker(tiny_config_path, out, "schedular.epochs=1", DIVERGING_LR)
    message = str(err.value)
    assert "epoch 0, step " in message and "loss_contr=" in message and "nan_policy: stop" in message
    after = snapshot(out)
    for name in ("checkpoint_best.pth", "checkpoint_last.pth", "log.txt"):
        assert after[name] == before[name], name
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in best["model"].values() if torch.is_floating_point(v))
    assert "NonFiniteError" in (out / "run.log").read_text()


def test_skip_policy_skips_up_to_its_limit_then_stops(tiny_config_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "skip"
    with pytest.raises(NonFiniteError, match="more than nan_skip_limit 3"):
        worker(tiny_config_path, out, "schedular.epochs=1", DIVERGING_LR, "nan_policy=skip", "nan_skip_limit=3")
    log = (out / "run.log").read_text()
    assert log.count("update skipped") == 3
    assert not (out / "checkpoint_last.pth").exists() and not (out / "checkpoint_best.pth").exists()


def test_skip_policy_skips_a_poisoned_batch_and_trains_on(tiny_config_path: Path) -> None:
    """One batch with NaN pixels: its update is dropped and counted, the other steps train."""
    from dataset import create_train_loader
    from models import build_model
    from models.objective import build_objective
    from models.task import RetrievalTask
    from optim import create_optimizer
    from scheduler import create_scheduler, parse_stages
    from utils.distributed import DistInfo
    from utils.precision import grad_scaler

    config = load_config(tiny_config_path, ["nan_policy=skip", "nan_skip_limit=1"])
    torch.manual_seed(0)
    model = build_model(config, pretrained=False)
    task = RetrievalTask(model, build_objective(config, parse_stages(config)))
    loader = create_train_loader(config, DistInfo(), 0, torch.device("cpu"), transform=model.train_transform,
                                 text_processor=model.text_processor, fields=task.sample_fields)
    batches = list(loader)
    batches[2]["images"][0, 0, 0, 0] = float("nan")
    optimizer = create_optimizer(config["optimizer"], model, task.objective)
    scheduler = create_scheduler(config["schedular"], optimizer, len(batches))
    state = Retrieval.TrainState()
    stats = Retrieval.train_one_epoch(task, batches, optimizer, scheduler, grad_scaler("fp32", torch.device("cpu")),
                                      0, config, torch.device("cpu"), state)
    assert stats["train_skipped_steps"] == 1 and state.skipped_steps == 1
    assert float(stats["train_loss_contr"]) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_model_with_nan_weights_is_never_saved(tiny_config_path: Path) -> None:
    from models import build_model
    from optim import create_optimizer
    config = load_config(tiny_config_path)
    model = build_model(config, pretrained=False)
    optimizer = create_optimizer(config["optimizer"], model)
    Retrieval.check_finite_model(model, optimizer, 0, Retrieval.TrainState())
    with torch.no_grad():
        model.text_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"after epoch 3 1 tensors hold NaN/inf \(text_proj.weight\)"):
        Retrieval.check_finite_model(model, optimizer, 3, Retrieval.TrainState())


# --- 3. --evaluate says what it evaluates

def pretrained_config(tiny_config_path: Path, tmp_path: Path) -> Path:
    """The tiny config with real weight files for both encoders (a Swin checkpoint and a BERT folder)."""
    from models.encoders import BertTextEncoder, build_vision_encoder
    from transformers import BertConfig

    swin = build_vision_encoder({**TINY_SWIN, "arch": "swin"})
    torch.save(swin.state_dict(), tmp_path / "swin.pth")
    vision = write_json(tmp_path / "swin.json", {**TINY_SWIN, "ckpt": str(tmp_path / "swin.pth")})
    bert_dir = tmp_path / "bert"
    bert_dir.mkdir()
    BertTextEncoder(BertConfig(**TINY_BERT)).save_pretrained(bert_dir)
    text = (tiny_config_path.parent / "bert.json")
    tokenizer = Path(load_config(tiny_config_path)["text_encoder"])
    shutil.copy(tokenizer / "vocab.txt", bert_dir / "vocab.txt")
    lines = [line for line in tiny_config_path.read_text().splitlines()
             if not line.startswith(("vision_config", "text_encoder", "allow_random_init", "text_config"))]
    lines += [f"vision_config: '{vision}'", f"text_config: '{text}'", f"text_encoder: '{bert_dir}'"]
    path = tmp_path / "pretrained.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluate_without_checkpoint_refuses_random_parts(tiny_config_path: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        worker(tiny_config_path, tmp_path / "eval", "--evaluate")
    message = str(err.value)
    assert "zero-shot" in message and "--allow_random_eval" in message
    assert "vision_encoder, text_encoder, text_proj, vision_proj" in message
    assert not (tmp_path / "eval" / "eval_results.json").exists()


def test_evaluate_pretrained_weights_says_so(tiny_config_path: Path, tmp_path: Path) -> None:
    config = pretrained_config(tiny_config_path, tmp_path)
    with pytest.raises(WeightsError, match="randomly initialised: text_proj, vision_proj"):
        worker(config, tmp_path / "refused", "--evaluate")
    out = tmp_path / "eval"
    worker(config, out, "--evaluate", "--allow_random_eval")
    result = json.loads((out / "eval_results.json").read_text())
    assert result["weights"] == "pretrained with random parts (--allow_random_eval)"
    assert result["checkpoint"] is None and result["random_parts"] == ["text_proj", "vision_proj"]
    assert result["pretrained_files"] == {"vision_encoder": str(tmp_path / "swin.pth"),
                                          "text_encoder": str(tmp_path / "bert")}
    log = (out / "run.log").read_text()
    assert "evaluating pretrained with random parts (--allow_random_eval) weights, no --checkpoint" in log
    assert f"vision_encoder <- {tmp_path / 'swin.pth'}" in log


def test_evaluate_a_checkpoint_says_which(finished_run: Path, tiny_config_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    worker(tiny_config_path, out, "--evaluate", "--checkpoint", str(finished_run / "checkpoint_best.pth"))
    result = json.loads((out / "eval_results.json").read_text())
    assert result["weights"] == "checkpoint" and result["checkpoint"] == str(finished_run / "checkpoint_best.pth")
    assert f"evaluating checkpoint {finished_run / 'checkpoint_best.pth'}" in (out / "run.log").read_text()


# --- 5. errors a user can act on, and a run folder that stays true

def test_non_utf8_annotation_names_file_and_byte(tmp_path: Path) -> None:
    file = tmp_path / "train.json"
    file.write_bytes('[{"image": "a.png", "caption": "caf'.encode() + b"\xe9" + b'", "image_id": 1}]')
    for load in (lambda: load_train_annotations([str(file)], str(tmp_path), 30),
                 lambda: load_eval_annotations(str(file), str(tmp_path), 30)):
        with pytest.raises(DataError) as err:
            load()
        assert str(file) in str(err.value) and "not UTF-8" in str(err.value)
        assert "byte 0xe9 at byte position 35" in str(err.value)


@pytest.mark.parametrize("case", ["missing", "corrupt", "mismatched"])
def test_failed_resume_leaves_the_run_folder_as_it_was(finished_run: Path, tiny_config_path: Path, tmp_path: Path,
                                                       case: str) -> None:
    out = copy_run(finished_run, tmp_path)
    extra: list[str] = []
    if case == "missing":
        (out / "checkpoint_last.pth").unlink()
        expected = FileNotFoundError
    elif case == "corrupt":
        data = (out / "checkpoint_last.pth").read_bytes()
        (out / "checkpoint_last.pth").write_bytes(data[: len(data) // 2])
        expected = RuntimeError
    else:
        extra = ["embed_dim=16"]
        expected = Retrieval.ResumeError
    before = snapshot(out)
    log_before = (out / "run.log").read_text()
    with pytest.raises(expected) as err:
        worker(tiny_config_path, out, "--resume", "schedular.epochs=2", *extra)
    assert snapshot(out) == before
    log = (out / "run.log").read_text()
    assert log.startswith(log_before)
    added = log[len(log_before):]
    assert "the run stopped by an error" in added and "Traceback" in added and type(err.value).__name__ in added
    if case == "mismatched":
        assert "checkpoint_last.pth" in str(err.value) and "does not match this run" in str(err.value)


def test_resume_followed_by_an_override_is_not_a_path() -> None:
    args = launcher.build_parser()
    parsed = launcher.parse_run_arguments(args, ["--resume", "schedular.epochs=4", "optimizer.lr=1e-4"])
    assert parsed.resume == "latest" and parsed.overrides == ["schedular.epochs=4", "optimizer.lr=1e-4"]
    assert "--resume" in launcher.worker_arguments(parsed, "c.yaml", "out", "cpu")
    worker_args = Retrieval.parse_run_arguments(Retrieval.build_parser(),
                                                ["--config", "c", "--output_dir", "o", "--resume", "a.b=1"])
    assert worker_args.resume == "latest" and worker_args.overrides == ["a.b=1"]


def test_resume_with_an_override_continues_and_removes_stale_temporaries(finished_run: Path, tiny_config_path: Path,
                                                                          tmp_path: Path) -> None:
    out = copy_run(finished_run, tmp_path)
    stale = out / ".checkpoint_last.pth.999999.tmp"
    stale.write_bytes(b"half a checkpoint")
    foreign = out / ".notes.tmp"
    foreign.write_text("not ours")
    worker(tiny_config_path, out, "--resume", "schedular.epochs=2")
    assert not stale.exists() and foreign.exists()
    assert f"removed {stale}, left by an interrupted process" in (out / "run.log").read_text()
    epochs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()][:-1]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert load_config(out / "config.yaml")["schedular"]["epochs"] == 2


def test_a_bad_test_image_stops_the_run_before_training(demo_root: Path, tiny_config_path: Path,
                                                         tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(demo_root / "images", images)
    test_entries = json.loads((demo_root / "demo_test.json").read_text())
    broken = images / Path(test_entries[-1]["image"]).name
    broken.write_bytes(broken.read_bytes()[:40])
    out = tmp_path / "run"
    start = time.time()
    with pytest.raises(DataError) as err:
        worker(tiny_config_path, out, f"image_root={images}")
    assert time.time() - start < 60
    message = str(err.value)
    assert str(broken) in message and "cannot decode" in message and "demo_test.json, entry 19" in message
    log = (out / "run.log").read_text()
    assert "checked 120 images of train/val/test" in log and "Train Epoch" not in log


def test_a_bad_image_is_skipped_when_asked(demo_root: Path, tiny_config_path: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(demo_root / "images", images)
    val_entries = json.loads((demo_root / "demo_val.json").read_text())
    broken = images / Path(val_entries[0]["image"]).name
    broken.write_bytes(b"not an image at all")
    out = tmp_path / "run"
    worker(tiny_config_path, out, f"image_root={images}", "skip_bad_samples=true", "schedular.epochs=1")
    log = (out / "run.log").read_text()
    assert "1 do not decode" in log and "val: skipped 1 images" in log


def test_image_check_can_be_turned_off(tiny_config_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    worker(tiny_config_path, out, "check_images=false", "schedular.epochs=1")
    assert "checked" not in (out / "run.log").read_text()
