"""Pretrained-weight loading: every supported file layout puts every tensor where it belongs.

Each test writes weight files into ``tmp_path`` from a source model's (randomised) state dict, in the layout
a real release uses (Microsoft Swin, timm Swin/ViT/DeiT, Hugging Face BERT old and new, X-VLM, torchvision /
RSP / PIR ResNet, released FISVL, this project's ``checkpoint_best.pth``), loads it through the project's
loaders and checks (a) tensor by tensor that the target holds the source's values, (b) that the outputs
equal the source model's, and (c) what the load report says. Errors must name the file or key at fault.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig

from conftest import TINY_BERT, TINY_SWIN, TINY_VIT, write_json
from models import build_model
from models.encoders import BertTextEncoder, build_vision_encoder
from models.encoders.resnet import ResNetEncoder
from models.loading import initialise_from_checkpoint, load_for_evaluation
from models.objective import build_objective
from models.fusion.sfgs import HEADS as SFGS_HEADS
from scheduler import parse_stages
from utils.config import load_config
from utils.weights import LoadReport, WeightsError, load_into, with_prefix

ROOT = Path(__file__).resolve().parents[1]
SWIN_WHAT = "Swin checkpoint (the vision_config JSON's ckpt)"
# Three stages with a shifted block in stage 0: like Swin-T, a downsample sits between two inner stages.
SWIN_3_STAGES = {"arch": "swin", "vision_width": 64, "image_res": 64, "window_size": 4, "embed_dim": 16,
                 "depths": [2, 1, 1], "num_heads": [1, 2, 2], "drop_path_rate": 0.0}
SWIN_224_W7 = {"arch": "swin", "vision_width": 32, "image_res": 224, "window_size": 7, "embed_dim": 16,
               "depths": [1, 1], "num_heads": [1, 2], "drop_path_rate": 0.0}
SWIN_384_W12 = {**SWIN_224_W7, "image_res": 384, "window_size": 12}
RELEASED_SFGS = "conv_encoder.loc_fea1."


class NotATensor:
    """A custom class in a checkpoint: unpickling it would need arbitrary code."""

    def __init__(self) -> None:
        self.payload = 1


# --- helpers


def randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Perturb every floating tensor (weights, biases, norms, BatchNorm statistics) so that a tensor loaded into
    the wrong place, or not loaded, changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in module.state_dict(keep_vars=True).items():
            if value.is_floating_point():
                value.add_(0.05 * torch.randn(value.shape, generator=generator))
                if name.endswith("running_var"):
                    value.abs_().add_(0.5)
    return module.eval()


def to_official_swin(model: nn.Module, prefix: str = "", head_classes: int = 1000) -> dict[str, torch.Tensor]:
    """A timm Swin's weights in Microsoft's layout: downsample at the END of stage s (timm: start of s + 1), the
    ``relative_position_index`` and shifted blocks' ``attn_mask`` buffers stored, and a classifier head."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[prefix + key] = value.clone()
    for key, value in model.named_buffers():
        if key.endswith(("relative_position_index", "attn_mask")):
            out[prefix + key] = value.clone()
    out[prefix + "head.weight"] = torch.randn(head_classes, model.num_features)
    out[prefix + "head.bias"] = torch.randn(head_classes)
    return out


def official_buffers(model: nn.Module) -> list[str]:
    return [k for k, _ in model.named_buffers() if k.endswith(("relative_position_index", "attn_mask"))]


def assert_same_tensors(target: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same keys, and each tensor exactly equal."""
    assert sorted(target) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(target[key], value), key


def tiny_config(tiny_config_path: Path, tmp_path: Path, vision: dict | None = None, *overrides: str,
                base: Path | None = None) -> dict[str, Any]:
    """The tiny (or tiny FISVL) config, optionally with another vision JSON written into ``tmp_path``."""
    extra = list(overrides)
    if vision is not None:
        extra.append(f"vision_config={write_json(tmp_path / 'vision.json', vision)}")
    return load_config(base or tiny_config_path, extra)


def bert(layers: int = 1, seed: int = 0) -> BertTextEncoder:
    torch.manual_seed(seed)
    return randomise_(BertTextEncoder(BertConfig(**{**TINY_BERT, "num_hidden_layers": layers})), seed)


def bert_folder(folder: Path, demo_root: Path, layers: int = 1) -> Path:
    folder.mkdir()
    write_json(folder / "config.json", {**TINY_BERT, "num_hidden_layers": layers})
    (folder / "vocab.txt").write_text((demo_root / "tokenizer" / "vocab.txt").read_text(encoding="utf-8"),
                                      encoding="utf-8")
    return folder


def with_cross_attention(state: dict[str, torch.Tensor], layers: list[int],
                         prefix: str = "") -> dict[str, torch.Tensor]:
    """X-VLM's fusion layers: BERT layers that also carry ``crossattention.*`` (copied from their self-attention)."""
    out = dict(state)
    for layer in layers:
        head = f"{prefix}encoder.layer.{layer}.attention."
        for key, value in state.items():
            if key.startswith(head):
                out[f"{prefix}encoder.layer.{layer}.crossattention.{key[len(head):]}"] = value + 1
    return out


def text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 100, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return ids, mask


def text_inputs() -> dict[str, torch.Tensor]:
    """:func:`text_batch` as a model's ``encode_text`` takes it (its text processor's output)."""
    ids, mask = text_batch()
    return {"input_ids": ids, "attention_mask": mask}


def images(size: int, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(size))


def to_released_fisvl(state: dict[str, torch.Tensor], vision: nn.Module,
                      naive_qkv: bool = False) -> dict[str, torch.Tensor]:
    """A FISVL state dict in the published layout: Microsoft Swin names, SFGS inside the ResNet as
    ``conv_encoder.loc_fea1.*`` with the published module names. The published attention uses linear_k as the
    query, linear_v as the key and linear_q as the value; ``naive_qkv`` writes them as a naive converter
    assuming in_proj = [q; k; v] would."""
    out = {k: v for k, v in state.items() if not k.startswith(("sfgs.", "vision_encoder."))}
    out.update(to_official_swin(vision, "vision_encoder."))
    names = {"conv_filter.": "conv_filter.", "branches.0.": "sfgs.conv2d_block_11.",
             "branches.1.": "sfgs.conv2d_block_33.", "branches.2.": "sfgs.conv2d_block_55.",
             "token_proj.0.": "sfgs.fc.linear.", "attention.self_attn.out_proj.": "sfgs.wsa.mhatt.linear_merge.",
             "attention.linear1.": "sfgs.wsa.ffn.net.0.", "attention.linear2.": "sfgs.wsa.ffn.net.3.",
             "attention.norm1.": "sfgs.wsa.norm1.", "attention.norm2.": "sfgs.wsa.norm2."}
    for key, value in state.items():
        if not key.startswith("sfgs."):
            continue
        key = key[len("sfgs."):]
        for new, old in names.items():
            if key.startswith(new):
                out[RELEASED_SFGS + old + key[len(new):]] = value.clone()
    roles = ("q", "k", "v") if naive_qkv else ("k", "v", "q")
    for kind in ("weight", "bias"):
        for role, chunk in zip(roles, state[f"sfgs.attention.self_attn.in_proj_{kind}"].chunk(3)):
            out[f"{RELEASED_SFGS}sfgs.wsa.mhatt.linear_{role}.{kind}"] = chunk.clone()
    out[RELEASED_SFGS + "sfgs.wsa.fmp_weight"] = state["sfgs.fusion_weight"].unsqueeze(0).clone()
    return out


def published_wsa(x: torch.Tensor, t: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """The published SFGS transformer layer (SWAN/FISVL), written from its source, on released tensors ``t``
    (names under ``sfgs.wsa.``): post-LN, ``MHAtt`` whose ``att(value, key, query)`` signature is called as
    ``att(v, k, q)`` with the outputs of linear_v, linear_k, linear_q, then the FFN (Linear, GELU, Linear)."""
    batch, tokens, width = x.shape

    def linear(name: str, y: torch.Tensor) -> torch.Tensor:
        return y @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    def split(y: torch.Tensor) -> torch.Tensor:
        return y.view(batch, tokens, heads, width // heads).transpose(1, 2)

    def att(key: torch.Tensor, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:  # published signature
        scores = query @ key.transpose(-2, -1) / math.sqrt(query.size(-1))
        return torch.softmax(scores, dim=-1) @ value

    v = split(linear("mhatt.linear_v", x))
    k = split(linear("mhatt.linear_k", x))
    q = split(linear("mhatt.linear_q", x))
    atted = att(v, k, q).transpose(1, 2).reshape(batch, tokens, width)
    x = F.layer_norm(x + linear("mhatt.linear_merge", atted), (width,), t["norm1.weight"], t["norm1.bias"])
    ffn = linear("ffn.net.3", F.gelu(linear("ffn.net.0", x)))
    return F.layer_norm(x + ffn, (width,), t["norm2.weight"], t["norm2.bias"])


def published_sfgs(stem: torch.Tensor, t: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """The whole published SFGS (inference) on released tensors ``t`` (names under ``conv_encoder.loc_fea1.``)."""
    def conv_bn_relu(x: torch.Tensor, name: str, kernel: int) -> torch.Tensor:
        x = F.conv2d(x, t[f"{name}.0.weight"], stride=kernel)
        x = F.batch_norm(x, t[f"{name}.1.running_mean"], t[f"{name}.1.running_var"], t[f"{name}.1.weight"],
                         t[f"{name}.1.bias"], training=False)
        return torch.relu(x)

    x = conv_bn_relu(stem, "conv_filter", 1)
    branches = [F.adaptive_avg_pool2d(conv_bn_relu(x, f"sfgs.conv2d_block_{k}{k}", k), 16).flatten(2)
                for k in (1, 3, 5)]
    tokens = torch.relu(F.linear(torch.cat(branches, 1), t["sfgs.fc.linear.weight"], t["sfgs.fc.linear.bias"]))
    tokens = published_wsa(tokens, with_prefix(t, "sfgs.wsa."),
                           heads)
    weight = t["sfgs.wsa.fmp_weight"][0]  # [128, d]
    return torch.einsum("ne,bnd->bed", weight, tokens).mean(1)  # mean over e of W^T X


# --- 1-3: Swin


def test_swin_official_layout_loads_completely(tmp_path: Path) -> None:
    """Microsoft's ``{'model': sd}`` (downsample at the end of a stage, index/mask buffers, 1000-class head)
    loads into a same-size timm Swin: every tensor in place, identical tokens; buffers and head are reported
    as unused, nothing is missing and nothing was resized."""
    torch.manual_seed(0)
    source = randomise_(build_vision_encoder(dict(SWIN_3_STAGES)), 0)
    official = to_official_swin(source)
    assert "layers.0.downsample.reduction.weight" in official and "layers.0.blocks.1.attn_mask" in official
    torch.save({"model": official}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    torch.manual_seed(1)
    target = build_vision_encoder(dict(SWIN_3_STAGES)).eval()
    report = target.load_pretrained(str(tmp_path / "swin_tiny_patch4_window7_224.pth"))
    assert_same_tensors(target.state_dict(), source.state_dict())
    x = images(64)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_tokens(x), source.forward_tokens(x), rtol=0, atol=0)
    buffers = official_buffers(source)
    assert len(buffers) == 5  # four relative_position_index, one attn_mask
    assert report.missing == []
    assert sorted(report.unexpected) == sorted([f"{k} (rebuilt by the model)" for k in buffers]
                                               + ["head.weight (classifier)", "head.bias (classifier)"])
    assert report.loaded == len(source.state_dict()) == 64


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_swin_timm_layout_loads(tmp_path: Path, suffix: str) -> None:
    """timm's own names, as a pickle and as safetensors: every tensor in place, identical tokens, a clean report."""
    torch.manual_seed(0)
    source = randomise_(build_vision_encoder(dict(SWIN_3_STAGES)), 2)
    path = tmp_path / f"swin{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    target = build_vision_encoder(dict(SWIN_3_STAGES)).eval()
    report = target.load_pretrained(str(path))
    assert_same_tensors(target.state_dict(), source.state_dict())
    x = images(64)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_tokens(x), source.forward_tokens(x), rtol=0, atol=0)
    assert (report.loaded, report.resized, report.missing, report.unexpected) == (64, [], [], [])


def test_swin_window_7_at_224_resizes_to_window_12_at_384(tmp_path: Path) -> None:
    """A 224 px / window-7 Swin loaded into a 384 px / window-12 one: the relative-position tables go from 13x13
    to 23x23 entries exactly as timm's ``resize_rel_pos_bias_table`` does, the report lists them, every other
    tensor is unchanged and the model runs at 384 px."""
    from timm.layers import resize_rel_pos_bias_table

    torch.manual_seed(0)
    source = randomise_(build_vision_encoder(dict(SWIN_224_W7)), 4)
    torch.save({"model": to_official_swin(source)}, tmp_path / "swin_224_w7.pth")
    torch.manual_seed(1)
    target = build_vision_encoder(dict(SWIN_384_W12)).eval()
    report = target.load_pretrained(str(tmp_path / "swin_224_w7.pth"))
    tables = [f"layers.{s}.blocks.0.attn.relative_position_bias_table" for s in (0, 1)]
    assert report.resized == [f"{tables[0]}: (169, 1) -> (529, 1)", f"{tables[1]}: (169, 2) -> (529, 2)"]
    assert report.missing == []
    loaded, original = target.state_dict(), source.state_dict()
    assert sorted(loaded) == sorted(original)
    for key, value in original.items():
        if key in tables:
            expected = resize_rel_pos_bias_table(value, new_window_size=(12, 12), new_bias_shape=(529, value.shape[1]))
            assert loaded[key].shape == (529, value.shape[1])
            assert torch.equal(loaded[key], expected), key
            # geometric resizing keeps the offsets -1..1 around the centre and stretches the rest to the corners
            new, old = loaded[key].view(23, 23, -1), value.view(13, 13, -1)
            torch.testing.assert_close(new[10:13, 10:13], old[5:8, 5:8])
            for corner_new, corner_old in (((0, 0), (0, 0)), ((22, 22), (12, 12)), ((0, 22), (0, 12))):
                torch.testing.assert_close(new[corner_new], old[corner_old], rtol=0, atol=1e-4)
        else:
            assert torch.equal(loaded[key], value), key
    with torch.no_grad():
        tokens = target.forward_tokens(images(384, 1))
    assert tokens.shape == (1, 1 + 48 * 48, 32) and bool(torch.isfinite(tokens).all())


def test_swin_official_layout_with_several_stages_reports_no_false_resize(tmp_path: Path) -> None:
    """With three or more stages (Swin-T has four), Microsoft's ``layers.1.downsample`` (the end of stage 1) and
    timm's ``layers.1.downsample`` (the start of stage 1, i.e. Microsoft's ``layers.0.downsample``) are different
    tensors of different shapes. Moving the downsample layers to the next stage is a rename, not a resize: the
    remap must not report them as resized (the paper's Swin-T load would claim 6 resized tensors)."""
    torch.manual_seed(0)
    source = build_vision_encoder(dict(SWIN_3_STAGES))
    torch.save({"model": to_official_swin(source)}, tmp_path / "swin_3_stages.pth")
    target = build_vision_encoder(dict(SWIN_3_STAGES))
    report = target.load_pretrained(str(tmp_path / "swin_3_stages.pth"))
    assert_same_tensors(target.state_dict(), source.state_dict())
    assert report.resized == []
    assert str(report).endswith(": loaded 64 tensors (0 resized), 0 missing, 7 unexpected")


# --- 4: ViT


def test_vit_pos_embed_resize_same_size_and_deit_heads(tmp_path: Path) -> None:
    """timm ViT: a 32 px (4x4 grid) checkpoint into a 48 px (6x6 grid) model resizes ``pos_embed`` as timm does
    and says so; a same-size load gives identical tokens; a DeiT file with ``head`` and ``head_dist`` loads
    with both classifiers dropped and listed."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    source = randomise_(build_vision_encoder(dict(TINY_VIT)), 5)
    original = source.state_dict()
    torch.save(original, tmp_path / "vit.pth")

    torch.manual_seed(1)
    larger = build_vision_encoder({**TINY_VIT, "image_res": 48}).eval()
    report = larger.load_pretrained(str(tmp_path / "vit.pth"))
    assert [entry.split(":")[0] for entry in report.resized] == ["pos_embed"]  # named, with both sizes
    assert "17" in report.resized[0] and "37" in report.resized[0]
    assert (report.missing, report.unexpected) == ([], [])
    loaded = larger.state_dict()
    assert sorted(loaded) == sorted(original)
    expected = resample_abs_pos_embed(original["pos_embed"], new_size=[6, 6], num_prefix_tokens=1)
    assert torch.equal(loaded["pos_embed"], expected)
    assert torch.equal(loaded["pos_embed"][:, 0], original["pos_embed"][:, 0])  # the class token's stays
    for key, value in original.items():
        if key != "pos_embed":
            assert torch.equal(loaded[key], value), key
    with torch.no_grad():
        assert larger.forward_tokens(images(48)).shape == (2, 37, 32)

    torch.manual_seed(2)
    same = build_vision_encoder(dict(TINY_VIT)).eval()
    report = same.load_pretrained(str(tmp_path / "vit.pth"))
    assert (report.loaded, report.resized, report.missing, report.unexpected) == (len(original), [], [], [])
    with torch.no_grad():
        torch.testing.assert_close(same.forward_tokens(images(32)), source.forward_tokens(images(32)), rtol=0, atol=0)

    deit = {**original, "head.weight": torch.randn(1000, 32), "head.bias": torch.randn(1000),
            "head_dist.weight": torch.randn(1000, 32), "head_dist.bias": torch.randn(1000)}
    torch.save({"model": deit, "epoch": 300}, tmp_path / "deit.pth")
    torch.manual_seed(3)
    from_deit = build_vision_encoder(dict(TINY_VIT)).eval()
    report = from_deit.load_pretrained(str(tmp_path / "deit.pth"))
    assert_same_tensors(from_deit.state_dict(), original)
    assert [entry.split(" (")[0] for entry in report.unexpected] == ["head.weight", "head.bias", "head_dist.weight",
                                                                      "head_dist.bias"]
    assert report.missing == []


def openai_clip_visual(width: int, layers: int, patch: int, grid: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under OpenAI CLIP's visual-tower names (``visual.conv1``, ``transformer.resblocks``,
    ``ln_pre``/``ln_post``, ``proj``), plus a text-tower tensor the vision load must ignore."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    state = {"visual.conv1.weight": rand(width, 3, patch, patch), "visual.class_embedding": rand(width),
             "visual.positional_embedding": rand(grid * grid + 1, width), "visual.proj": rand(width, 16)}
    for norm in ("ln_pre", "ln_post"):
        state |= {f"visual.{norm}.weight": 1 + rand(width), f"visual.{norm}.bias": rand(width)}
    for i in range(layers):
        block = f"visual.transformer.resblocks.{i}."
        state |= {block + "attn.in_proj_weight": rand(3 * width, width), block + "attn.in_proj_bias": rand(3 * width),
                  block + "attn.out_proj.weight": rand(width, width), block + "attn.out_proj.bias": rand(width),
                  block + "ln_1.weight": 1 + rand(width), block + "ln_1.bias": rand(width),
                  block + "ln_2.weight": 1 + rand(width), block + "ln_2.bias": rand(width),
                  block + "mlp.c_fc.weight": rand(4 * width, width), block + "mlp.c_fc.bias": rand(4 * width),
                  block + "mlp.c_proj.weight": rand(width, 4 * width), block + "mlp.c_proj.bias": rand(width)}
    state["transformer.resblocks.0.attn.in_proj_weight"] = rand(3 * 8, 8)  # the text tower
    return state


def openai_clip_tokens(x: torch.Tensor, t: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """CLIP's visual forward written from the OpenAI names (pre-LN blocks, QuickGELU), with ``ln_post`` on every
    token (CLIP applies it to the class token; LayerNorm acts per token, so token 0 is CLIP's)."""
    width = t["visual.class_embedding"].shape[0]
    layer_norm = lambda y, name: F.layer_norm(y, (width,), t[f"{name}.weight"], t[f"{name}.bias"])  # noqa: E731
    y = F.conv2d(x, t["visual.conv1.weight"], stride=t["visual.conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    y = torch.cat([t["visual.class_embedding"].expand(len(y), 1, -1), y], 1) + t["visual.positional_embedding"]
    y = layer_norm(y, "visual.ln_pre")
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in t:
        b = f"visual.transformer.resblocks.{i}."
        h = layer_norm(y, b + "ln_1").transpose(0, 1)
        attended, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, t[b + "attn.in_proj_weight"], t[b + "attn.in_proj_bias"], None, None, False, 0.0,
            t[b + "attn.out_proj.weight"], t[b + "attn.out_proj.bias"], training=False, need_weights=False)
        y = y + attended.transpose(0, 1)
        h = F.linear(layer_norm(y, b + "ln_2"), t[b + "mlp.c_fc.weight"], t[b + "mlp.c_fc.bias"])
        y = y + F.linear(h * torch.sigmoid(1.702 * h), t[b + "mlp.c_proj.weight"], t[b + "mlp.c_proj.bias"])
        i += 1
    return layer_norm(y, "visual.ln_post")


def test_vit_openai_clip_layout_matches_clips_computation(tmp_path: Path) -> None:
    """OpenAI CLIP's ``visual.*`` tensors load into a ViT built as CLIP (``pre_norm``, ``quick_gelu``, LayerNorm eps
    1e-5); the tokens
    equal CLIP's forward computed from those tensors; the projection and the text tower are not used; a
    larger grid resizes the position embedding and says so."""
    clip = openai_clip_visual(width=32, layers=2, patch=8, grid=4, seed=7)
    torch.save(clip, tmp_path / "clip.pth")
    vision = {**TINY_VIT, "depth": 2, "pre_norm": True, "act_layer": "quick_gelu", "norm_eps": 1e-5}
    encoder = build_vision_encoder(vision).eval()
    report = encoder.load_pretrained(str(tmp_path / "clip.pth"))
    assert (report.loaded, report.resized, report.missing) == (len(encoder.state_dict()), [], [])
    assert sorted(entry.split(" (")[0] for entry in report.unexpected) == ["head.bias", "head.weight"]
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_tokens(x), openai_clip_tokens(x, clip, TINY_VIT["num_heads"]))
    larger = build_vision_encoder({**vision, "image_res": 48}).eval()
    assert larger.load_pretrained(str(tmp_path / "clip.pth")).resized == ["pos_embed: 17 -> 37 tokens"]


# --- 5: BERT


def test_bert_folder_with_new_names_in_safetensors(tmp_path: Path, demo_root: Path) -> None:
    """A ``save_pretrained``-style ``model.safetensors`` (BertModel names, with a pooler): identical tokens, the
    pooler listed as unused."""
    source = bert()
    state = {**source.state_dict(), "pooler.dense.weight": torch.randn(32, 32), "pooler.dense.bias": torch.randn(32)}
    folder = bert_folder(tmp_path / "bert-new", demo_root)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    torch.manual_seed(9)
    target = BertTextEncoder(BertConfig(**TINY_BERT)).eval()
    report = target.load_pretrained(str(folder))
    assert_same_tensors(target.state_dict(), source.state_dict())
    ids, mask = text_batch()
    torch.testing.assert_close(target.forward_tokens(ids, mask), source.forward_tokens(ids, mask), rtol=0, atol=0)
    assert sorted(report.unexpected) == ["pooler.dense.bias (pre-training head)",
                                         "pooler.dense.weight (pre-training head)"]
    assert (report.loaded, report.missing, report.resized) == (len(source.state_dict()), [], [])


def test_bert_folder_with_old_names_in_pytorch_model_bin(tmp_path: Path, demo_root: Path) -> None:
    """The original ``bert-base-uncased`` upload: ``bert.`` prefixes, LayerNorm ``gamma``/``beta``, the MLM/NSP
    heads ``cls.*`` and ``bert.pooler.*``: identical tokens, the heads listed as unused."""
    source = bert(seed=1)
    state: dict[str, torch.Tensor] = {}
    for key, value in source.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[f"bert.{key}"] = value
    heads = {"bert.pooler.dense.weight": torch.randn(32, 32), "bert.pooler.dense.bias": torch.randn(32),
             "cls.predictions.bias": torch.randn(256), "cls.predictions.transform.dense.weight": torch.randn(32, 32),
             "cls.predictions.transform.LayerNorm.gamma": torch.randn(32),
             "cls.seq_relationship.weight": torch.randn(2, 32)}
    folder = bert_folder(tmp_path / "bert-old", demo_root)
    torch.save({**state, **heads}, folder / "pytorch_model.bin")
    assert sum(".gamma" in k for k in state) == 3
    torch.manual_seed(9)
    target = BertTextEncoder(BertConfig(**TINY_BERT)).eval()
    report = target.load_pretrained(str(folder))
    assert_same_tensors(target.state_dict(), source.state_dict())
    ids, mask = text_batch()
    torch.testing.assert_close(target.forward_tokens(ids, mask), source.forward_tokens(ids, mask), rtol=0, atol=0)
    assert sorted(report.unexpected) == sorted(
        ["pooler.dense.weight (pre-training head)", "pooler.dense.bias (pre-training head)",
         "cls.predictions.bias (pre-training head)", "cls.predictions.transform.dense.weight (pre-training head)",
         "cls.predictions.transform.LayerNorm.weight (pre-training head)",
         "cls.seq_relationship.weight (pre-training head)"])
    assert (report.loaded, report.missing) == (len(source.state_dict()), [])


def test_xvlm_text_state_keeps_text_layers_and_drops_cross_modal_ones(tmp_path: Path) -> None:
    """X-VLM's text encoder: 4 BERT layers of which 2-3 carry ``crossattention``. A 2-layer text encoder takes
    layers 0-1 and the embeddings, and lists every key of layers 2-3 as an unused cross-modal layer."""
    source = bert(layers=4, seed=2)
    state = with_cross_attention({f"bert.{k}": v for k, v in source.state_dict().items()}, [2, 3], "bert.")
    torch.manual_seed(9)
    target = BertTextEncoder(BertConfig(**{**TINY_BERT, "num_hidden_layers": 2})).eval()
    report = load_into(target, target.remap_state(state), "text encoder <- X-VLM")
    upper = ("encoder.layer.2.", "encoder.layer.3.")
    two_layers = {k: v for k, v in source.state_dict().items() if not k.startswith(upper)}
    assert_same_tensors(target.state_dict(), two_layers)
    cross = sorted(k.removeprefix("bert.") for k in state if k.removeprefix("bert.").startswith(upper))
    assert len(cross) == 2 * (16 + 10)  # a layer's 16 tensors plus the 10 of its cross-attention
    assert sorted(report.unexpected) == [f"{k} (X-VLM cross-modal layer)" for k in cross]
    assert (report.loaded, report.missing) == (len(two_layers), [])
    reference = BertTextEncoder(BertConfig(**{**TINY_BERT, "num_hidden_layers": 2})).eval()
    reference.load_state_dict(two_layers)  # strict
    ids, mask = text_batch()
    torch.testing.assert_close(target.forward_tokens(ids, mask), reference.forward_tokens(ids, mask), rtol=0, atol=0)


# --- 6: ResNet


def test_resnet_layouts_load(tmp_path: Path) -> None:
    """The prior CNN from RSP's layout (``{'state_dict'}``, ``module.`` prefixes, a 30-class ``fc``), PIR's
    ``nn.Sequential`` names (``0.`` conv1, ``1.`` bn1, ``4.``-``7.`` layer1-4) and a plain torchvision
    resnet18 (1000-class ``fc``): identical stem and pooled outputs, the classifier listed as unused."""
    torch.manual_seed(0)
    source = randomise_(ResNetEncoder("resnet18"), 6)
    original = source.state_dict()
    assert len(original) == 120
    x = images(64)
    with torch.no_grad():
        expected = source.forward_prior(x)

    rsp = {f"module.{k}": v for k, v in original.items()}
    rsp.update({"module.fc.weight": torch.randn(30, 512), "module.fc.bias": torch.randn(30)})
    torch.save({"state_dict": rsp, "epoch": 300}, tmp_path / "aid_28-rsp-resnet-18-ckpt.pth")
    sequential_names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    pir = {f"{sequential_names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in original.items()}
    assert {"0.weight", "1.running_mean", "4.0.conv1.weight", "7.1.bn2.bias"} <= set(pir)
    torch.save(pir, tmp_path / "pir_sequential.pth")
    for name, classes in (("aid_28-rsp-resnet-18-ckpt.pth", 30), ("pir_sequential.pth", None)):
        torch.manual_seed(1)
        target = ResNetEncoder("resnet18").eval()
        report = target.load_pretrained(str(tmp_path / name))
        assert_same_tensors(target.state_dict(), original)
        with torch.no_grad():
            stem, pooled = target.forward_prior(x)
        torch.testing.assert_close(stem, expected[0], rtol=0, atol=0)
        torch.testing.assert_close(pooled, expected[1], rtol=0, atol=0)
        dropped = [] if classes is None else [f"fc.weight (classifier of {classes} classes)",
                                              f"fc.bias (classifier of {classes} classes)"]
        assert (report.loaded, report.missing, report.unexpected) == (120, [], dropped), name

    torch.manual_seed(2)
    stock = torchvision.models.resnet18()
    torch.save(stock.state_dict(), tmp_path / "resnet18.pth")
    target = ResNetEncoder("resnet18")
    report = target.load_pretrained(str(tmp_path / "resnet18.pth"))
    assert_same_tensors(target.state_dict(), {k: v for k, v in stock.state_dict().items() if not k.startswith("fc.")})
    assert report.unexpected == ["fc.weight (classifier of 1000 classes)", "fc.bias (classifier of 1000 classes)"]


def test_resnet50_has_torchvision_names() -> None:
    """RSP's ResNet-50 checkpoints use torchvision names: the prior CNN's keys are torchvision's minus ``fc``."""
    stock = torchvision.models.resnet50().state_dict()
    prior = ResNetEncoder("resnet50")
    assert sorted(prior.state_dict()) == sorted(k for k in stock if not k.startswith("fc."))
    remapped = prior.remap_state(stock)
    assert sorted(remapped.state) == sorted(prior.state_dict())
    assert remapped.dropped == ["fc.weight (classifier of 1000 classes)", "fc.bias (classifier of 1000 classes)"]
    assert prior.width == 2048


# --- 7: released FISVL checkpoint


def test_released_fisvl_checkpoint_evaluates_identically(tiny_fisvl_config_path: Path, tmp_path: Path) -> None:
    """A checkpoint in the published FISVL layout (Microsoft Swin names, SFGS inside the ResNet as
    ``conv_encoder.loc_fea1.*``, ``{'model', 'config'}``) loads for evaluation completely: identical image and
    text embeddings; the SFGS tensors (attention included) are where the published code would use them."""
    config = load_config(tiny_fisvl_config_path)
    torch.manual_seed(0)
    source = randomise_(build_model(config, pretrained=False), 7)
    state = source.state_dict()
    released = to_released_fisvl(state, source.vision_encoder)
    assert not any(k.startswith("sfgs.") for k in released)
    assert released[RELEASED_SFGS + "sfgs.wsa.fmp_weight"].shape == (1, 128, 32)
    # X-VLM's BERT, which the published code uses, has a pooler and a persistent position_ids buffer
    released.update({"text_encoder.pooler.dense.weight": torch.randn(32, 32), "text_encoder.pooler.dense.bias":
                     torch.randn(32), "text_encoder.embeddings.position_ids": torch.arange(64).unsqueeze(0)})
    # the published model holds the affiliation temperature; here the affiliation loss owns it (not evaluated)
    released["temp2"] = torch.tensor(0.05)
    torch.save({"model": released, "config": {"embed_dim": 32}}, tmp_path / "fisvl_released.pth")
    torch.manual_seed(1)
    target = build_model(config, pretrained=False).eval()
    report = load_for_evaluation(target, str(tmp_path / "fisvl_released.pth"), config)
    assert_same_tensors(target.state_dict(), state)
    assert report.missing == []
    assert sorted(report.unexpected) == sorted(
        [f"vision_encoder.{k} (rebuilt by the model)" for k in official_buffers(source.vision_encoder)]
        + ["vision_encoder.head.weight (classifier)", "vision_encoder.head.bias (classifier)",
           "text_encoder.pooler.dense.weight (pre-training head)", "text_encoder.pooler.dense.bias (pre-training head)",
           "text_encoder.embeddings.position_ids", "temp2"])
    x = images(32, 3)
    text = text_inputs()
    with torch.no_grad():
        torch.testing.assert_close(target.encode_image(x), source.encode_image(x), rtol=0, atol=0)
        torch.testing.assert_close(target.encode_text(text), source.encode_text(text), rtol=0, atol=0)


def test_released_sfgs_attention_matches_the_published_computation(tiny_fisvl_config_path: Path,
                                                                    tmp_path: Path) -> None:
    """The q/k/v permutation: the published MHAtt computes softmax(linear_k(x) linear_v(x)^T / sqrt(d_h))
    linear_q(x). A reference written from the published code, run on the released tensors, must equal the
    loaded model's SFGS attention (and whole SFGS). The check discriminates: a naive [q; k; v] in-projection
    gives other outputs, and so does a file written by a naive converter."""
    config = load_config(tiny_fisvl_config_path)
    torch.manual_seed(0)
    source = randomise_(build_model(config, pretrained=False), 8)
    released = to_released_fisvl(source.state_dict(), source.vision_encoder)
    torch.save({"model": released}, tmp_path / "released.pth")
    torch.manual_seed(1)
    target = build_model(config, pretrained=False).eval()
    load_for_evaluation(target, str(tmp_path / "released.pth"), config)
    sfgs_tensors = with_prefix(released, RELEASED_SFGS)
    wsa = with_prefix(sfgs_tensors, "sfgs.wsa.")
    assert SFGS_HEADS == 8 and target.sfgs.attention.self_attn.num_heads == SFGS_HEADS

    tokens = torch.randn(2, 128, 32, generator=torch.Generator().manual_seed(11))
    stem = torch.randn(2, 64, 16, 16, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        reference = published_wsa(tokens, wsa, SFGS_HEADS)
        torch.testing.assert_close(target.sfgs.attention(tokens), reference)
        torch.testing.assert_close(target.sfgs(stem), published_sfgs(stem, sfgs_tensors, SFGS_HEADS))

        naive = nn.TransformerEncoderLayer(32, SFGS_HEADS, 64, dropout=0.0, activation="gelu", batch_first=True)
        naive.load_state_dict(target.sfgs.attention.state_dict())
        for kind in ("weight", "bias"):
            packed = torch.cat([wsa[f"mhatt.linear_{role}.{kind}"] for role in ("q", "k", "v")])
            getattr(naive.self_attn, f"in_proj_{kind}").copy_(packed)
        assert not torch.allclose(naive.eval()(tokens), reference, rtol=1e-3, atol=1e-3)

    naive_file = to_released_fisvl(source.state_dict(), source.vision_encoder, naive_qkv=True)
    torch.save({"model": naive_file}, tmp_path / "naive.pth")
    torch.manual_seed(1)
    misloaded = build_model(config, pretrained=False).eval()
    load_for_evaluation(misloaded, str(tmp_path / "naive.pth"), config)
    x = images(32, 3)
    with torch.no_grad():
        assert not torch.allclose(misloaded.sfgs.attention(tokens), source.sfgs.attention(tokens), rtol=1e-3, atol=1e-3)
        assert not torch.allclose(misloaded.encode_image(x), source.encode_image(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(target.encode_image(x), source.encode_image(x), rtol=0, atol=0)


# --- 8: X-VLM checkpoints to start training from


def xvlm_checkpoint(vision: nn.Module, text: BertTextEncoder) -> dict[str, torch.Tensor]:
    """X-VLM's ``{'model'}``: official Swin names, ``text_encoder.bert.*`` with two cross-modal layers after the
    text layers, 16-d projections, an ITM head, an MLM head and ``temp``."""
    layers = text.config.num_hidden_layers
    bert_state = {f"text_encoder.bert.{k}": v for k, v in text.state_dict().items()}
    for extra in (layers, layers + 1):  # fusion layers: a text layer's tensors plus cross-attention
        for key, value in text.state_dict().items():
            if key.startswith("encoder.layer.0."):
                bert_state[f"text_encoder.bert.encoder.layer.{extra}.{key[len('encoder.layer.0.'):]}"] = value + extra
    bert_state = with_cross_attention(bert_state, [layers, layers + 1], "text_encoder.bert.")
    return {**to_official_swin(vision, "vision_encoder."), **bert_state,
            "text_encoder.cls.predictions.bias": torch.randn(256),
            "vision_proj.weight": torch.randn(16, vision.num_features), "vision_proj.bias": torch.randn(16),
            "text_proj.weight": torch.randn(16, 32), "text_proj.bias": torch.randn(16),
            "itm_head.weight": torch.randn(2, 32), "itm_head.bias": torch.randn(2), "temp": torch.tensor(0.05)}


def test_xvlm_checkpoint_initialises_a_dual_encoder(tiny_config_path: Path, tmp_path: Path) -> None:
    """Training from an X-VLM checkpoint: both encoders load completely (Microsoft Swin names, ``bert.`` prefix,
    cross-modal layers dropped); the 16-d projections do not fit the 32-d model and keep their initialisation
    (listed with "differs"); ``temp`` fits and loads; the ITM and MLM heads are listed as unused."""
    config = tiny_config(tiny_config_path, tmp_path, None, "model=swin_bert_cl", "allow_random_init=[]")
    torch.manual_seed(0)
    vision = randomise_(build_vision_encoder(dict(TINY_SWIN)), 10)
    text = bert(seed=3)
    torch.save({"model": xvlm_checkpoint(vision, text)}, tmp_path / "xvlm_4m.pth")
    torch.manual_seed(1)
    model = build_model(config, pretrained=False).eval()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    report = initialise_from_checkpoint(model, str(tmp_path / "xvlm_4m.pth"), config)
    loaded = model.state_dict()
    assert_same_tensors(with_prefix(loaded, "vision_encoder."),
                        vision.state_dict())
    assert_same_tensors(with_prefix(loaded, "text_encoder."),
                        text.state_dict())
    for key in ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias"):
        assert torch.equal(loaded[key], initial[key]), key
    assert loaded["temp"].item() == pytest.approx(0.05)
    assert sorted(report.missing) == ["text_proj.bias", "text_proj.weight", "vision_proj.bias", "vision_proj.weight"]
    unexpected = report.unexpected
    assert "vision_proj.weight (shape (16, 64) differs; kept the model's initialisation (32, 64))" in unexpected
    assert "text_proj.bias (shape (16,) differs; kept the model's initialisation (32,))" in unexpected
    assert {"itm_head.weight", "itm_head.bias",
            "text_encoder.cls.predictions.bias (pre-training head)"} <= set(unexpected)
    cross = [u for u in unexpected if u.endswith("(X-VLM cross-modal layer)")]
    assert len(cross) == 2 * (16 + 10)
    assert all(u.startswith(("text_encoder.encoder.layer.1.", "text_encoder.encoder.layer.2.")) for u in cross)
    assert report.loaded == len(vision.state_dict()) + len(text.state_dict()) + 1  # + temp
    ids, mask = text_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.text_encoder.forward_tokens(ids, mask), text.forward_tokens(ids, mask),
                                   rtol=0, atol=0)
        torch.testing.assert_close(model.vision_encoder.forward_tokens(images(32)),
                                   vision.forward_tokens(images(32)), rtol=0, atol=0)


def test_xvlm_checkpoint_initialises_fisvl_with_the_resnet_from_resnet_ckpt(tiny_fisvl_config_path: Path,
                                                                             tmp_path: Path) -> None:
    """FISVL from an X-VLM checkpoint: the file has no ``conv_encoder``, so the prior CNN comes from
    ``resnet_ckpt``; the encoders in the file load completely; the fusion keeps its initialisation."""
    torch.manual_seed(2)
    resnet = randomise_(torchvision.models.resnet18(), 11)
    torch.save({"model": resnet.state_dict()}, tmp_path / "rsp-resnet-18.pth")
    config = tiny_config(tiny_fisvl_config_path, tmp_path, None, f"resnet_ckpt={tmp_path / 'rsp-resnet-18.pth'}",
                         base=tiny_fisvl_config_path)
    torch.manual_seed(0)
    vision = randomise_(build_vision_encoder(dict(TINY_SWIN)), 12)
    text = bert(seed=4)
    torch.save({"model": xvlm_checkpoint(vision, text)}, tmp_path / "xvlm_4m.pth")
    torch.manual_seed(1)
    model = build_model(config, pretrained=False).eval()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    report = initialise_from_checkpoint(model, str(tmp_path / "xvlm_4m.pth"), config)
    loaded = model.state_dict()
    assert_same_tensors(with_prefix(loaded, "conv_encoder."),
                        {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")})
    assert_same_tensors(with_prefix(loaded, "vision_encoder."),
                        vision.state_dict())
    assert_same_tensors(with_prefix(loaded, "text_encoder."),
                        text.state_dict())
    for key, value in initial.items():
        if key.startswith(("sfgs.", "img_gcn.", "head_img.", "conv_proj.", "vision_proj.", "text_proj.")):
            assert torch.equal(loaded[key], value), key
    assert not any(k.startswith(("vision_encoder.", "text_encoder.")) for k in report.missing)
    assert "conv_encoder.conv1.weight" in report.missing  # not from this file: loaded before, from resnet_ckpt


# --- 9: this project's checkpoint


def test_project_checkpoint_evaluates_identically_and_must_be_complete(tiny_fisvl_config_path: Path,
                                                                       tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """``checkpoint_best.pth`` as Retrieval.py writes it loads for evaluation with identical embeddings and a
    clean report; with a head tensor removed it is an error naming the tensor, unless allow_missing_weights
    covers it, and then the report lists it as missing."""
    from Retrieval import model_state

    config = load_config(tiny_fisvl_config_path)
    torch.manual_seed(0)
    source = randomise_(build_model(config, pretrained=False), 13)
    objective = randomise_(build_objective(config, parse_stages(config)), 13)
    saved = model_state(source, objective, config, 3, 41.5, "val")
    # the affiliation temperature is saved with the losses that own it, not with the model
    assert "temp2" not in saved["model"] and saved["objective"].keys() == {"losses.affil.temp"}
    assert torch.equal(saved["objective"]["losses.affil.temp"], objective.losses["affil"].temp.detach())
    torch.save(saved, tmp_path / "checkpoint_best.pth")
    torch.manual_seed(1)
    target = build_model(config, pretrained=False).eval()
    report = load_for_evaluation(target, str(tmp_path / "checkpoint_best.pth"), config)
    assert_same_tensors(target.state_dict(), source.state_dict())
    assert (report.loaded, report.resized, report.missing, report.unexpected) == (len(source.state_dict()), [], [], [])
    x = images(32, 3)
    text = text_inputs()
    with torch.no_grad():
        torch.testing.assert_close(target.encode_image(x), source.encode_image(x), rtol=0, atol=0)
        torch.testing.assert_close(target.encode_text(text), source.encode_text(text), rtol=0, atol=0)

    del saved["model"]["head_img.weight"]
    torch.save(saved, tmp_path / "incomplete.pth")
    with pytest.raises(WeightsError) as failure:
        load_for_evaluation(build_model(config, pretrained=False), str(tmp_path / "incomplete.pth"), config)
    assert "missing: head_img.weight (a wrong or incomplete checkpoint" in str(failure.value)
    allowing = load_config(tiny_fisvl_config_path, ["allow_missing_weights=['head_img.*']"])
    caplog.set_level(logging.INFO, logger="utils.weights")
    report = load_for_evaluation(build_model(allowing, pretrained=False), str(tmp_path / "incomplete.pth"), allowing)
    assert report.missing == ["head_img.weight"]
    assert f"model <- {tmp_path / 'incomplete.pth'}: allowed to stay as initialised: head_img.weight" in caplog.messages


# --- 10: errors


def test_missing_files_name_what_they_are(tiny_fisvl_config_path: Path, tmp_path: Path) -> None:
    """A missing Swin checkpoint, BERT folder, BERT weights or resnet_ckpt: each error says which file and what
    it is for."""
    missing = tmp_path / "nowhere" / "swin.pth"
    with pytest.raises(WeightsError) as failure:
        build_vision_encoder(dict(TINY_SWIN)).load_pretrained(str(missing))
    assert str(failure.value) == (f"{SWIN_WHAT} not found: {missing} (nothing is downloaded; see the README's "
                                  f"weights section)")
    text = BertTextEncoder(BertConfig(**TINY_BERT))
    with pytest.raises(WeightsError) as failure:
        text.load_pretrained(str(tmp_path / "bert-base-uncased"))
    assert str(failure.value).startswith(f"BERT folder not found: {tmp_path / 'bert-base-uncased'} (text_encoder: ")
    (tmp_path / "empty-bert").mkdir()
    with pytest.raises(WeightsError) as failure:
        text.load_pretrained(str(tmp_path / "empty-bert"))
    assert str(failure.value) == (f"BERT folder {tmp_path / 'empty-bert'} has no weights "
                                  f"(model.safetensors or pytorch_model.bin)")
    config = load_config(tiny_fisvl_config_path, [f"resnet_ckpt={tmp_path / 'rsp.pth'}"])
    with pytest.raises(WeightsError) as failure:
        build_model(config, pretrained=True)
    assert str(failure.value).startswith(f"resnet_ckpt not found: {tmp_path / 'rsp.pth'} (the prior CNN's weights")


def test_unsafe_and_mismatched_files_are_errors(tmp_path: Path) -> None:
    """A pickle that needs arbitrary code is refused (weights_only=True); a checkpoint of another model size
    is an error listing the tensors whose shapes differ."""
    source = build_vision_encoder(dict(TINY_SWIN))
    torch.save({"model": source.state_dict(), "args": NotATensor()}, tmp_path / "unsafe.pth")
    with pytest.raises(WeightsError) as failure:
        source.load_pretrained(str(tmp_path / "unsafe.pth"))
    assert str(failure.value).startswith(f"{SWIN_WHAT} {tmp_path / 'unsafe.pth'} cannot be read with "
                                         f"weights_only=True")
    wider = build_vision_encoder({**TINY_SWIN, "embed_dim": 48, "vision_width": 96})
    torch.save(wider.state_dict(), tmp_path / "wider.pth")
    with pytest.raises(WeightsError) as failure:
        source.load_pretrained(str(tmp_path / "wider.pth"))
    message = str(failure.value)
    assert message.startswith(f"vision encoder <- {tmp_path / 'wider.pth'}: tensor shapes differ")
    assert "\n  patch_embed.proj.weight: file (48, 3, 4, 4) vs model (32, 3, 4, 4)\n" in message


def test_encoders_without_weights_need_allow_random_init(tiny_config_path: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """An encoder whose config names no weights is an error naming the encoder and allow_random_init; listed
    there it only warns; a name in allow_random_init that is no registered model's encoder is an error of
    build_model (the config's keys are shared by every model)."""
    config = tiny_config(tiny_config_path, tmp_path, None, "allow_random_init=[text_encoder]")
    with pytest.raises(WeightsError) as failure:
        build_model(config, pretrained=True)
    assert str(failure.value) == (f"vision_encoder: {config['vision_config']} names no ckpt. Name its weights (see "
                                  f"the README's weights section), or add vision_encoder to allow_random_init to "
                                  f"train it from random weights")
    config = tiny_config(tiny_config_path, tmp_path, None, "allow_random_init=[vision_encoder, text_encoder]")
    caplog.set_level(logging.WARNING, logger="models.loading")
    build_model(config, pretrained=True)
    assert [r.getMessage() for r in caplog.records if r.name == "models.loading"] == [
        f"vision_encoder: random init ({config['vision_config']} names no ckpt; allowed by allow_random_init)",
        f"text_encoder: random init (no weights in the text_encoder folder {config['text_encoder']}; allowed by "
        f"allow_random_init)"]
    config = load_config(tiny_config_path, ["allow_random_init=[vision]"])
    with pytest.raises(ValueError) as failure:
        build_model(config, pretrained=False)
    assert str(failure.value) == ("allow_random_init names ['vision']; the encoders of the registered models are "
                                  "clip, conv_encoder, image_encoder, text_encoder, vision_encoder")


def test_allow_missing_weights_patterns_reach_the_encoder_loads(tiny_config_path: Path, tmp_path: Path) -> None:
    """A vision checkpoint without the final norm: an error naming the tensors, unless an
    ``allow_missing_weights`` pattern in model names (``vision_encoder.norm.*``) covers them; then they keep
    their initial values and the rest loads."""
    torch.manual_seed(0)
    source = randomise_(build_vision_encoder(dict(TINY_SWIN)), 14)
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("norm.")}
    torch.save({"model": partial}, tmp_path / "no_norm.pth")
    vision = {**TINY_SWIN, "ckpt": str(tmp_path / "no_norm.pth")}
    with pytest.raises(WeightsError) as failure:
        build_model(tiny_config(tiny_config_path, tmp_path, vision), pretrained=True)
    assert "; missing: norm.weight, norm.bias (a wrong or incomplete checkpoint" in str(failure.value)
    torch.manual_seed(1)
    allowing = tiny_config(tiny_config_path, tmp_path, vision, "allow_missing_weights=['vision_encoder.norm.*']")
    model = build_model(allowing, pretrained=True)
    loaded = model.vision_encoder.state_dict()
    assert_same_tensors({k: v for k, v in loaded.items() if not k.startswith("norm.")}, partial)
    assert torch.equal(loaded["norm.weight"], torch.ones(64)) and torch.equal(loaded["norm.bias"], torch.zeros(64))


# --- 11: the report is logged


def test_load_report_is_logged_with_exact_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The file's size and sha256, the summary line and the detail lines of one load (a 2-stage Microsoft Swin
    with its head)."""
    torch.manual_seed(0)
    source = build_vision_encoder(dict(TINY_SWIN))
    torch.save({"model": to_official_swin(source, head_classes=10)}, tmp_path / "swin.pth")
    caplog.set_level(logging.INFO, logger="utils.weights")
    report = build_vision_encoder(dict(TINY_SWIN)).load_pretrained(str(tmp_path / "swin.pth"))
    name = f"vision encoder <- {tmp_path / 'swin.pth'}"
    assert isinstance(report, LoadReport)
    records = [r for r in caplog.records if r.name == "utils.weights"]
    file = tmp_path / "swin.pth"
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    assert [r.getMessage() for r in records] == [
        f"reading Swin checkpoint (the vision_config JSON's ckpt): {file} ({file.stat().st_size} bytes, "
        f"sha256 {digest})",
        f"{name}: loaded 35 tensors (0 resized), 0 missing, 4 unexpected",
        f"{name}: tensors of the file not used: layers.0.blocks.0.attn.relative_position_index (rebuilt by the "
        f"model), layers.1.blocks.0.attn.relative_position_index (rebuilt by the model), head.weight (classifier), "
        f"head.bias (classifier)"]
    assert [r.levelno for r in records] == [logging.INFO] * 3


# --- 12: the command line


def test_cli_evaluate_logs_the_load_report(tiny_config_path: Path, tmp_path: Path) -> None:
    """``Retrieval.py --evaluate --checkpoint checkpoint_best.pth`` loads the model through the report, which
    lands in the run's ``run.log`` with exact counts, and evaluates."""
    from Retrieval import model_state

    config = load_config(tiny_config_path)
    torch.manual_seed(0)
    model = build_model(config, pretrained=False)
    checkpoint = tmp_path / "run" / "checkpoint_best.pth"
    checkpoint.parent.mkdir()
    torch.save(model_state(model, build_objective(config, parse_stages(config)), config, 0, 10.0, "val"), checkpoint)
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, str(ROOT / "Retrieval.py"), "--config", str(tiny_config_path),
                             "--output_dir", str(out), "--evaluate", "--checkpoint", str(checkpoint),
                             "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    count = len(model.state_dict())
    line = f"INFO utils.weights: model <- {checkpoint}: loaded {count} tensors (0 resized), 0 missing, 0 unexpected"
    assert line in (out / "run.log").read_text(encoding="utf-8")
    assert json.loads((out / "eval_results.json").read_text())["checkpoint"] == str(checkpoint)
