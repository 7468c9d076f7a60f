"""A frozen prior CNN beside a model's image tower: the base of FISVL (the CNN's global token joins the graph
of FGIS), of FISVL on CLIP, and of PIR (the CNN's pooled features are VIR's instruction vector).

Both published models build a torchvision ResNet, freeze it (``finetune_conv: False``) and still put it in
train mode with the rest of the model, so its BatchNorm uses batch statistics; both copy one fusion block
to make every step of their fusion (``clones()``), so the steps start from identical weights. The keys of
this shared part are declared here.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn

from utils.config import Key, register_keys
from utils.weights import WeightsError, patterns_under

from .base import RetrievalModel
from .dual_encoder import DualEncoder
from .encoders.resnet import ResNetEncoder
from .loading import random_init
from .text import TextProcessor

register_keys("Prior CNN and fusion (fisvl, pir)", {
    "conv_arch": Key((str,), "resnet50", "FISVL/PIR prior CNN (torchvision layout)",
                     choices=("resnet18", "resnet34", "resnet50")),
    "resnet_ckpt": Key((str,), None, "prior CNN weights (FISVL/PIR; torchvision layout, e.g. RSP's ResNet-50)",
                       is_path=True),
    "finetune_conv": Key((bool,), False, "train the prior CNN (FISVL/PIR keep it frozen)"),
    "conv_bn_train_mode": Key((bool,), True, "frozen CNN's BatchNorm in train mode, so batch statistics are used "
                              "and running statistics drift (as published); false = eval mode"),
    "dropout_r": Key((float,), 0.2, "dropout of the fusion blocks (FISVL/PIR)"),
    "init": Key((str,), "default", "initialisation of the fusion blocks: default, or published = each step a copy "
                "of one block (FISVL's graph steps, PIR's PAE steps and mappings) and FISVL's SFGS initialised "
                "as its ResNet's layers (kaiming fan-out convs, nn.Linear attention projections)",
                choices=("default", "published")),
})


def fusion_steps(make: Callable[[], nn.Module], count: int, published: bool) -> nn.ModuleList:
    """``count`` fusion steps with separate weights: each initialised on its own, or (``published``) deep
    copies of one block, as the published ``clones()`` makes them, so that every step starts equal."""
    if not published:
        return nn.ModuleList(make() for _ in range(count))
    block = make()
    return nn.ModuleList(copy.deepcopy(block) for _ in range(count))


class PriorCNN(RetrievalModel):
    """``conv_encoder`` (a frozen torchvision ResNet, ``ResNetEncoder``) and ``conv_proj`` (to the model's
    ``embed_dim``) beside a model's towers, built when ``use_prior``; loading, freezing and the train/eval mode of
    the frozen parts. A mixin: it comes before the towers' class in the bases (``PriorDualEncoder``)."""

    encoder_names = ("conv_encoder",)
    embed_dim: int

    def __init__(self, config: dict[str, Any], text_processor: TextProcessor | None = None,
                 use_prior: bool = True) -> None:
        super().__init__(config, text_processor)
        self.use_prior = use_prior
        if not use_prior:
            return
        self.finetune_conv = config["finetune_conv"]
        self.conv_bn_train_mode = config["conv_bn_train_mode"]
        self.conv_encoder = ResNetEncoder(config["conv_arch"]).requires_grad_(self.finetune_conv)
        self.conv_proj = nn.Linear(self.conv_encoder.width, self.embed_dim)

    def frozen_parts(self) -> list[nn.Module]:
        """Parts that are built but not trained; ``conv_bn_train_mode: false`` keeps them in eval mode."""
        return [self.conv_encoder] if self.use_prior and not self.finetune_conv else []

    def train(self, mode: bool = True) -> "PriorCNN":
        """As published, ``train()`` also puts the frozen parts in train mode: batch statistics, drifting running
        statistics, active dropout. ``conv_bn_train_mode: false`` keeps them in eval mode instead."""
        super().train(mode)
        if mode and self.use_prior and not self.conv_bn_train_mode:
            for part in self.frozen_parts():
                part.eval()
        return self

    def encoders(self) -> dict[str, nn.Module]:
        return {**super().encoders(), "conv_encoder": self.conv_encoder} if self.use_prior else super().encoders()

    def pretrained_sources(self, config: dict[str, Any]) -> dict[str, str | None]:
        sources = super().pretrained_sources(config)
        return {**sources, "conv_encoder": config["resnet_ckpt"] or None} if self.use_prior else sources

    def load_pretrained(self, config: dict[str, Any], parts: Iterable[str] | None = None) -> None:
        parts = list(self.encoders()) if parts is None else list(parts)
        super().load_pretrained(config, [part for part in parts if part != "conv_encoder"])
        if "conv_encoder" not in parts:
            return
        path = config["resnet_ckpt"]
        if not path:
            random_init("conv_encoder", config, "resnet_ckpt is not set" + (
                "" if self.finetune_conv else "; the prior CNN is frozen, so it stays random"))
            return
        if not Path(path).is_file():
            raise WeightsError(f"resnet_ckpt not found: {path} (the prior CNN's weights, e.g. RSP's "
                               f"aid_28-rsp-resnet-50-ckpt.pth; see the README's weights section)")
        self.conv_encoder.load_pretrained(path, patterns_under(config["allow_missing_weights"], "conv_encoder."))


class PriorDualEncoder(PriorCNN, DualEncoder):
    """The Swin + BERT dual encoder with the prior CNN (PIR; FISVL through FGIS)."""
