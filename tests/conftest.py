"""Shared fixtures: offline hub, the project root on sys.path, a tiny generated dataset and tiny encoder configs."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401  (declares the models' and losses' config keys)

TINY_SWIN = {"arch": "swin", "vision_width": 64, "image_res": 32, "window_size": 4, "embed_dim": 32,
             "depths": [1, 1], "num_heads": [1, 2], "drop_path_rate": 0.0}
TINY_VIT = {"arch": "vit", "vision_width": 32, "image_res": 32, "patch_size": 8, "depth": 1, "num_heads": 2}
TINY_BERT = {"model_type": "bert", "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
             "type_vocab_size": 2, "pad_token_id": 0}


# The smallest valid config (file paths need not exist until data or a model is built).
MINIMAL_CONFIG = """\
train_file: t.json
val_file: v.json
test_file: s.json
image_root: images/
vision_config: v.json
text_config: b.json
text_encoder: bert/
image_res: 224
batch_size_train: 8
optimizer: {opt: adamW, lr: 6e-5, weight_decay: 0.01, lr_mult: 2}
schedular: {sched: linear, lr: 6e-5, epochs: 20, num_warmup_steps: 0.1}
"""


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


TIMING_KEYS = {"train_time_s", "samples_per_s", "max_mem_mb"}  # log.txt values that differ between equal runs


def read_log(output_dir: Path) -> tuple[list[dict], dict]:
    """A run's log.txt: the epoch records and the closing summary line."""
    lines = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]
    return lines[:-1], lines[-1]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def run_gloo_worker(worker: Path, output: Path, processes: int) -> dict:
    """Run a test worker script alone, or as ``processes`` gloo processes under torchrun; it saves its results
    to ``output``, which is returned loaded."""
    import subprocess

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    result = subprocess.run([*launcher, str(worker), str(output)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return torch.load(output, weights_only=True)


def prepare_data_main(module_name: str):
    """tools/prepare_data.py's ``main``, imported from its file as the user runs it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, ROOT / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


WORD_MODEL_CAPTIONS = ["A white plane is parked beside the runway.", "Two white planes near the runway",
                       "a red roof beside the green lawn", "many boats park beside the river ."]


def word_model_config(tmp_path: Path, model: str, *overrides: str) -> dict:
    """configs/demo_<model>.yaml of a word-vocabulary model (AMFMN lineage), its vocabulary built from a small
    caption file instead of the demo data."""
    from utils.config import load_config

    train = write_json(tmp_path / "train.json", [{"image": f"{i}.png", "caption": c, "image_id": i}
                                                  for i, c in enumerate(WORD_MODEL_CAPTIONS)])
    return load_config(ROOT / "configs" / f"demo_{model}.yaml", ["synthetic_data=null", f"train_file=[{train}]",
                                                                 *overrides])


def small_demo(tmp_path_factory: pytest.TempPathFactory, name: str, train: int, val: int, test: int) -> Path:
    """A procedural demo dataset of 32 px images with ``train``/``val``/``test`` images per class."""
    from dataset.synthetic import DemoSpec, ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp(name), DemoSpec(train, val, test, image_size=32))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small procedural dataset (10 classes x 8/2/2 images, 32 px) with its vocab.txt."""
    return small_demo(tmp_path_factory, "demo", 8, 2, 2)


@pytest.fixture(scope="session")
def tiny_config_path(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A YAML config training a tiny Swin + BERT on ``demo_root`` (a few seconds per epoch on CPU)."""
    folder = tmp_path_factory.mktemp("configs")
    vision = write_json(folder / "swin.json", TINY_SWIN)
    text = write_json(folder / "bert.json", TINY_BERT)
    yaml = f"""\
train_file: ['{demo_root}/demo_train.json']
val_file: '{demo_root}/demo_val.json'
test_file: '{demo_root}/demo_test.json'
image_root: '{demo_root}/images'
vision_config: '{vision}'
text_config: '{text}'
text_encoder: '{demo_root}/tokenizer'
image_res: 32
embed_dim: 32
batch_size_train: 32
batch_size_test: 16
batch_size_test_text: 32
num_workers: 0
optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.01, lr_mult: 2}}
schedular: {{sched: linear, epochs: 3, num_warmup_steps: 0.1}}
print_freq: 5
allow_random_init: [vision_encoder, text_encoder, conv_encoder]
"""
    path = folder / "tiny.yaml"
    path.write_text(yaml, encoding="utf-8")
    return path


FISVL_KEYS = """\
model: fisvl
conv_arch: resnet18
dataset_kind: re_rsitmd
deletion_rate: 0.03
stages:
  - {name: con_aff_scene, start_epoch: 0, losses: {contr: 1, affil: 1, scene: 1}}
  - {name: wcon_aff, start_epoch: 2, losses: {contr: 1, affil: 1}, caption_weights: true}
alpha_m: 2
beta1: -0.0015
beta2: 0.02
"""


@pytest.fixture(scope="session")
def tiny_fisvl_config_path(tiny_config_path: Path) -> Path:
    """The tiny config as FISVL: ResNet-18 prior, SFGS, 2 graph steps, the two stages switching at epoch 2."""
    path = tiny_config_path.with_name("tiny_fisvl.yaml")
    path.write_text(tiny_config_path.read_text(encoding="utf-8") + FISVL_KEYS, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def search_demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo scenes with 100 test images (10 per class, 32 px): top-10 by chance is 10%, not demo_root's 50%."""
    return small_demo(tmp_path_factory, "search_demo", 16, 2, 10)


@pytest.fixture(scope="session")
def trained_clip(search_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/demo_clip.yaml trained briefly on ``search_demo_root`` through Retrieval.main: a checkpoint that
    ranks the test images far above chance, for the tests that need a model that learned something."""
    from Retrieval import main

    root, output = search_demo_root, tmp_path_factory.mktemp("trained_clip")
    main(["--config", str(ROOT / "configs" / "demo_clip.yaml"), "--output_dir", str(output), "--device", "cpu",
          "synthetic_data=null", f"train_file=[{root}/demo_train.json]", f"val_file={root}/demo_val.json",
          f"test_file={root}/demo_test.json", f"image_root={root}/images", "image_res=32", "num_workers=0",
          "batch_size_train=32", "schedular.epochs=2", f"clip_model={ROOT / 'configs' / 'config_clip_demo.json'}"])
    return output / "checkpoint_best.pth"
