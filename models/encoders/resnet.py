"""The frozen prior CNN of FISVL/PIR: a torchvision ResNet that returns its stem output and pooled features.

Module names are torchvision's (``conv1``, ``bn1``, ``layer1``-``layer4``), which RSP's remote-sensing
ResNet-50 checkpoints use; the classifier is not built.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from utils.weights import LoadReport, load_into, read_state_dict

_ARCHS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class PriorCNN(ResNet):
    """``forward_prior(x) -> (stem, pooled)``: the max-pooled stem map [B, 64, H/4, W/4] and the global
    average of layer 4 [B, width]."""

    def __init__(self, arch: str = "resnet50") -> None:
        if arch not in _ARCHS:
            raise ValueError(f"conv_arch must be one of {sorted(_ARCHS)}, got {arch!r}")
        block, layers = _ARCHS[arch]
        super().__init__(block, layers)
        self.width = self.fc.in_features
        del self.fc

    @property
    def stem_channels(self) -> int:
        return self.conv1.out_channels

    def forward_prior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stem = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        deep = self.layer4(self.layer3(self.layer2(self.layer1(stem))))
        return stem, self.avgpool(deep).flatten(1)  # flatten, not squeeze: a batch of 1 keeps its axis

    def load_pretrained(self, path: str) -> LoadReport:
        """torchvision-layout checkpoints (RSP's ``aid_28-rsp-resnet-50-ckpt.pth``); the classifier is dropped."""
        return load_into(self, read_state_dict(path, "ResNet checkpoint"), f"prior CNN <- {path}",
                         ignore_unexpected=("fc.",))
