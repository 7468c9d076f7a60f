"""A torchvision ResNet without its classifier: the frozen prior CNN of FISVL/PIR (stem output and pooled
features) and the fine-tuned image backbone of AMFMN and SIRS (the maps of its four stages).

Module names are torchvision's (``conv1``, ``bn1``, ``layer1``-``layer4``), which RSP's remote-sensing
ResNet-50 checkpoints and torchvision's ImageNet files use.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from utils.weights import LoadReport, Remapped, StateDict, load_into, read_state_dict

_ARCHS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNetEncoder(ResNet):
    """``forward_prior(x) -> (stem, pooled)``: the max-pooled stem map [B, 64, H/4, W/4] and the global
    average of layer 4 [B, width]; ``forward_stages(x)``: the outputs of layer1-layer4."""

    def __init__(self, arch: str = "resnet50") -> None:
        if arch not in _ARCHS:
            raise ValueError(f"ResNet arch must be one of {sorted(_ARCHS)}, got {arch!r}")
        block, layers = _ARCHS[arch]
        super().__init__(block, layers)
        self.width = self.fc.in_features
        self.stage_channels = [block.expansion * width for width in (64, 128, 256, 512)]
        del self.fc

    @property
    def stem_channels(self) -> int:
        return self.conv1.out_channels

    def forward_prior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stem = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        deep = self.layer4(self.layer3(self.layer2(self.layer1(stem))))
        return stem, self.avgpool(deep).flatten(1)  # flatten, not squeeze: a batch of 1 keeps its axis

    def forward_stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[f1, f2, f3, f4] at strides 4, 8, 16 and 32 (ResNet-18: 64, 128, 256 and 512 channels)."""
        stages = [self.maxpool(self.relu(self.bn1(self.conv1(images))))]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            stages.append(layer(stages[-1]))
        return stages[1:]

    def remap_state(self, state: StateDict) -> Remapped:
        """torchvision names, or PIR's ``nn.Sequential`` wrapper of them (``0.`` conv1, ``1.`` bn1, ``4.``-``7.``
        layer1-4) -> this model; the classifier (any class count) is dropped."""
        out: StateDict = {}
        dropped = []
        for key, value in state.items():
            first, _, rest = key.partition(".")
            key = f"{_SEQUENTIAL_NAMES[first]}.{rest}" if first in _SEQUENTIAL_NAMES else key
            if key.startswith("fc."):
                dropped.append(f"{key} (classifier of {value.shape[0]} classes)")
            else:
                out[key] = value
        return Remapped(out, dropped=dropped)

    def load_pretrained(self, path: str, allow_missing: Iterable[str] = (), key: str = "resnet_ckpt",
                        role: str = "prior CNN") -> LoadReport:
        """torchvision-layout checkpoints such as RSP's ``aid_28-rsp-resnet-50-ckpt.pth`` or torchvision's
        ImageNet files, with or without ``model``/``state_dict`` wrappers and ``module.`` prefixes; ``key`` names
        the config key and ``role`` the part in messages."""
        state = read_state_dict(path, f"ResNet checkpoint ({key})")
        return load_into(self, self.remap_state(state), f"{role} <- {path}", allow_missing=allow_missing)


_SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
