"""Registries (timm's habit): a config's ``model`` key names a registered model builder, and a stage's
``losses`` name registered loss modules."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, ModelBuilder] = {}
_LOSSES: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: make ``builder(config, text_processor=None) -> RetrievalModel`` available as ``model: <name>``."""

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


def register_loss(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make a loss module available to stages under its ``name``."""
    name: Any = getattr(cls, "name", None)
    if not isinstance(name, str) or name in _LOSSES:
        raise ValueError(f"loss {cls.__name__} needs a unique class attribute `name`, got {name!r}")
    _LOSSES[name] = cls
    return cls


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def get_loss(name: str) -> type[nn.Module]:
    if name not in _LOSSES:
        raise KeyError(f"unknown loss {name!r}; registered losses: {', '.join(list_losses())}")
    return _LOSSES[name]
