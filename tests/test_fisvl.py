"""FISVL: the paper configs and the paper-size model, the FGIS parts, which parameters train, the stage
schedule, the objective's bookkeeping, and training end to end through run.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from models import build_model
from models.fusion import SFGS, GraphReasoning
from models.losses import (AffiliationLoss, ContrastiveLoss, SceneAdaptiveLoss, affiliation_loss, contrastive_loss,
                           scene_adaptive_loss)
from models.objective import RetrievalObjective, Stage, build_objective
from models.task import RetrievalTask
from models.text import BertWordPieceProcessor
from scheduler import StageSchedule, parse_stages
from utils.config import ConfigError, load_config
from utils.metrics import chance_metrics

ROOT = Path(__file__).resolve().parents[1]
PAPER = {
    "rsitmd": {"batch_size_train": 128, "lr": 6e-5, "alpha_m": 2.0, "beta1": -0.0015, "beta2": 0.02,
               "deletion_rate": 0.03, "dataset_kind": "re_rsitmd", "affil_center_chunk": 128},
    "rsicd": {"batch_size_train": 135, "lr": 4e-5, "alpha_m": 0.95, "beta1": -0.002, "beta2": 0.02,
              "deletion_rate": 0.06, "dataset_kind": "re_rsicd", "affil_center_chunk": 135},
}
PAPER_STAGES = [(0, {"contr": 1.0, "affil": 1.0, "scene": 1.0}, False), (10, {"contr": 1.0, "affil": 1.0}, True)]


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def tiny_fisvl(path: Path, *overrides: str) -> torch.nn.Module:
    return build_model(load_config(path, list(overrides)), pretrained=False)


def tiny_batch(size: int = 4) -> dict[str, Any]:
    """A model's batch: ``images`` and ``text`` (what a text processor returns)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (size, 7), generator=generator)
    return {"images": torch.randn(size, 3, 32, 32, generator=generator),
            "text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}


# --- the paper's configs and model


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_hold_the_paper_settings(name: str) -> None:
    config = load_config(ROOT / "configs" / f"Retrieval_{name}.yaml")
    expected = PAPER[name]
    assert config["model"] == "fisvl" and config["embed_dim"] == 512 and config["img_gcn_step"] == 2
    assert config["dropout_r"] == 0.2 and config["schedular"]["epochs"] == 20 and config["image_res"] == 224
    assert config["optimizer"]["lr"] == pytest.approx(expected["lr"])
    for key in ("batch_size_train", "alpha_m", "beta1", "beta2", "deletion_rate", "dataset_kind",
                "affil_center_chunk"):
        assert config[key] == pytest.approx(expected[key]) if isinstance(expected[key], float) else \
            config[key] == expected[key], key
    assert (config["sfgs"], config["conv_bn_train_mode"], config["finetune_conv"]) == ("frozen", True, False)
    assert [(s.start_epoch, s.losses, s.caption_weights) for s in parse_stages(config)] == PAPER_STAGES


@pytest.fixture(scope="module")
def paper_config() -> dict[str, Any]:
    return load_config(ROOT / "configs" / "Retrieval_rsitmd.yaml")


@pytest.fixture(scope="module")
def paper_model(paper_config: dict[str, Any], demo_root: Path) -> torch.nn.Module:
    """The model owns its text processor; bert-base-uncased's folder is not here, so the demo vocabulary
    stands in (it changes no parameter)."""
    processor = BertWordPieceProcessor.from_folder(str(demo_root / "tokenizer"), paper_config["max_tokens"],
                                                   paper_config["max_words"])
    return build_model(paper_config, pretrained=False, text_processor=processor)


def test_paper_size_parameter_counts(paper_model: torch.nn.Module, paper_config: dict[str, Any]) -> None:
    """Trainable: Swin-T, BERT-base, four projections, two graph steps, two temperatures (the contrastive one
    in the model, the affiliation one in its loss). Frozen: ResNet-50 without its classifier, and SFGS."""
    swin, bert = 27_519_354, 108_891_648  # checked against timm and transformers in test_models.py
    heads = 2 * linear(768, 512) + linear(2048, 512) + linear(512, 512) + 2 * 3 * linear(512, 512) + 1
    resnet = sum(p.numel() for n, p in torchvision.models.resnet50().named_parameters() if not n.startswith("fc."))
    convs = 64 * 32 + 32 * 32 + 9 * 32 * 32 + 25 * 32 * 64 + 2 * (32 + 32 + 32 + 64)  # + BatchNorm scale/shift
    attention = 4 * linear(512, 512) + linear(512, 1024) + linear(1024, 512) + 2 * 2 * 512
    sfgs = convs + linear(256, 512) + attention + 128 * 512
    trainable = sum(p.numel() for p in paper_model.parameters() if p.requires_grad)
    frozen = {n.split(".")[0]: 0 for n, p in paper_model.named_parameters() if not p.requires_grad}
    for name, param in paper_model.named_parameters():
        if not param.requires_grad:
            frozen[name.split(".")[0]] += param.numel()
    assert trainable == swin + bert + heads
    objective = build_objective(paper_config, parse_stages(paper_config))
    temperatures = [(n, p.numel(), p.requires_grad) for n, p in objective.named_parameters()]
    assert temperatures == [("losses.affil.temp", 1, True)]
    assert frozen == {"conv_encoder": resnet, "sfgs": sfgs}
    assert resnet == 23_508_032 and sfgs == 2_363_712


def test_paper_model_embeds_a_single_image(paper_model: torch.nn.Module) -> None:
    """A batch of one works (the published ``squeeze()`` broke it) and embeddings are unit vectors."""
    paper_model.eval()
    with torch.no_grad():
        image = paper_model.encode_image(torch.randn(1, 3, 224, 224))
        text = paper_model.encode_text({"input_ids": torch.tensor([[101, 2023, 2003, 102]]),
                                        "attention_mask": torch.ones(1, 4, dtype=torch.long)})
    assert image.shape == text.shape == (1, 512)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(1))


# --- the FGIS parts


def test_graph_reasoning_is_the_sgr_formula() -> None:
    block = GraphReasoning(4).double()
    nodes = torch.randn(2, 5, 4, dtype=torch.float64)
    q, k, g = block.graph_query_w, block.graph_key_w, block.sim_graph_w
    edges = torch.softmax((nodes @ q.weight.T + q.bias) @ (nodes @ k.weight.T + k.bias).transpose(1, 2), dim=-1)
    expected = torch.relu((edges @ nodes) @ g.weight.T + g.bias)
    torch.testing.assert_close(block(nodes), expected)
    bound = (6 / (4 + 4)) ** 0.5
    for layer in (q, k, g):
        assert layer.bias.abs().max() == 0 and layer.weight.abs().max() <= bound


def test_sfgs_fusion_equals_the_published_weighted_map() -> None:
    """v_cl = mean over e of (W^T X)[e]: the published fusion, computed here as a weighted token sum."""
    sfgs = SFGS(64, 512, 0.2).eval()
    stem = torch.randn(2, 64, 56, 56)
    with torch.no_grad():
        filtered = sfgs.conv_filter(stem)
        tokens = torch.cat([branch(filtered).flatten(2) for branch in sfgs.branches], 1)
        assert tokens.shape == (2, 128, 256)
        mixed = sfgs.attention(sfgs.token_proj(tokens))
        published = (sfgs.fusion_weight.T.unsqueeze(0) @ mixed).mean(1)
        torch.testing.assert_close(sfgs(stem), published, rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_trainable_parts_and_never_the_frozen_ones(tiny_fisvl_config_path: Path) -> None:
    """Through the paper's first-stage losses: every trainable parameter, the affiliation loss's temperature
    included, gets a gradient; the frozen CNN and SFGS get none."""
    config = load_config(tiny_fisvl_config_path)
    model = build_model(config, pretrained=False).train()
    task = RetrievalTask(model, build_objective(config, parse_stages(config)))
    batch = {**tiny_batch(), "image_idx": torch.tensor([0, 0, 1, 2]), "label": torch.tensor([0, 0, 1, 0]),
             "caption_weight": torch.tensor([1.0, 0.95, 1.0, 1.0])}
    assert set(task.sample_fields) <= set(batch)
    task(batch, epoch=0)["loss"].backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("conv_encoder.", "sfgs.")) for n in frozen)
    assert {n.split(".")[0] for n in frozen} == {"conv_encoder", "sfgs"}
    for name, param in model.named_parameters():
        assert (param.grad is None) == (name in frozen), name
    assert task.objective.losses["affil"].temp.grad is not None


@pytest.mark.parametrize("override, trainable_prefixes, absent", [
    ("sfgs=trainable", ("sfgs.",), ()),
    ("finetune_conv=true", ("conv_encoder.",), ()),
    ("sfgs=off", (), ("sfgs.",)),
    ("fgis=false", (), ("conv_encoder.", "sfgs.", "img_gcn.", "head_img.", "conv_proj.")),
    ("img_gcn_step=0", (), ("img_gcn.",)),
])
def test_ablation_switches(tiny_fisvl_config_path: Path, override: str, trainable_prefixes: tuple[str, ...],
                           absent: tuple[str, ...]) -> None:
    model = tiny_fisvl(tiny_fisvl_config_path, override).train()
    names = dict(model.named_parameters())
    assert not any(n.startswith(absent) for n in names) if absent else True
    for prefix in trainable_prefixes:
        assert all(p.requires_grad for n, p in names.items() if n.startswith(prefix))
    out = model(tiny_batch())
    (out["image_feat"] @ out["text_feat"].T).sum().backward()
    for name, param in names.items():
        if name.startswith(trainable_prefixes):
            assert param.grad is not None, name
    torch.testing.assert_close(out["image_feat"].norm(dim=-1), torch.ones(4))


def test_fgis_off_is_the_plain_dual_encoder_image_side(tiny_fisvl_config_path: Path) -> None:
    model = tiny_fisvl(tiny_fisvl_config_path, "fgis=false").eval()
    images = tiny_batch()["images"]
    tokens = model.vision_encoder.forward_tokens(images)
    expected = torch.nn.functional.normalize(model.vision_proj(tokens[:, 0]), dim=-1)
    torch.testing.assert_close(model.encode_image(images), expected)


def test_frozen_cnn_batchnorm_as_published_or_in_eval_mode(tiny_fisvl_config_path: Path) -> None:
    """As published, train() lets the frozen CNN's BatchNorm statistics drift; the clean option keeps them."""
    for override, drifts in (("conv_bn_train_mode=true", True), ("conv_bn_train_mode=false", False)):
        model = tiny_fisvl(tiny_fisvl_config_path, override).train()
        before = model.conv_encoder.bn1.running_mean.clone()
        sfgs_before = model.sfgs.conv_filter[1].running_mean.clone()
        model(tiny_batch())
        assert (not torch.equal(before, model.conv_encoder.bn1.running_mean)) == drifts, override
        assert (not torch.equal(sfgs_before, model.sfgs.conv_filter[1].running_mean)) == drifts, override
        assert model.vision_encoder.training and model.conv_encoder.training == drifts


def test_published_init_copies_the_graph_step_and_initialises_sfgs_as_the_published_resnet(
        tiny_fisvl_config_path: Path) -> None:
    """``init: published``: both graph steps start identical (the published ``clones()``), SFGS's convolutions
    have kaiming-normal fan-out statistics (std sqrt(2 / (out_channels * k^2))) and its attention projections
    nn.Linear's (|w| <= 1 / sqrt(d), non-zero biases). The default keeps independent steps, torch's default
    conv init and nn.MultiheadAttention's zero biases."""
    torch.manual_seed(0)
    published = tiny_fisvl(tiny_fisvl_config_path, "init=published")
    torch.manual_seed(0)
    default = tiny_fisvl(tiny_fisvl_config_path)
    steps = [step.state_dict() for step in published.img_gcn]
    assert len(steps) == 2 and all(torch.equal(steps[0][k], steps[1][k]) for k in steps[0])
    assert not torch.equal(default.img_gcn[0].graph_query_w.weight, default.img_gcn[1].graph_query_w.weight)
    convs = [published.sfgs.conv_filter[0]] + [branch[0] for branch in published.sfgs.branches]
    for conv, default_conv in zip(convs, [default.sfgs.conv_filter[0]] + [b[0] for b in default.sfgs.branches]):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        std = (2 / fan_out) ** 0.5
        assert conv.weight.std().item() == pytest.approx(std, rel=0.1) and abs(conv.weight.mean().item()) < 0.1 * std
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]  # torch's default: U(+-1/sqrt(fan_in))
        assert default_conv.weight.std().item() == pytest.approx((1 / (3 * fan_in)) ** 0.5, rel=0.1)
    attention, default_attention = published.sfgs.attention.self_attn, default.sfgs.attention.self_attn
    bound = 1 / attention.embed_dim ** 0.5
    assert attention.in_proj_weight.abs().max() <= bound < default_attention.in_proj_weight.abs().max()
    for bias in (attention.in_proj_bias, attention.out_proj.bias):
        assert (bias != 0).all() and bias.abs().max() <= bound
    assert default_attention.in_proj_bias.abs().max() == 0 and default_attention.out_proj.bias.abs().max() == 0
    assert all(torch.equal(a, b) for a, b in zip(published.conv_encoder.state_dict().values(),
                                                 default.conv_encoder.state_dict().values()))


# --- the stage schedule


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def base_yaml(tiny_config_path: Path) -> str:
    return tiny_config_path.read_text(encoding="utf-8")


def test_published_fisvl_keys_give_the_two_published_stages(tiny_config_path: Path, tmp_path: Path) -> None:
    text = base_yaml(tiny_config_path).replace("epochs: 3", "epochs: 20") + (
        "use_affil_loss: true\ncenter_factor: 1\nuse_scene_loss: true\nscene_factor: 1\n"
        "alpha_m: 2\nbeta1: -0.0015\nbeta2: 0.02\n")
    config = load_config(write(tmp_path, text))
    assert config["model"] == "fisvl"  # FISVL's own YAMLs name no model
    assert [(s.start_epoch, s.losses, s.caption_weights) for s in parse_stages(config)] == PAPER_STAGES
    pir = parse_stages(load_config(write(tmp_path, base_yaml(tiny_config_path) + "use_affil_loss: true\n")))
    assert [(s.start_epoch, s.losses) for s in pir] == [(0, {"contr": 1.0, "affil": 1.0})]


@pytest.mark.parametrize("stages, extra, message", [
    ("[{start_epoch: 0, losses: {contr: 1, scnee: 1}}]", "", "unknown loss 'scnee' (did you mean 'scene'?)"),
    ("[{start_epoch: 1, losses: {contr: 1}}]", "", "must start with a stage at start_epoch 0"),
    ("[{start_epoch: 0, losses: {contr: 1}}, {start_epoch: 0, losses: {affil: 1}}]", "", "not after stage"),
    ("[{start_epoch: 0, losses: {contr: -1}}]", "", "expected a weight >= 0"),
    ("[{start_epoch: 0, losses: {contr: 1}, caption_weight: true}]", "", "did you mean 'caption_weights'"),
    ("[{start_epoch: 0, losses: {contr: 1, scene: 1}}]", "", "the scene loss needs ['alpha_m', 'beta1', 'beta2']"),
    ("[{start_epoch: 0, losses: {contr: 1}}]", "use_affil_loss: true\n", "both choose the losses"),
])
def test_bad_stages_are_errors_that_say_what_is_wrong(tiny_config_path: Path, tmp_path: Path, stages: str,
                                                      extra: str, message: str) -> None:
    path = write(tmp_path, base_yaml(tiny_config_path) + f"stages: {stages}\n" + extra)
    with pytest.raises(ConfigError) as error:
        parse_stages(load_config(path), str(path))
    assert message in str(error.value) and str(path) in str(error.value)


def test_the_switch_epoch_is_one_override(tiny_fisvl_config_path: Path) -> None:
    stages = parse_stages(load_config(tiny_fisvl_config_path, ["stages.1.start_epoch=1"]))
    assert [s.start_epoch for s in stages] == [0, 1]


def test_stage_schedule_walks_start_epochs_and_plateaus() -> None:
    stages = [Stage("a", 0, {"contr": 1.0}), Stage("b", 5, {"contr": 1.0}, True), Stage("c", 9, {"affil": 1.0})]
    fixed = StageSchedule(stages)
    assert [fixed.stage_for_epoch(e).name for e in range(11)] == list("aaaaabbbbcc")
    plateau = StageSchedule(stages, patience=2)
    names = []
    for epoch, metric in enumerate([1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3]):  # no gain after epoch 1: a -> b at 4
        names.append(plateau.stage_for_epoch(epoch).name)
        plateau.observe(epoch, metric)
    assert "".join(names) == "aaaabbbcccc"  # b plateaus after 4 (best) + 2, so c starts at 7, before its 9
    resumed = StageSchedule(stages, patience=2)
    resumed.load_state_dict(plateau.state_dict())
    assert resumed.current.name == "c" and resumed.varies("affil") and not resumed.varies("scene")
    assert not StageSchedule(stages[:2]).varies("contr")


# --- the objective


def test_objective_computes_every_term_and_weights_the_active_stage() -> None:
    torch.manual_seed(0)
    features = {"image_feat": torch.nn.functional.normalize(torch.randn(6, 8), dim=-1).requires_grad_(),
                "text_feat": torch.nn.functional.normalize(torch.randn(6, 8), dim=-1).requires_grad_(),
                "temp": torch.tensor(0.07)}
    batch = {"image_idx": torch.tensor([0, 0, 1, 2, 3, 3]), "label": torch.tensor([0, 0, 1, 0, 1, 1]),
             "caption_weight": torch.tensor([1.0, 0.95, 1.0, 0.95, 1.0, 1.0])}
    config = {"soft_target_eps": 6e-5, "temp2": 0.05, "affil_symmetric": False, "affil_center_chunk": 0,
              "scene_mode": "published", "alpha_m": 2.0, "beta1": -0.0015, "beta2": 0.02}
    objective = RetrievalObjective({"contr": ContrastiveLoss(config), "affil": AffiliationLoss(config),
                                    "scene": SceneAdaptiveLoss(config)}, gather_with_grad=True, local_loss=True)
    assert objective.sample_fields == ("image_idx", "caption_weight", "label")
    objective.set_stage(Stage("wcon_aff", 10, {"contr": 1.0, "affil": 0.5}, caption_weights=True))
    out = objective(features, batch, epoch=12)
    v, t = features["image_feat"], features["text_feat"]
    weighted = contrastive_loss(v, t, batch["image_idx"], 0.07, batch["caption_weight"])
    affil = affiliation_loss(v, t, batch["label"], 0.05)
    torch.testing.assert_close(out["loss_contr"], weighted)
    torch.testing.assert_close(out["loss"], weighted + 0.5 * affil)
    scene = scene_adaptive_loss(v, t, batch["image_idx"], batch["label"], 0.07, 12, 2.0, -0.0015, 0.02)
    torch.testing.assert_close(out["loss_scene"], scene)
    assert not out["loss_scene"].requires_grad and out["loss"].requires_grad  # logged, not trained
    out["loss"].backward()  # the affiliation temperature (tau_2) trains: the loss owns it
    assert objective.losses["affil"].temp.grad is not None


# --- end to end


def test_fisvl_demo_trains_far_above_chance_and_logs_the_stage_switch(tmp_path: Path) -> None:
    """configs/demo_fisvl.yaml (shortened to 4 epochs, the switch at epoch 2, 50 training images per class)
    through run.py, data in tmp_path."""
    data, out = tmp_path / "data", tmp_path / "out"
    paths = [f"synthetic_data.root={data}", "synthetic_data.train_per_class=50", f"train_file=[{data}/demo_train.json]",
             f"val_file={data}/demo_val.json",
             f"test_file={data}/demo_test.json", f"image_root={data}/images", f"text_encoder={data}/tokenizer"]
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "--output_dir", str(out), "--dist", "cpu", *paths,
                             "schedular.epochs=4", "stages.1.start_epoch=2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    epochs, summary = lines[:-1], lines[-1]
    assert [r["stage_name"] for r in epochs] == ["con_aff_scene"] * 2 + ["wcon_aff"] * 2
    assert all({"train_loss_contr", "train_loss_affil", "train_loss_scene"} <= set(r) for r in epochs)
    assert float(epochs[0]["train_loss_scene"]) == pytest.approx(1.0, abs=1e-3)  # the published telltale
    run_log = (out / "run.log").read_text()
    assert run_log.count("stage 'con_aff_scene' from epoch 0") == 1
    assert run_log.count("epoch 2: stage 'wcon_aff' from epoch 2: weighted contr x 1 + affil x 1") == 1
    chance = chance_metrics([list(range(5 * i, 5 * i + 5)) for i in range(200)], 1000)["r_mean"]
    assert summary["test_at_best"]["r_mean"] > 5 * chance
    last = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert last["stage_schedule"]["index"] == 1  # --resume continues in the right stage
