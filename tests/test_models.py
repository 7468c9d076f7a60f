"""Model registry, encoders, the dual encoder's outputs, pretrained loading and the paper-size build."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_BERT, TINY_SWIN, TINY_VIT, write_json
from models import build_model, list_models
from models.encoders import BertTextEncoder, build_vision_encoder
from models.encoders.text import remap_bert_key
from models.text import BertWordPieceProcessor
from utils.config import load_config
from utils.weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tiny_config_path: Path, tmp_path: Path, vision: dict | None = None, *overrides: str) -> dict:
    extra = list(overrides)
    if vision is not None:
        extra.append(f"vision_config={write_json(tmp_path / 'vision.json', vision)}")
    return load_config(tiny_config_path, extra)


def test_registry_names_the_models() -> None:
    assert "swin_bert_cl" in list_models()
    with pytest.raises(KeyError, match="unknown model 'nope'; registered models: .*swin_bert_cl"):
        build_model({"model": "nope"}, pretrained=False)


@pytest.mark.parametrize("vision", [TINY_SWIN, TINY_VIT], ids=["swin", "vit"])
def test_dual_encoder_outputs(tiny_config_path: Path, tmp_path: Path, vision: dict) -> None:
    config = tiny_config(tiny_config_path, tmp_path, vision)
    model = build_model(config, pretrained=False).eval()
    images = torch.randn(3, 3, 32, 32)
    ids = torch.randint(5, 100, (3, 7))
    out = model({"images": images, "text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}})
    assert out["image_feat"].shape == out["text_feat"].shape == (3, config["embed_dim"])
    torch.testing.assert_close(out["image_feat"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_feat"].norm(dim=-1), torch.ones(3))
    assert out["temp"].item() == pytest.approx(0.07)
    tokens = model.vision_encoder.forward_tokens(images)
    assert tokens.shape[1] == 1 + (16 if vision["arch"] == "swin" else 16) and tokens.shape[2] == vision["vision_width"]
    if vision["arch"] == "swin":  # X-VLM's pooled token is the mean of the normed patch tokens
        torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(1))


def test_attention_mask_makes_padding_irrelevant(tiny_config_path: Path, tmp_path: Path) -> None:
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    padded = torch.tensor([[2, 10, 11, 12, 3, 0, 0, 0]])
    mask, padded_mask = torch.ones_like(ids), torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    masked = build_model(tiny_config(tiny_config_path, tmp_path), pretrained=False).eval()
    text, padded_text = {"input_ids": ids, "attention_mask": mask}, {"input_ids": padded, "attention_mask": padded_mask}
    torch.testing.assert_close(masked.encode_text(text), masked.encode_text(padded_text))
    unmasked = build_model(tiny_config(tiny_config_path, tmp_path, None, "text_attention_mask=false"),
                           pretrained=False).eval()
    unmasked.load_state_dict(masked.state_dict())
    assert not torch.allclose(unmasked.encode_text(text), unmasked.encode_text(padded_text))


def test_pretrained_false_reads_no_file(tiny_config_path: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_config_path, tmp_path, {**TINY_SWIN, "ckpt": str(tmp_path / "missing.pth")})
    build_model(config, pretrained=False)
    with pytest.raises(WeightsError, match="Swin checkpoint .*not found: .*missing.pth"):
        build_model(config, pretrained=True)


def test_swin_checkpoint_in_the_official_wrapper_loads(tiny_config_path: Path, tmp_path: Path) -> None:
    source = build_vision_encoder({**TINY_SWIN})
    state = {k: v for k, v in source.state_dict().items() if "relative_position_index" not in k}
    state["head.weight"] = torch.zeros(10, 64)  # a classifier the retrieval model does not have
    torch.save({"model": state}, tmp_path / "swin.pth")
    config = tiny_config(tiny_config_path, tmp_path, {**TINY_SWIN, "ckpt": str(tmp_path / "swin.pth")})
    model = build_model(config, pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.vision_encoder.forward_tokens(images), source.eval().forward_tokens(images))


def test_bert_folder_with_old_names_loads(tiny_config_path: Path, tmp_path: Path, demo_root: Path) -> None:
    from transformers import BertConfig

    source = BertTextEncoder(BertConfig(**TINY_BERT)).eval()
    old_names = {}
    for key, value in source.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old_names[f"bert.{key}"] = value
    old_names["cls.predictions.bias"] = torch.zeros(TINY_BERT["vocab_size"])
    folder = tmp_path / "bert"
    folder.mkdir()
    torch.save(old_names, folder / "pytorch_model.bin")
    (folder / "vocab.txt").write_text((demo_root / "tokenizer" / "vocab.txt").read_text())
    model = build_model(tiny_config(tiny_config_path, tmp_path, None, f"text_encoder={folder}"), pretrained=True)
    ids = torch.randint(5, 100, (2, 6))
    torch.testing.assert_close(model.text_encoder.eval().forward_tokens(ids, torch.ones_like(ids)),
                               source.forward_tokens(ids, torch.ones_like(ids)))
    assert remap_bert_key("bert.encoder.layer.0.output.LayerNorm.beta") == "encoder.layer.0.output.LayerNorm.bias"


def test_incomplete_or_unsafe_checkpoints_are_errors(tiny_config_path: Path, tmp_path: Path) -> None:
    source = build_vision_encoder({**TINY_SWIN})
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("layers.1")}
    torch.save(partial, tmp_path / "partial.pth")
    config = tiny_config(tiny_config_path, tmp_path, {**TINY_SWIN, "ckpt": str(tmp_path / "partial.pth")})
    with pytest.raises(WeightsError, match="missing: layers.1"):
        build_model(config, pretrained=True)
    torch.save({"model": source.state_dict(), "extra": Path("x")}, tmp_path / "unsafe.pth")
    config = tiny_config(tiny_config_path, tmp_path, {**TINY_SWIN, "ckpt": str(tmp_path / "unsafe.pth")})
    with pytest.raises(WeightsError, match="weights_only=True"):
        build_model(config, pretrained=True)


def test_config_and_encoder_json_must_agree(tiny_config_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_res 32 in the YAML differs from 64"):
        build_model(tiny_config(tiny_config_path, tmp_path, {**TINY_SWIN, "image_res": 64}), pretrained=False)
    with pytest.raises(ValueError, match="missing keys \\['depths'\\]"):
        build_model(tiny_config(tiny_config_path, tmp_path, {k: v for k, v in TINY_SWIN.items() if k != "depths"}),
                    pretrained=False)
    with pytest.raises(ValueError, match="patch_size 16 does not match .* stride 8"):
        build_model(tiny_config(tiny_config_path, tmp_path, None, "patch_size=16"), pretrained=False)


def test_paper_size_model(tmp_path: Path, demo_root: Path) -> None:
    """Swin-T + BERT-base as in the paper configs: 27.5 M + 108.9 M parameters, 50 Swin tokens of width 768.

    The model owns its text processor; bert-base-uncased's folder is not here, so the demo vocabulary stands in."""
    config = load_config(ROOT / "configs" / "Retrieval_rsitmd_baseline.yaml")
    processor = BertWordPieceProcessor.from_folder(str(demo_root / "tokenizer"), config["max_tokens"],
                                                   config["max_words"])
    model = build_model(config, pretrained=False, text_processor=processor)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model.vision_encoder) == 27_519_354
    assert count(model.text_encoder) == 108_891_648
    assert count(model) == 27_519_354 + 108_891_648 + 2 * (768 * 512 + 512) + 1
    with torch.no_grad():
        assert model.vision_encoder.forward_tokens(torch.randn(1, 3, 224, 224)).shape == (1, 50, 768)
    assert json.loads((ROOT / "configs" / "config_bert.json").read_text())["vocab_size"] == 30522
