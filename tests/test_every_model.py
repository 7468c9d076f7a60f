"""Every registered model, as timm tests its models: built from its demo config, one training step, its
interface, and a checkpoint that rebuilds it elsewhere with identical embeddings."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset import create_train_loader
from models import build_model, list_models, load_retriever
from models.objective import build_objective
from models.task import RetrievalTask
from Retrieval import model_state
from scheduler import parse_stages
from utils.config import load_config
from utils.distributed import DistInfo

ROOT = Path(__file__).resolve().parents[1]


def demo_config(name: str, demo_root: Path, *overrides: str) -> dict:
    """configs/demo_<name>.yaml with its data keys (and its masks, when it reads any) pointed at the small test
    dataset."""
    path = ROOT / "configs" / f"demo_{name}.yaml"
    masks = [f"mask_root={demo_root}/masks"] if load_config(path)["mask_root"] else []
    return load_config(path, [
        "synthetic_data=null", f"train_file=[{demo_root}/demo_train.json]", f"val_file={demo_root}/demo_val.json",
        f"test_file={demo_root}/demo_test.json", f"image_root={demo_root}/images", *masks,
        f"text_encoder={demo_root}/tokenizer", "batch_size_train=8", "num_workers=0", *overrides])


def private_copies(config_name: str, demo_root: Path, folder: Path) -> list[str]:
    """Overrides that read the architecture JSONs and the tokenizer files the demo names from copies in
    ``folder`` (a model with a word vocabulary builds it from the training captions)."""
    raw = load_config(ROOT / "configs" / f"demo_{config_name}.yaml")
    folder.mkdir()
    overrides = []
    if raw["text_encoder"]:
        shutil.copytree(demo_root / "tokenizer", folder / "tokenizer")
        overrides.append(f"text_encoder={folder / 'tokenizer'}")
    for key in ("vision_config", "text_config"):
        if raw[key]:
            shutil.copy(ROOT / raw[key], folder / f"{key}.json")
            overrides.append(f"{key}={folder / f'{key}.json'}")
    return overrides


def test_every_model_has_a_demo_config_and_a_task() -> None:
    import run

    for name in list_models():
        assert (ROOT / "configs" / f"demo_{name}.yaml").is_file(), name
        assert run.TASKS[f"demo_{name}"] == f"configs/demo_{name}.yaml"
    assert run.TASKS["demo"] == "configs/demo_fisvl.yaml"
    assert run.TASKS["demo_baseline"] == "configs/demo_swin_bert_cl.yaml"


def test_demo_configs_share_the_data_keys() -> None:
    """Dotted overrides of the data keys point any demo at other data in the same format."""
    keys = ("synthetic_data", "train_file", "val_file", "test_file", "image_root")
    configs = [load_config(ROOT / "configs" / f"demo_{name}.yaml") for name in list_models()]
    for config in configs[1:]:
        assert {k: config[k] for k in keys} == {k: configs[0][k] for k in keys}


@pytest.mark.parametrize("name", list_models())
def test_model_trains_encodes_and_reloads_from_its_checkpoint(name: str, demo_root: Path, tmp_path: Path) -> None:
    files = tmp_path / "files"
    config = demo_config(name, demo_root, *private_copies(name, demo_root, files))
    torch.manual_seed(0)
    model = build_model(config, pretrained=False)
    stages = parse_stages(config)
    task = RetrievalTask(model, build_objective(config, stages))
    loader = create_train_loader(config, DistInfo(), 0, torch.device("cpu"), transform=model.train_transform,
                                 text_processor=model.text_processor, fields=task.sample_fields)
    task.objective.prepare(loader.dataset.ann, tmp_path)
    task.train()
    losses = task(next(iter(loader)), epoch=0)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for param_name, param in task.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{name}: {param_name}"
        else:
            assert param.grad is None, f"{name}: frozen {param_name} got a gradient"

    model.eval()
    annotations = json.loads((demo_root / "demo_test.json").read_text())
    images = [str(demo_root / "images" / entry["image"]) for entry in annotations[:5]]
    texts = [entry["caption"][0] for entry in annotations[:7]]
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save(model_state(model, task.objective, config, 0, 0.0, "val"), checkpoint)

    here = load_retriever(checkpoint)
    image_emb, text_emb = here.encode_images(images), here.encode_texts(texts)
    assert image_emb.shape[0] == 5 and text_emb.shape[0] == 7
    assert here.similarity(image_emb, text_emb).shape == (5, 7)

    shutil.rmtree(files)  # the checkpoint alone must rebuild the model, its tokenizer and transforms
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    script = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); from models import load_retriever; "
              f"r = load_retriever({str(checkpoint)!r}); "
              f"torch.save({{'images': r.encode_images({images!r}), 'texts': r.encode_texts({texts!r})}}, 'out.pt')")
    subprocess.run([sys.executable, "-c", script], cwd=elsewhere, check=True, timeout=300)
    again = torch.load(elsewhere / "out.pt", weights_only=True)
    assert torch.equal(again["images"], image_emb) and torch.equal(again["texts"], text_emb)
