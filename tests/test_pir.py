"""PIR: VIR and LCA against references written from the published code (models/pir.py of jaychempan/PIR), the
paper configs and the paper-size model, PIR's losses as settings of the registered ones, the released checkpoint
layout through ``run.py --evaluate``, the published initialisation, and the demo end to end."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models import build_model
from models.fusion import MHSA, CroSA
from models.loading import load_for_evaluation
from models.losses import affiliation_loss, contrastive_loss, triplet_loss
from models.objective import build_objective
from models.text import BertWordPieceProcessor
from scheduler import parse_stages
from test_config import PIR_YAML
from test_weights import assert_same_tensors, official_buffers, randomise_, to_official_swin
from utils.config import ConfigError, load_config
from utils.metrics import chance_metrics

ROOT = Path(__file__).resolve().parents[1]
PIR_KEYS = """\
model: pir
conv_arch: resnet18
filter_size: 10
instru_num: 2
cycle_num: 3
head: 4
stages:
  - {name: contr_affil, start_epoch: 0, losses: {contr: 1, affil: 1}}
soft_target_eps: 0
"""
SEQUENTIAL = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
BLOCKS = ("mapping_img", "mapping_txt", "img_sa", "img_ca", "txt_sa", "txt_ca")


@pytest.fixture(scope="module")
def tiny_pir_config_path(tiny_config_path: Path) -> Path:
    """The tiny config (32-pixel Swin: 17 tokens, 32-d embeddings) as PIR: a ResNet-18 prior, VIR keeping 10
    tokens in 2 steps, LCA in 3 steps, 4 heads, PIR's losses."""
    path = tiny_config_path.with_name("tiny_pir.yaml")
    path.write_text(tiny_config_path.read_text(encoding="utf-8") + PIR_KEYS, encoding="utf-8")
    return path


def tiny_pir(path: Path, *overrides: str) -> nn.Module:
    return build_model(load_config(path, list(overrides)), pretrained=False)


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


# --- the published blocks, written from PIR's models/pir.py (inference: its dropouts are identities in eval)


class PublishedMHAtt(nn.Module):
    def __init__(self, dim: int, head: int) -> None:
        super().__init__()
        self.dim, self.head = dim, head
        self.linear_v, self.linear_k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.linear_q, self.linear_merge = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, v, k, q, mask=None):
        bs = q.size(0)
        v = self.linear_v(v).view(bs, -1, self.head, self.dim // self.head).transpose(1, 2)
        k = self.linear_k(k).view(bs, -1, self.head, self.dim // self.head).transpose(1, 2)
        q = self.linear_q(q).view(bs, -1, self.head, self.dim // self.head).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(mask, -1e9)
        atted = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.linear_merge(atted.transpose(1, 2).contiguous().view(bs, -1, self.dim))


def build_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim * 2), nn.LayerNorm(dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))


class PublishedMHSA(nn.Module):
    def __init__(self, dim: int, head: int) -> None:
        super().__init__()
        self.mhatt, self.ffn = PublishedMHAtt(dim, head), build_mlp(dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, x_mask=None):
        x = self.norm1(x + self.mhatt(x, x, x, x_mask))
        return self.norm2(x + self.ffn(x))


class PublishedCroSA(nn.Module):
    def __init__(self, dim: int, head: int) -> None:
        super().__init__()
        self.mhatt_cross, self.ffn = PublishedMHAtt(dim, head), build_mlp(dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, y, x_mask=None, y_mask=None):
        y = self.norm1(y + self.mhatt_cross(y, y, x, y_mask))
        return self.norm2(y + self.ffn(y))


class PublishedPIR(nn.Module):
    """PIRBase's heads with its module names; the ResNet as the published ``nn.Sequential`` of its children."""

    def __init__(self, dim: int, head: int, instru_num: int, cycle_num: int) -> None:
        super().__init__()
        self.conv_encoder = nn.Sequential(*list(torchvision.models.resnet18(num_classes=30).children())[:-1])
        self.vision_proj, self.text_proj = nn.Linear(64, dim), nn.Linear(32, dim)
        self.conv_proj = nn.Linear(512, dim)
        self.mapping_img = nn.ModuleList(nn.Linear(dim, dim) for _ in range(instru_num))
        self.mapping_txt = nn.ModuleList(nn.Linear(dim, dim) for _ in range(cycle_num))
        self.head_img, self.head_txt = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.img_sa = nn.ModuleList(PublishedMHSA(dim, head) for _ in range(instru_num))
        self.img_ca = nn.ModuleList(PublishedCroSA(dim, head) for _ in range(instru_num))
        self.txt_sa = nn.ModuleList(PublishedMHSA(dim, head) for _ in range(cycle_num))
        self.txt_ca = nn.ModuleList(PublishedCroSA(dim, head) for _ in range(cycle_num))

    def get_vision_fusion_embeds(self, swin_tokens, image, filter_size, instru_num, order=None):
        """``get_vision_fusion_embeds`` with its per-sample loop; ``order`` replaces the belief ranking."""
        swin_feat = self.vision_proj(swin_tokens)
        conv_feat = self.conv_proj(self.conv_encoder(image).squeeze()).unsqueeze(dim=1)
        image_g_emb = swin_feat[:, 0, :]
        swin_feat_loc = swin_feat[:, 0:50, :]
        score_feat = F.softmax(torch.matmul(swin_feat_loc, conv_feat.transpose(-2, -1)).squeeze(), dim=-1)
        sorted_fscore, sorted_ind = torch.sort(score_feat, dim=1, descending=True)
        sorted_ind = sorted_ind if order is None else order
        swin_feat_fi_ = []
        for i in range(swin_feat_loc.shape[0]):
            swin_feat_fi_.append(torch.index_select(swin_feat_loc[i, :, :], 0, sorted_ind[i]).unsqueeze(dim=0))
        swin_feat_fi = torch.cat(swin_feat_fi_, dim=0)[:, :filter_size, :]
        conv_feats = conv_feat.expand(swin_feat_fi.shape)
        for i in range(instru_num):
            swin_att = self.img_sa[i](swin_feat_fi)
            swin_inst = self.img_ca[i](self.mapping_img[i](conv_feats), swin_att)
            swin_feat_fi = swin_inst
        return F.normalize(image_g_emb + self.head_img(swin_inst[:, 0, :]))

    def get_text_fusion_embeds(self, bert_tokens, cycle_num, mask=None):
        """``get_text_fusion_embeds``; ``mask`` ([B, 1, 1, L], True at [PAD]) goes to the blocks' own mask
        arguments, which the published call leaves empty."""
        text_feat = self.text_proj(bert_tokens)
        text_g_emb = text_feat[:, 0, :]
        text_l_embs = text_feat[:, 0:text_feat.shape[1], :]
        for i in range(cycle_num):
            text_att = self.txt_sa[i](text_l_embs, mask)
            text_l_embs = self.txt_ca[i](self.mapping_txt[i](text_l_embs), text_att, None, mask)
        return F.normalize(text_g_emb + self.head_txt(text_l_embs[:, 0, :]))


def published_twin(model: nn.Module, config: dict[str, Any]) -> PublishedPIR:
    """The published modules holding ``model``'s weights, loaded strictly: every name must be PIR's."""
    reference = PublishedPIR(config["embed_dim"], config["head"], config["instru_num"], config["cycle_num"])
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("vision_encoder.", "text_encoder.", "conv_encoder.", "temp"))}
    for key, value in model.conv_encoder.state_dict().items():
        first, rest = key.split(".", 1)
        state[f"conv_encoder.{SEQUENTIAL[first]}.{rest}"] = value
    reference.load_state_dict(state)
    return reference.to(next(model.parameters()).dtype).eval()


@pytest.fixture(scope="module")
def random_pir(tiny_pir_config_path: Path) -> tuple[nn.Module, dict[str, Any]]:
    config = load_config(tiny_pir_config_path)
    torch.manual_seed(0)
    return randomise_(build_model(config, pretrained=False), 3).double().eval(), config


def padded_text() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_vir_equals_the_published_per_sample_loop(random_pir: tuple[nn.Module, dict[str, Any]]) -> None:
    """Belief ranking by a gather instead of the published loop of ``index_select``: the same embeddings; a
    ranking other than the belief's gives other ones, so the check discriminates."""
    model, config = random_pir
    reference = published_twin(model, config)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        tokens = model.vision_encoder.forward_tokens(images)
        assert tokens.shape[1] == 17 and config["filter_size"] == 10
        expected = reference.get_vision_fusion_embeds(tokens, images, 10, 2)
        torch.testing.assert_close(model.encode_image(images), expected)
        unranked = reference.get_vision_fusion_embeds(tokens, images, 10, 2, order=torch.arange(17).expand(3, 17))
        assert not torch.allclose(unranked, expected, rtol=1e-3, atol=1e-3)


def test_lca_with_the_published_options_equals_the_published_code(tiny_pir_config_path: Path) -> None:
    """``text_attention_mask: false`` and ``lca_padding_mask: false``: BERT and LCA attend to [PAD] as published,
    so a padded caption's embedding depends on its padding."""
    config = load_config(tiny_pir_config_path, ["text_attention_mask=false", "lca_padding_mask=false"])
    torch.manual_seed(0)
    model = randomise_(build_model(config, pretrained=False), 3).double().eval()
    reference = published_twin(model, config)
    text = padded_text()
    with torch.no_grad():
        expected = reference.get_text_fusion_embeds(model.text_encoder.forward_tokens(text["input_ids"], None), 3)
        torch.testing.assert_close(model.encode_text(text), expected)
        alone = model.encode_text({k: v[:1, :5] for k, v in text.items()})
        assert not torch.allclose(alone[0], expected[0], rtol=1e-4, atol=1e-4)


def test_lca_with_masks_equals_the_published_blocks_given_their_masks(
        random_pir: tuple[nn.Module, dict[str, Any]]) -> None:
    """The default: BERT gets its attention mask and every LCA block the padding mask (the published blocks'
    own mask arguments), so a caption's embedding is the same alone or padded in a batch."""
    model, config = random_pir
    assert config["text_attention_mask"] and config["lca_padding_mask"]
    reference = published_twin(model, config)
    text = padded_text()
    with torch.no_grad():
        tokens = model.text_encoder.forward_tokens(text["input_ids"], text["attention_mask"])
        expected = reference.get_text_fusion_embeds(tokens, 3, (text["attention_mask"] == 0)[:, None, None, :])
        got = model.encode_text(text)
        torch.testing.assert_close(got, expected)
        alone = model.encode_text({k: v[:1, :5] for k, v in text.items()})
        torch.testing.assert_close(alone[0], got[0])


def test_blocks_are_post_norm_with_dropout_in_training(random_pir: tuple[nn.Module, dict[str, Any]]) -> None:
    """``dropout_r`` acts on attention maps and both residual branches in training, not in evaluation."""
    model, _ = random_pir
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    for block in (MHSA(32, 4, 0.5).double(), CroSA(32, 4, 0.5).double()):
        args = (x,) if isinstance(block, MHSA) else (x.flip(1), x)
        block.eval()
        torch.testing.assert_close(block(*args), block(*args))
        block.train()
        assert not torch.allclose(block(*args), block(*args))
    assert [type(m).__name__ for m in model.img_sa[0].ffn] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert model.img_sa[0].ffn[0].weight.shape == (64, 32) and model.img_sa[0].ffn[1].weight.shape == (64,)


# --- the published initialisation: every step a copy of one block


@pytest.mark.parametrize("init", ["default", "published"])
def test_published_init_starts_every_step_equal(tiny_pir_config_path: Path, init: str) -> None:
    model = tiny_pir(tiny_pir_config_path, f"init={init}")
    for name in BLOCKS:
        states = [step.state_dict() for step in getattr(model, name)]
        assert len(states) == (2 if "img" in name else 3)
        same = all(torch.equal(states[0][k], state[k]) for state in states[1:] for k in states[0])
        assert same == (init == "published"), name


# --- configs


@pytest.mark.parametrize("name", ["rsitmd", "rsicd"])
def test_paper_configs_hold_the_published_settings(name: str) -> None:
    """baselines.md §1.6: 128 per GPU x 2, AdamW 6e-5, linear, 50 epochs, 47 tokens, X-VLM's RandomAugment
    pipeline, filter 40, 2 VIR and 3 LCA steps, 8 heads, dropout 0.2, 512-d; PIR's exact targets (no
    epsilon) and per-128 affiliation centres in any process layout."""
    import run

    path = ROOT / "configs" / f"Retrieval_{name}_pir.yaml"
    config = load_config(path)
    assert run.TASKS[f"itr_{name}_pir"] == f"configs/Retrieval_{name}_pir.yaml"
    expected = {"model": "pir", "batch_size_train": 128, "max_tokens": 47, "dataset_kind": "re_rsitmd",
                "filter_size": 40, "instru_num": 2, "cycle_num": 3, "head": 8, "dropout_r": 0.2, "embed_dim": 512,
                "soft_target_eps": 0.0, "affil_center_chunk": 128, "image_res": 224, "conv_arch": "resnet50",
                "finetune_conv": False, "conv_bn_train_mode": True, "deletion_rate": 0.0}
    assert {key: config[key] for key in expected} == expected
    assert config["optimizer"]["lr"] == pytest.approx(6e-5) and config["optimizer"]["weight_decay"] == 0.01
    assert (config["schedular"]["sched"], config["schedular"]["epochs"]) == ("linear", 50)
    assert config["train_file"] == [f"data/finetune/{name}_train.json"]
    assert [(s.start_epoch, s.losses) for s in parse_stages(config)] == [(0, {"contr": 1.0, "affil": 1.0})]
    triplet = load_config(path, ["stages=[{name: triplet, start_epoch: 0, losses: {triplet: 1}}]"])
    assert [(s.start_epoch, s.losses) for s in parse_stages(triplet)] == [(0, {"triplet": 1.0})]


def test_pirs_own_yaml_is_pir_and_use_triplet_loss_selects_the_triplet_loss(tmp_path: Path) -> None:
    """PIR's YAML names no model: its PAE keys make it PIR (is_baseline: True, the plain baseline);
    ``use_triplet_loss: true`` replaces every other loss, and asking for it with the affiliation loss is an
    error, where PIR's code would silently keep the affiliation loss."""
    def config(text: str) -> dict[str, Any]:
        path = tmp_path / "pir.yaml"
        path.write_text(text, encoding="utf-8")
        return load_config(path)

    published = config(PIR_YAML)
    assert published["model"] == "pir"
    assert [(s.start_epoch, s.losses) for s in parse_stages(published)] == [(0, {"contr": 1.0, "affil": 1.0})]
    assert config(PIR_YAML.replace("is_baseline: False", "is_baseline: True"))["model"] == "swin_bert_cl"
    triplet = config(PIR_YAML.replace("use_triplet_loss: False", "use_triplet_loss: True")
                     .replace("use_affil_loss: True", "use_affil_loss: False"))
    assert [(s.start_epoch, s.losses) for s in parse_stages(triplet)] == [(0, {"triplet": 1.0})]
    both = config(PIR_YAML.replace("use_triplet_loss: False", "use_triplet_loss: True"))
    with pytest.raises(ConfigError, match=r"use_triplet_loss replaces every other loss, but \['use_affil_loss'\]"):
        parse_stages(both, "pir.yaml")


def test_filter_size_must_fit_the_vision_tokens(tiny_pir_config_path: Path) -> None:
    with pytest.raises(ValueError, match="filter_size 18 must be between 1 and the 17 image tokens"):
        tiny_pir(tiny_pir_config_path, "filter_size=18")


def test_paper_size_parameter_counts(demo_root: Path) -> None:
    """Trainable: Swin-T, BERT-base, the three projections, the contrastive temperature, the 5 mappings, the
    2 heads and the 10 PAE blocks (4 VIR, 6 LCA); the affiliation temperature is its loss's. Frozen: ResNet-50
    without its classifier."""
    config = load_config(ROOT / "configs" / "Retrieval_rsitmd_pir.yaml")
    processor = BertWordPieceProcessor.from_folder(str(demo_root / "tokenizer"), config["max_tokens"],
                                                   config["max_words"])
    model = build_model(config, pretrained=False, text_processor=processor)
    swin, bert = 27_519_354, 108_891_648  # checked against timm and transformers in test_models.py
    projections = 2 * linear(768, 512) + linear(2048, 512)
    block = 4 * linear(512, 512) + linear(512, 1024) + 2 * 1024 + linear(1024, 512) + 2 * 2 * 512
    fusion = (2 + 3) * linear(512, 512) + 2 * linear(512, 512) + (2 * 2 + 2 * 3) * block
    resnet = sum(p.numel() for n, p in torchvision.models.resnet50().named_parameters() if not n.startswith("fc."))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable == swin + bert + projections + 1 + fusion
    assert frozen == {"conv_encoder"} and sum(p.numel() for p in model.conv_encoder.parameters()) == resnet
    assert (trainable, resnet, fusion) == (161_134_459, 23_508_032, 22_886_912)
    objective = build_objective(config, parse_stages(config))
    assert [(n, p.numel()) for n, p in objective.named_parameters()] == [("losses.affil.temp", 1)]
    model.eval()
    with torch.no_grad():  # a batch of one: the published squeeze() of the pooled CNN map broke it
        image = model.encode_image(torch.randn(1, 3, 224, 224))
        text = model.encode_text({"input_ids": torch.tensor([[101, 2023, 2003, 102]]),
                                  "attention_mask": torch.ones(1, 4, dtype=torch.long)})
    assert image.shape == text.shape == (1, 512)


# --- PIR's losses: settings of the registered ones


def published_contr(image_feat, text_feat, idx, temp):
    """``get_contr_loss`` on one process: multi-positive targets pos_idx / pos_idx.sum(1), no epsilon."""
    logits = image_feat @ text_feat.t() / temp
    idx = idx.view(-1, 1)
    pos_idx = torch.eq(idx, idx.t()).float().to(logits.dtype)
    labels = pos_idx / pos_idx.sum(dim=1, keepdim=True)
    loss_i2t = -torch.sum(F.log_softmax(logits, dim=1) * labels, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(logits.t(), dim=1) * labels, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def published_affil(image_feat, text_feat, label, temp2):
    """``get_affil_loss`` on one process, its per-row loop of exact 0/1 label masks included."""
    la_idx = torch.eq(label.unsqueeze(dim=1), label.unsqueeze(dim=1).t()).to(image_feat.dtype)
    img_centers, txt_centers = [], []
    for i in range(image_feat.shape[0]):
        mod = la_idx[i].unsqueeze(dim=1)
        mask = mod.repeat(1, image_feat.shape[1])
        non_zero_num = torch.sum(mod, dim=0)
        img_centers.append((image_feat * mask).sum(dim=0, keepdim=True) / non_zero_num)
        txt_centers.append((text_feat * mask).sum(dim=0, keepdim=True) / non_zero_num)
    img2txt_center = image_feat @ torch.cat(txt_centers).t() / temp2
    txt2img_center = text_feat @ torch.cat(img_centers).t() / temp2
    labels = torch.eye(img2txt_center.shape[0], dtype=image_feat.dtype)
    loss_i2t = -torch.sum(F.log_softmax(img2txt_center, dim=1) * labels, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(txt2img_center.t(), dim=1) * labels, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def published_triplet(image_feat, text_feat, margin=0.2):
    """``get_triplet_loss`` on one process: only the diagonal is masked."""
    scores = image_feat @ text_feat.t()
    diagonal = scores.diag().view(scores.shape[0], 1)
    cost_s = (margin + scores - diagonal.expand_as(scores)).clamp(min=0)
    cost_im = (margin + scores - diagonal.t().expand_as(scores)).clamp(min=0)
    eye = torch.eye(scores.size(0)) > .5
    return cost_s.masked_fill_(eye, 0).sum() + cost_im.masked_fill_(eye, 0).sum()


def loss_batch(ids: list[int], labels: list[int]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(6)
    v = F.normalize(torch.randn(len(ids), 16, generator=gen, dtype=torch.float64), dim=-1)
    t = F.normalize(v + torch.randn(len(ids), 16, generator=gen, dtype=torch.float64), dim=-1)
    return v, t, torch.tensor(ids), torch.tensor(labels)


def test_soft_target_eps_zero_gives_pirs_exact_targets() -> None:
    """``soft_target_eps: 0`` (the PIR configs): the contrastive loss with PIR's multi-positive targets and the
    affiliation loss with its exact 0/1 label mask; the default epsilon differs from both."""
    v, t, ids, labels = loss_batch([0, 0, 1, 2, 2, 3, 4, 4], [0, 0, 1, 0, 0, 1, 2, 2])
    torch.testing.assert_close(contrastive_loss(v, t, ids, 0.07, eps=0.0), published_contr(v, t, ids, 0.07))
    torch.testing.assert_close(affiliation_loss(v, t, labels, 0.05, eps=0.0), published_affil(v, t, labels, 0.05))
    assert contrastive_loss(v, t, ids, 0.07) != pytest.approx(published_contr(v, t, ids, 0.07).item(), rel=1e-9)
    assert affiliation_loss(v, t, labels, 0.05) != pytest.approx(published_affil(v, t, labels, 0.05).item(), rel=1e-9)


def test_triplet_loss_equals_the_published_one_when_every_caption_has_its_own_image() -> None:
    """With several captions of one image the published loss counts them as negatives of each other; here
    they are not."""
    v, t, _, _ = loss_batch(list(range(8)), [0] * 8)
    torch.testing.assert_close(triplet_loss(v @ t.T, torch.arange(8)), published_triplet(v, t))
    shared = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])
    assert triplet_loss(v @ t.T, shared) < published_triplet(v, t)


# --- released checkpoints


def to_released_pir(model: nn.Module) -> dict[str, torch.Tensor]:
    """A PIR state dict as the published code saves it: Microsoft Swin names, the ResNet as ``nn.Sequential``
    indices, BERT under ``bert.`` prefixes (as old BERT files name it), and the affiliation temperature."""
    state = model.state_dict()
    out = {k: v.clone() for k, v in state.items()
           if not k.startswith(("vision_encoder.", "conv_encoder.", "text_encoder."))}
    out.update(to_official_swin(model.vision_encoder, "vision_encoder."))
    for key, value in model.conv_encoder.state_dict().items():
        first, rest = key.split(".", 1)
        out[f"conv_encoder.{SEQUENTIAL[first]}.{rest}"] = value.clone()
    out.update({f"text_encoder.bert.{k}": v.clone() for k, v in model.text_encoder.state_dict().items()})
    out["temp2"] = torch.tensor(0.05)
    return out


def test_released_checkpoint_evaluates_with_a_complete_load_report(tiny_pir_config_path: Path,
                                                                   tmp_path: Path) -> None:
    """A released-layout checkpoint loads every tensor (identical embeddings), the Swin buffers, classifier and
    ``temp2`` listed as unused; ``run.py --evaluate --checkpoint`` logs that report and evaluates."""
    config = load_config(tiny_pir_config_path)
    torch.manual_seed(0)
    source = randomise_(build_model(config, pretrained=False), 9)
    released = to_released_pir(source)
    assert {"conv_encoder.0.weight", "conv_encoder.7.1.bn2.running_var", "text_encoder.bert.embeddings.word_embeddings"
            ".weight", "img_ca.1.mhatt_cross.linear_merge.bias", "txt_sa.2.ffn.3.weight", "mapping_txt.2.bias",
            "head_txt.weight", "temp", "temp2"} <= set(released)
    path = tmp_path / "pir_rsitmd_checkpoint_49.pth"
    torch.save({"model": released, "config": {"embed_dim": 32}}, path)

    torch.manual_seed(1)
    target = build_model(config, pretrained=False).eval()
    report = load_for_evaluation(target, str(path), config)
    assert_same_tensors(target.state_dict(), source.state_dict())
    unused = ([f"vision_encoder.{k} (rebuilt by the model)" for k in official_buffers(source.vision_encoder)]
              + ["vision_encoder.head.weight (classifier)", "vision_encoder.head.bias (classifier)", "temp2"])
    assert report.missing == [] and sorted(report.unexpected) == sorted(unused)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(target.encode_image(images), source.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(target.encode_text(padded_text()), source.encode_text(padded_text()), rtol=0, atol=0)

    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", str(tiny_pir_config_path),
                             "--output_dir", str(out), "--evaluate", "--checkpoint", str(path), "--dist", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = (f"model <- {path}: loaded {len(source.state_dict())} tensors (0 resized), 0 missing, "
            f"{len(unused)} unexpected")
    assert line in (out / "run.log").read_text(encoding="utf-8")
    results = json.loads((out / "eval_results.json").read_text())
    assert results["weights"] == "checkpoint" and results["checkpoint"] == str(path)


# --- end to end


def test_pir_demo_trains_far_above_chance(tmp_path: Path) -> None:
    """configs/demo_pir.yaml (shortened to 2 epochs) through run.py, data in tmp_path."""
    data, out = tmp_path / "data", tmp_path / "out"
    paths = [f"synthetic_data.root={data}", f"train_file=[{data}/demo_train.json]", f"val_file={data}/demo_val.json",
             f"test_file={data}/demo_test.json", f"image_root={data}/images", f"text_encoder={data}/tokenizer"]
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "--task", "demo_pir", "--output_dir", str(out),
                             "--dist", "cpu", *paths, "schedular.epochs=2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    epochs, summary = lines[:-1], lines[-1]
    assert [r["stage_name"] for r in epochs] == ["contr_affil"] * 2
    chance = chance_metrics([list(range(5 * i, 5 * i + 5)) for i in range(200)], 1000)["r_mean"]
    assert summary["test_at_best"]["r_mean"] > 5 * chance
