"""Retrieval models. ``build_model(config)`` builds the model a config names; ``list_models()`` lists them."""
from __future__ import annotations

from typing import Any

from torch import nn

from ._registry import get_model_builder, list_models, register_model
from . import dual_encoder, fisvl  # noqa: F401  (register their models)

__all__ = ["build_model", "list_models", "register_model"]


def build_model(config: dict[str, Any], pretrained: bool = True) -> nn.Module:
    """Build ``config['model']``; with ``pretrained`` load the weight files the config names.

    With ``pretrained=False`` the architecture gets random weights and no weight file is read.
    """
    model = get_model_builder(config["model"])(config)
    if pretrained:
        model.load_pretrained(config)
    return model
