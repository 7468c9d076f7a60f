"""Model clip and fisvl_clip: weight files in every published layout, load errors, CLIP's tokenizer, the
QuickGELU check, zero-shot evaluation, open_clip's fine-tuning rules, FGIS on the CLIP tokens, the paper-size
ViT-B-32 and the demos end to end. Tiny open_clip architectures are model JSONs in tmp_path; nothing is
downloaded."""
from __future__ import annotations

import json
import logging
import math
import socket
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image
from torch import nn

import Retrieval
from conftest import read_log, write_json
from dataset import create_train_loader
from dataset.annotations import load_eval_annotations
from dataset.captions import pre_caption
from dataset.images import ImageDecoding, load_rgb
from models import build_model
from models.encoders.open_clip_towers import ArchitectureError
from models.inference import embed_image_batches, embed_texts, similarity_matrix
from models.objective import build_objective
from models.task import RetrievalTask
from models.text import ClipTokenizerProcessor, processor_from_state
from optim import parameter_groups
from scheduler import parse_stages
from utils.config import load_config
from utils.distributed import DistInfo
from utils.metrics import METRIC_KEYS, chance_metrics, retrieval_metrics
from utils.precision import autocast
from utils.weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TEXT_CFG = {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                                             "patch_size": 8}, "text_cfg": TEXT_CFG}
TINY_RN = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
           "text_cfg": TEXT_CFG}
CAPTIONS = ["A Plane, parked.", "many boats park beside the river .", "Two   white planes near the RUNWAY!"]
LAYOUTS = ("plain", "training", "safetensors", "torchscript")
TOWERS_LOG = "models.encoders.open_clip_towers"
VIT_B_32_PARAMETERS = 151_277_313  # sum(p.numel() for p in open_clip.create_model('ViT-B-32').parameters())


# --- helpers


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: beside other jobs on a 2-core machine, two threads wait on each other (a demo step
    takes about 6 s instead of 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def arch_file(folder: Path, name: str, arch: dict[str, Any] = TINY_CLIP, **top: Any) -> Path:
    """The model JSON ``folder/name.json`` of ``arch`` (``top`` adds top-level keys such as ``quick_gelu``)."""
    return write_json(folder / f"{name}.json", {**arch, **top})


def clip_config(arch: Path | str, weights: Path | None = None, *overrides: str, model: str = "clip",
                image_res: int = 32) -> dict[str, Any]:
    """configs/demo_<model>.yaml on the architecture ``arch`` with the weight file ``weights``."""
    return load_config(ROOT / "configs" / f"demo_{model}.yaml", [
        f"clip_model={arch}", f"clip_weights={weights or 'null'}", f"image_res={image_res}", *overrides])


def data_files(root: Path) -> list[str]:
    """Overrides pointing a demo config at the dataset in ``root``."""
    return [f"train_file=[{root}/demo_train.json]", f"val_file={root}/demo_val.json",
            f"test_file={root}/demo_test.json", f"image_root={root}/images", "num_workers=0"]


def data_overrides(root: Path) -> list[str]:
    """... with no dataset generated (the demo_root fixture's)."""
    return ["synthetic_data=null", *data_files(root)]


def open_clip_model(arch: Path, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """open_clip's own model of the JSON ``arch`` (registered with ``add_model_config``), in eval mode."""
    open_clip.add_model_config(arch)
    model = open_clip.create_model(arch.stem)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def save_weights(model: nn.Module, folder: Path, layout: str, name: str | None = None) -> Path:
    """``model``'s weights in a published layout (clip-and-search.md §2)."""
    state = model.state_dict()
    if layout == "plain":  # RemoteCLIP, GeoRSCLIP
        torch.save(state, path := folder / (name or "weights.pt"))
    elif layout == "training":  # open_clip's epoch_N.pt of a DDP run
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
        torch.save({"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer": optimizer}, path := folder / (name or "epoch_3.pt"))
    elif layout == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path := folder / (name or "weights.safetensors")))
    else:  # OpenAI's TorchScript archives
        torch.jit.script(model).save(str(path := folder / (name or "ViT-tiny.pt")))
    return path


def sample_images(count: int = 3) -> list[Image.Image]:
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(count)]


def sample_inputs(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Transformed images and tokenised captions, through the model's own transform and text processor."""
    return torch.stack([model.eval_transform(image) for image in sample_images()]), model.text_processor(CAPTIONS)


@torch.no_grad()
def assert_embeds_as_open_clip(model: nn.Module, reference: nn.Module) -> None:
    images, tokens = sample_inputs(model.eval())
    torch.testing.assert_close(model.encode_image(images), reference.encode_image(images, normalize=True),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens["input_ids"], normalize=True),
                               rtol=0, atol=1e-6)


def load_messages(caplog: pytest.LogCaptureFixture, config: dict[str, Any], level: int) -> list[str]:
    """Build ``config``'s model with its weights; the towers' log messages at ``level``."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_model(config)
    return [r.getMessage() for r in caplog.records if r.name == TOWERS_LOG and r.levelno == level]


def activations(model: nn.Module) -> set[type]:
    """The activation classes in the MLPs of both towers' residual blocks."""
    blocks = [*model.clip.transformer.resblocks, *model.clip.visual.transformer.resblocks]
    return {type(block.mlp.gelu) for block in blocks}


def train_batch(config: dict[str, Any], model: nn.Module, demo_root: Path,
                tmp_path: Path) -> tuple[RetrievalTask, dict[str, Any]]:
    """``model`` with the config's objective (prepared on the demo annotations) and one training batch."""
    task = RetrievalTask(model, build_objective(config, parse_stages(config)))
    loader = create_train_loader({**config, "batch_size_train": 8}, DistInfo(), 0, CPU,
                                 transform=model.train_transform, text_processor=model.text_processor,
                                 fields=task.sample_fields)
    task.objective.prepare(loader.dataset.ann, tmp_path)
    torch.manual_seed(0)
    return task.train(), next(iter(loader))


def train_step(task: RetrievalTask, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One forward and backward; the losses, which must be finite, and every trainable parameter has a finite
    gradient."""
    task.zero_grad()
    losses = task(batch, epoch=0)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    losses["loss"].backward()
    for name, param in task.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    return losses


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, nn.Module]:
    """A tiny GELU CLIP: its model JSON, its weights as a plain state dict, and open_clip's model of them."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    arch = arch_file(folder, "tiny_clip")
    torch.manual_seed(1)
    reference = open_clip_model(arch)
    return arch, save_weights(reference, folder, "plain"), reference


# --- 1. every published layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_published_layout_loads_completely_and_embeds_as_open_clip(layout: str, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    arch = arch_file(tmp_path, "tiny_qg", quick_gelu=True)  # OpenAI's archives are QuickGELU models
    torch.manual_seed(2)
    reference = open_clip_model(arch)
    weights = save_weights(reference, tmp_path, layout)
    with caplog.at_level(logging.INFO):
        model = build_model(clip_config(arch, weights))
    tensors = len(reference.state_dict())
    assert f"clip <- {weights}: loaded {tensors} tensors (0 resized), 0 missing, 0 unexpected" in caplog.text
    assert_embeds_as_open_clip(model, reference)


def test_transforms_and_tokens_are_open_clips(tiny: tuple[Path, Path, nn.Module]) -> None:
    arch, weights, _ = tiny
    model = build_model(clip_config(arch, weights))
    _, _, preprocess = open_clip.create_model_and_transforms(arch.stem)
    for image in sample_images():
        assert torch.equal(model.eval_transform(image), preprocess(image))
    expected = open_clip.get_tokenizer(arch.stem)([pre_caption(c, model.text_processor.max_words) for c in CAPTIONS])
    assert torch.equal(model.text_processor(CAPTIONS)["input_ids"], expected)
    assert expected.shape == (3, TEXT_CFG["context_length"])


# --- 2. load errors


def test_checkpoint_of_other_widths_is_a_weights_error_naming_the_tensor(tiny: tuple[Path, Path, nn.Module],
                                                                        tmp_path: Path) -> None:
    arch, _, _ = tiny
    wider = arch_file(tmp_path, "tiny_wider", {**TINY_CLIP, "text_cfg": {**TEXT_CFG, "width": 48}})
    weights = save_weights(open_clip_model(wider), tmp_path, "plain")
    with pytest.raises(WeightsError) as err:
        build_model(clip_config(arch, weights))
    assert "positional_embedding: file (32, 48) vs model (32, 32)" in str(err.value)
    assert "text_projection: file (48, 32) vs model (32, 32)" in str(err.value)
    assert str(weights) in str(err.value)


def test_missing_weight_file_names_the_path(tiny: tuple[Path, Path, nn.Module], tmp_path: Path) -> None:
    arch, _, _ = tiny
    missing = tmp_path / "RemoteCLIP-ViT-B-32.pt"
    with pytest.raises(WeightsError, match="not found") as err:
        build_model(clip_config(arch, missing))
    assert str(missing) in str(err.value)


@pytest.mark.parametrize("name, suggestion", [("vit-b-32-QuickGELU", "ViT-B-32-quickgelu"), ("ViT-B32", "ViT-B-32")])
def test_unknown_architecture_is_an_error_with_suggestions(name: str, suggestion: str) -> None:
    with pytest.raises(ArchitectureError, match="unknown open_clip architecture") as err:
        build_model(clip_config(name, image_res=224))
    assert suggestion in str(err.value)


# --- 3. the tokenizer


def test_tokenizer_is_open_clips_on_cleaned_captions() -> None:
    processor = ClipTokenizerProcessor("ViT-B-32", max_words=30)
    reference = open_clip.get_tokenizer("ViT-B-32")
    assert torch.equal(processor(CAPTIONS)["input_ids"], reference([pre_caption(c, 30) for c in CAPTIONS]))
    assert torch.equal(processor(["A Plane, parked."])["input_ids"], processor(["a plane parked"])["input_ids"])
    assert not torch.equal(reference(["A Plane, parked."]), reference(["a plane parked"]))  # the cleaning matters
    assert processor.context_length == 77


def test_tokenizer_works_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built with the hub offline and every socket connection refused: the vocabulary ships with open_clip."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("no network in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    ids = ClipTokenizerProcessor("ViT-B-32", 30)(CAPTIONS)["input_ids"]
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-32")([pre_caption(c, 30) for c in CAPTIONS]))


@pytest.mark.parametrize("arch", ["ViT-B-32", "tiny json"])
def test_tokenizer_state_round_trips(arch: str, tmp_path: Path) -> None:
    spec = "ViT-B-32" if arch == "ViT-B-32" else str(arch_file(tmp_path, "tiny_tokens"))
    processor = ClipTokenizerProcessor(spec, max_words=30)
    again = processor_from_state(json.loads(json.dumps(processor.state())))
    assert isinstance(again, ClipTokenizerProcessor) and again.state() == processor.state()
    assert torch.equal(again(CAPTIONS)["input_ids"], processor(CAPTIONS)["input_ids"])
    assert again.context_length == (77 if arch == "ViT-B-32" else TEXT_CFG["context_length"])


# --- 4. QuickGELU


@pytest.mark.parametrize("file_name, layout, file_quick, model_quick, fix", [
    ("ViT-tiny.pt", "torchscript", True, False, ("-quickgelu", "clip_quick_gelu: true")),
    ("ViT-tiny.pt", "torchscript", True, True, None),
    ("ViT-tiny.pt", "torchscript", False, True, ("clip_quick_gelu: false",)),
    ("ViT-tiny.pt", "torchscript", False, False, None),
    ("RemoteCLIP-ViT-B-32.pt", "plain", False, False, ("-quickgelu", "clip_quick_gelu: true")),
    ("RemoteCLIP-ViT-B-32.pt", "plain", False, True, None),
    ("RS5M_ViT-B-32.pt", "plain", False, False, ("-quickgelu", "clip_quick_gelu: true")),
    ("RS5M_ViT-B-32.pt", "plain", False, True, None),
    ("RS5M_ViT-H-14.pt", "plain", False, False, None),
    ("RS5M_ViT-H-14.pt", "plain", False, True, ("clip_quick_gelu: false",)),
])
def test_activation_mismatch_warns_with_the_fix(file_name: str, layout: str, file_quick: bool, model_quick: bool,
                                                fix: tuple[str, ...] | None, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """The activation a file was trained with: from a TorchScript archive's modules, or from the published file
    names (whatever the plain state dict holds)."""
    source = arch_file(tmp_path, "tiny_source", quick_gelu=file_quick)
    weights = save_weights(open_clip_model(source), tmp_path, layout, file_name)
    config = clip_config(arch_file(tmp_path, "tiny_target"), weights, f"clip_quick_gelu={str(model_quick).lower()}")
    warnings = load_messages(caplog, config, logging.WARNING)
    if fix is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and all(part in warnings[0] for part in fix), warnings
        assert file_name in warnings[0]


def test_unknown_file_logs_that_it_cannot_tell(tiny: tuple[Path, Path, nn.Module],
                                               caplog: pytest.LogCaptureFixture) -> None:
    arch, weights, _ = tiny
    infos = load_messages(caplog, clip_config(arch, weights), logging.INFO)
    assert any("does not say whether it was trained with QuickGELU" in m and "-quickgelu" in m for m in infos)
    assert load_messages(caplog, clip_config(arch, weights), logging.WARNING) == []


@pytest.mark.parametrize("how, quick", [("name", True), ("key", True), ("json", True), ("none", False)])
def test_configured_activation_is_the_models_activation(how: str, quick: bool, tmp_path: Path) -> None:
    """QuickGELU by a ``-quickgelu`` architecture name, ``clip_quick_gelu: true`` or the JSON's ``quick_gelu``."""
    arch = arch_file(tmp_path, "tiny-quickgelu" if how == "name" else "tiny_act",
                     **({"quick_gelu": True} if how == "json" else {}))
    model = build_model(clip_config(arch, None, "allow_random_init=[clip]",
                                    *(["clip_quick_gelu=true"] if how == "key" else [])))
    assert model.quick_gelu is quick
    assert activations(model) == ({QuickGELU} if quick else {nn.GELU})


# --- 5. zero-shot evaluation


def evaluate(out: Path, arch: Path, weights: Path, demo_root: Path, *args: str) -> dict[str, Any]:
    """``--evaluate`` of the tiny CLIP on the demo test split; its eval_results.json."""
    Retrieval.main(["--config", str(ROOT / "configs" / "demo_clip.yaml"), "--output_dir", str(out), "--device", "cpu",
                    "--evaluate", *args, f"clip_model={arch}", f"clip_weights={weights}", "image_res=32",
                    "allow_random_init=[]", *data_overrides(demo_root)])
    return json.loads((out / "eval_results.json").read_text())


def test_zero_shot_evaluate_reports_the_pretrained_weights_and_their_recalls(
        tiny: tuple[Path, Path, nn.Module], demo_root: Path, tmp_path: Path) -> None:
    arch, weights, _ = tiny
    result = evaluate(tmp_path / "run", arch, weights, demo_root)
    assert result["weights"] == "pretrained (zero-shot)" and result["checkpoint"] is None
    assert result["pretrained_files"] == {"clip": str(weights)} and result["random_parts"] == []

    config = clip_config(arch, weights, *data_overrides(demo_root))
    model = build_model(config).eval()
    annotations = load_eval_annotations(config["test_file"], config["image_root"], config["max_words"])
    decoding = ImageDecoding.from_config(config["image_decode"])
    images = torch.stack([model.eval_transform(load_rgb(p, decoding)) for p in annotations.image_paths])
    image_emb = embed_image_batches(model, [images], CPU)
    text_emb = embed_texts(model, annotations.texts, config["batch_size_test_text"], CPU)
    expected = retrieval_metrics(similarity_matrix(model, image_emb, text_emb), annotations.img2txt,
                                 annotations.txt2img)
    assert {k: result[k] for k in METRIC_KEYS} == pytest.approx({k: expected[k] for k in METRIC_KEYS}, abs=1e-9)
    assert result["n_images"] == len(annotations.image_paths) and result["n_texts"] == len(annotations.texts)


def test_released_weight_file_as_checkpoint_evaluates_as_zero_shot(tiny: tuple[Path, Path, nn.Module],
                                                                  demo_root: Path, tmp_path: Path) -> None:
    """A plain open_clip state dict (no ``clip.`` prefix) as ``--checkpoint``: remap_checkpoint adds the prefix."""
    arch, weights, reference = tiny
    assert not any(k.startswith("clip.") for k in reference.state_dict())
    zero_shot = evaluate(tmp_path / "zero_shot", arch, weights, demo_root)
    checkpoint = evaluate(tmp_path / "checkpoint", arch, weights, demo_root, "--checkpoint", str(weights))
    assert checkpoint["weights"] == "checkpoint" and checkpoint["checkpoint"] == str(weights)
    assert {k: checkpoint[k] for k in METRIC_KEYS} == {k: zero_shot[k] for k in METRIC_KEYS}


# --- 6. fine-tuning as open_clip's trainer does


def test_no_decay_groups_hold_the_vectors_position_embeddings_and_logit_scale(
        tiny: tuple[Path, Path, nn.Module]) -> None:
    arch, weights, _ = tiny
    model = build_model(clip_config(arch, weights))
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {group["weight_decay"] > 0: {names[id(p)] for p in group["params"]}
               for group in parameter_groups(model, 1e-3, 0.1, 1.0)}
    expected = {n for n, p in model.named_parameters()
                if p.ndim < 2 or n in ("clip.visual.positional_embedding", "clip.positional_embedding")}
    assert {"clip.logit_scale", "clip.visual.class_embedding", "clip.ln_final.weight"} <= expected
    assert grouped[False] == expected
    assert grouped[True] == {n for n, _ in model.named_parameters()} - expected


@pytest.mark.parametrize("set_to, clamped", [(10.0, math.log(100)), (-1.0, 0.0), (2.0, 2.0)])
def test_forward_clamps_logit_scale_to_open_clips_range(set_to: float, clamped: float,
                                                       tiny: tuple[Path, Path, nn.Module]) -> None:
    arch, weights, _ = tiny
    model = build_model(clip_config(arch, weights))
    images, tokens = sample_inputs(model)
    with torch.no_grad():
        model.clip.logit_scale.fill_(set_to)
        out = model({"images": images, "text": tokens})
    assert model.clip.logit_scale.item() == pytest.approx(clamped)
    assert out["temp"].item() == pytest.approx(math.exp(-clamped))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny: tuple[Path, Path, nn.Module],
                                                                 demo_root: Path, tmp_path: Path) -> None:
    arch, weights, _ = tiny
    results = []
    for checkpointing in (False, True):
        config = clip_config(arch, weights, f"grad_checkpointing={str(checkpointing).lower()}",
                             *data_overrides(demo_root))
        model = build_model(config)
        assert model.clip.visual.transformer.grad_checkpointing is checkpointing
        assert model.clip.transformer.grad_checkpointing is checkpointing
        task, batch = train_batch(config, model, demo_root, tmp_path)
        loss = train_step(task, batch)["loss"]
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_bf16_autocast_trains_a_step_on_cpu(tiny: tuple[Path, Path, nn.Module], demo_root: Path,
                                           tmp_path: Path) -> None:
    arch, weights, _ = tiny
    config = clip_config(arch, weights, "precision=amp_bf16", *data_overrides(demo_root))
    task, batch = train_batch(config, build_model(config), demo_root, tmp_path)
    with autocast(config["precision"], CPU):
        losses = task(batch, epoch=0)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.requires_grad)


# --- 7. fisvl_clip


@pytest.mark.parametrize("prior", [True, False])
def test_fisvl_clip_before_training_embeds_as_clip(prior: bool, tiny: tuple[Path, Path, nn.Module]) -> None:
    arch, weights, _ = tiny
    plain = build_model(clip_config(arch, weights)).eval()
    fisvl = build_model(clip_config(arch, weights, f"fgis_prior={str(prior).lower()}", model="fisvl_clip")).eval()
    assert fisvl.use_prior is prior
    images, tokens = sample_inputs(plain)
    with torch.no_grad():
        assert torch.equal(fisvl.encode_image(images), plain.encode_image(images))
        assert torch.equal(fisvl.encode_text(tokens), plain.encode_text(tokens))


def test_fisvl_clip_without_fgis_is_exactly_clip(tiny: tuple[Path, Path, nn.Module]) -> None:
    arch, weights, _ = tiny
    plain = build_model(clip_config(arch, weights)).eval()
    fisvl = build_model(clip_config(arch, weights, "fgis=false", model="fisvl_clip")).eval()
    assert fisvl.state_dict().keys() == plain.state_dict().keys()
    images, tokens = sample_inputs(plain)
    with torch.no_grad():
        assert torch.equal(fisvl.encode_image(images), plain.encode_image(images))
        assert torch.equal(fisvl.encode_text(tokens), plain.encode_text(tokens))


@pytest.mark.parametrize("prior, sfgs", [(True, "off"), (True, "frozen"), (True, "trainable"), (False, "frozen")])
def test_fisvl_clip_ablations_build_and_train_a_step(prior: bool, sfgs: str, tiny: tuple[Path, Path, nn.Module],
                                                    demo_root: Path, tmp_path: Path) -> None:
    arch, weights, _ = tiny
    config = clip_config(arch, weights, f"fgis_prior={str(prior).lower()}", f"sfgs={sfgs}",
                         *data_overrides(demo_root), model="fisvl_clip")
    model = build_model(config)
    assert model.use_prior is prior
    assert (model.sfgs is not None) is (prior and sfgs != "off")
    task, batch = train_batch(config, model, demo_root, tmp_path)
    losses = train_step(task, batch)
    assert {"loss_contr", "loss_affil", "loss_scene"} <= set(losses)
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert {"clip", "token_proj", "img_gcn", "head_img"} <= trained
    assert ("sfgs" in trained) is (sfgs == "trainable" and prior)
    assert "conv_encoder" not in trained


def test_resnet_tower_builds_as_clip_but_not_as_fisvl_clip(tmp_path: Path) -> None:
    arch = arch_file(tmp_path, "tiny_rn", TINY_RN)
    model = build_model(clip_config(arch, None, "allow_random_init=[clip]", image_res=64)).eval()
    assert type(model.clip.visual).__name__ == "ModifiedResNet"
    with torch.no_grad():
        assert model.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, TINY_RN["embed_dim"])
    with pytest.raises(ArchitectureError, match="patch tokens"):
        build_model(clip_config(arch, None, model="fisvl_clip", image_res=64))


# --- 8. the paper-size model


def test_paper_size_vit_b_32_has_open_clips_parameter_count_and_context_length() -> None:
    config = clip_config("ViT-B-32-quickgelu", None, "allow_random_init=[clip]", image_res=224)
    model = build_model(config)
    assert sum(p.numel() for p in model.parameters()) == VIT_B_32_PARAMETERS
    assert model.quick_gelu and activations(model) == {QuickGELU} and model.embed_dim == 512
    assert model.text_processor.context_length == 77
    assert model.text_processor(CAPTIONS)["input_ids"].shape == (3, 77)


@pytest.mark.parametrize("name", ["Retrieval_rsitmd_clip", "Retrieval_rsicd_clip", "Retrieval_rsitmd_fisvl_clip"])
def test_the_paper_configs_build_the_paper_size_towers(name: str) -> None:
    """The shipped configs as a user runs them, their weight files replaced by random weights: ViT-B-32 with
    QuickGELU under every one, and FISVL on CLIP with its ResNet-50 prior, SFGS and two graph steps."""
    config = load_config(ROOT / "configs" / f"{name}.yaml",
                         ["clip_weights=null", "resnet_ckpt=null", "allow_random_init=[clip, conv_encoder]"])
    if config["model"] == "fisvl_clip":
        config["fgis_prior"] = True
    model = build_model(config)
    assert sum(p.numel() for p in model.clip.parameters()) == VIT_B_32_PARAMETERS and model.quick_gelu
    assert config["precision"] == "amp_bf16" and config["optimizer"]["weight_decay"] == 0.5
    if config["model"] == "fisvl_clip":
        assert model.use_prior and model.sfgs is not None and len(model.img_gcn) == 2
        assert model.conv_encoder.width == 2048 and model.token_proj.in_features == 768


# --- 9. the demos end to end
# The demo configs as a user runs them, on 20 training and 5 validation images per class and 2 epochs; the test
# split keeps its 200 images, so 5 x chance (13.25) stays far below a perfect score (the demo_root fixture's 20
# test images put chance near 25).
DEMO_SIZES = ("synthetic_data.train_per_class=20", "synthetic_data.val_per_class=5", "schedular.epochs=2")


def run_demo(name: str, tmp_path: Path, *overrides: str) -> tuple[list[dict], dict, float]:
    """configs/demo_<name>.yaml through the trainer, its data generated in ``tmp_path``: the epoch records, the
    summary and the test split's chance r_mean."""
    data, out = tmp_path / "data", tmp_path / "out"
    Retrieval.main(["--config", str(ROOT / "configs" / f"demo_{name}.yaml"), "--output_dir", str(out),
                    "--device", "cpu", f"synthetic_data.root={data}", *DEMO_SIZES, *data_files(data), *overrides])
    test = load_eval_annotations(str(data / "demo_test.json"), str(data / "images"), 30)
    return (*read_log(out), chance_metrics(test.img2txt, len(test.texts))["r_mean"])


def test_clip_demo_trains_far_above_chance(tmp_path: Path) -> None:
    epochs, summary, chance = run_demo("clip", tmp_path)
    assert [r["stage_name"] for r in epochs] == ["contrastive"] * 2
    assert float(epochs[-1]["train_loss_contr"]) < float(epochs[0]["train_loss_contr"])
    assert summary["test_at_best"]["r_mean"] > 5 * chance


def test_fisvl_clip_demo_trains_with_fisvls_stages_above_chance(tmp_path: Path) -> None:
    """FISVL's two stages (the switch moved to epoch 1): the scene-adaptive stage, then weighted captions."""
    epochs, summary, chance = run_demo("fisvl_clip", tmp_path, "stages.1.start_epoch=1")
    assert [r["stage_name"] for r in epochs] == ["con_aff_scene", "wcon_aff"]
    assert {"train_loss_contr", "train_loss_affil", "train_loss_scene"} <= set(epochs[0])
    assert {"train_loss_contr", "train_loss_affil"} <= set(epochs[1])
    run_log = (tmp_path / "out" / "run.log").read_text()
    assert "epoch 0: stage 'con_aff_scene' from epoch 0: contr x 1 + affil x 1 + scene x 1" in run_log
    assert "epoch 1: stage 'wcon_aff' from epoch 1: weighted contr x 1 + affil x 1" in run_log
    assert summary["test_at_best"]["r_mean"] > 5 * chance
