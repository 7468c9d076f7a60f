"""Model registry: a config's ``model`` key names a builder registered here (timm's habit)."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

ModelBuilder = Callable[[dict[str, Any]], nn.Module]
_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: make ``builder(config) -> nn.Module`` available as ``model: <name>`` in configs."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_model_builder(name: str) -> ModelBuilder:
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name]
