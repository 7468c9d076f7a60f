"""Image encoders from timm with one small interface: ``forward_tokens(x) -> [B, 1 + L, width]``.

Token 0 is the pooled token (Swin: X-VLM's average of the normed patch tokens; ViT: the class token),
followed by the patch tokens. Architectures are data: a JSON file names the sizes (PIR's
``config_swinT_224.json`` keys), optionally ``arch`` (``swin`` or ``vit``) and ``ckpt``.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter
from torch import nn

from utils.weights import LoadReport, Remapped, StateDict, load_into, read_state_dict, shape_changes

_REQUIRED_KEYS = {
    "swin": ("vision_width", "image_res", "window_size", "embed_dim", "depths", "num_heads"),
    "vit": ("vision_width", "image_res", "patch_size", "depth", "num_heads"),
}
_OPTIONAL_KEYS = ("arch", "ckpt", "drop_path_rate", "patch_size", "mlp_ratio", "pre_norm", "act_layer", "norm_eps")


class SwinTokens(SwinTransformer):
    """timm Swin whose token output follows X-VLM: final norm, then [mean token; patch tokens]."""

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(images).flatten(1, 2)  # [B, H*W, C], already layer-normed
        return torch.cat([tokens.mean(1, keepdim=True), tokens], 1)

    @property
    def width(self) -> int:
        return self.num_features

    @property
    def total_stride(self) -> int:
        return self.patch_embed.patch_size[0] * 2 ** (len(self.layers) - 1)

    def remap_state(self, state: StateDict) -> Remapped:
        """Microsoft's (also X-VLM's) or timm's Swin names -> this model: downsample layers move to the next
        stage, relative-position tables are resized to this window, index and mask buffers are dropped
        (the module rebuilds them), and so is the classifier."""
        head = [k for k in state if k.startswith("head.")]
        body = {k: v for k, v in state.items() if not k.startswith("head.")}
        buffers = [k for k in body if k.endswith(("relative_position_index", "attn_mask"))]
        out = swin_filter(body, self)
        dropped = [f"{k} (rebuilt by the model)" for k in buffers] + [f"{k} (classifier)" for k in head]
        # only these keep their names and may change shape; downsample keys are renamed, not resized
        resizable = {k: v for k, v in body.items()
                     if k.endswith(("relative_position_bias_table", "patch_embed.proj.weight"))}
        return Remapped(out, shape_changes(resizable, out), dropped)

    def load_pretrained(self, path: str, allow_missing: Iterable[str] = ()) -> LoadReport:
        """Microsoft or timm Swin checkpoints (.pth or .safetensors)."""
        state = read_state_dict(path, "Swin checkpoint (the vision_config JSON's ckpt)")
        return load_into(self, self.remap_state(state), f"vision encoder <- {path}", allow_missing=allow_missing)


class ViTTokens(VisionTransformer):
    """timm ViT; its normed tokens already start with the class token."""

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)

    @property
    def width(self) -> int:
        return self.num_features

    @property
    def total_stride(self) -> int:
        return self.patch_embed.patch_size[0]

    def remap_state(self, state: StateDict) -> Remapped:
        """timm/DeiT names, or OpenAI CLIP's ``visual.*`` (a vision JSON with ``pre_norm: true``,
        ``act_layer: quick_gelu`` and ``norm_eps: 1e-5`` builds that architecture) -> this model, with timm's filter; the position
        embedding is resized to this grid; classifiers and CLIP's projection are dropped."""
        source_pos = state.get("pos_embed", state.get("visual.positional_embedding"))
        out = vit_filter(state, self)
        dropped = [f"{k} (classifier or projection)" for k in out if k.startswith(("head.", "head_dist."))]
        out = {k: v for k, v in out.items() if not k.startswith(("head.", "head_dist."))}
        resized = []
        if source_pos is not None and source_pos.shape[-2] != out["pos_embed"].shape[-2]:
            resized.append(f"pos_embed: {source_pos.shape[-2]} -> {out['pos_embed'].shape[-2]} tokens")
        return Remapped(out, resized, dropped)

    def load_pretrained(self, path: str, allow_missing: Iterable[str] = ()) -> LoadReport:
        """timm, DeiT or OpenAI-CLIP ViT checkpoints (.pth or .safetensors)."""
        state = read_state_dict(path, "ViT checkpoint (the vision_config JSON's ckpt)")
        return load_into(self, self.remap_state(state), f"vision encoder <- {path}", allow_missing=allow_missing)


def read_vision_config(path: str | dict[str, Any], default_arch: str) -> dict[str, Any]:
    """Load and check a vision JSON (or its contents, as a checkpoint carries them); ``default_arch``
    applies when it names none (PIR's ``use_swin``)."""
    if isinstance(path, dict):
        cfg, path = dict(path), "vision_config (inline)"
    else:
        try:
            cfg = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"vision_config JSON not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
    arch = cfg.setdefault("arch", default_arch)
    if arch not in _REQUIRED_KEYS:
        raise ValueError(f"{path}: arch must be one of {sorted(_REQUIRED_KEYS)}, got {arch!r}")
    missing = [k for k in _REQUIRED_KEYS[arch] if k not in cfg]
    unknown = [k for k in cfg if k not in _REQUIRED_KEYS[arch] + _OPTIONAL_KEYS]
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown} for arch {arch!r}")
    return cfg


def build_vision_encoder(cfg: dict[str, Any]) -> SwinTokens | ViTTokens:
    """Random-initialised encoder of the sizes in ``cfg`` (weights are loaded separately)."""
    common = dict(img_size=cfg["image_res"], num_classes=0, global_pool="", mlp_ratio=cfg.get("mlp_ratio", 4.0),
                  drop_path_rate=cfg.get("drop_path_rate", 0.1))
    if cfg["arch"] == "swin":
        encoder = SwinTokens(patch_size=cfg.get("patch_size", 4), embed_dim=cfg["embed_dim"],
                             depths=tuple(cfg["depths"]), num_heads=tuple(cfg["num_heads"]),
                             window_size=cfg["window_size"], **common)
    else:
        encoder = ViTTokens(patch_size=cfg["patch_size"], embed_dim=cfg["vision_width"], depth=cfg["depth"],
                            num_heads=cfg["num_heads"], pre_norm=cfg.get("pre_norm", False),
                            act_layer=cfg.get("act_layer", "gelu"),
                            norm_layer=partial(nn.LayerNorm, eps=cfg.get("norm_eps", 1e-6)), **common)
    if encoder.width != cfg["vision_width"]:
        raise ValueError(f"vision_width {cfg['vision_width']} does not match the built encoder's width {encoder.width}")
    return encoder
