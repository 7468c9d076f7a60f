"""Retrieval models, usable without the trainer: ``build_model(config)`` builds the model a config names,
``load_retriever(checkpoint)`` rebuilds a trained one from its checkpoint alone; ``list_models()`` and
``list_losses()`` list what is registered."""
from __future__ import annotations

from typing import Any

from ._registry import get_loss, get_model_builder, list_losses, list_models, register_loss, register_model
from .base import RetrievalModel
from . import losses, objective  # noqa: F401  (register the losses and their config keys)
from . import amfmn, clip, dual_encoder, fisvl, fisvl_clip, pir, sirs  # noqa: F401  (register the models and their config keys)
from . import evaluation  # noqa: F401  (declares the re-rank keys every model's evaluation reads)
from .inference import Retriever, load_retriever
from .text import TextProcessor

__all__ = ["RetrievalModel", "Retriever", "build_model", "get_loss", "list_losses", "list_models",
           "load_retriever", "register_loss", "register_model"]


def build_model(config: dict[str, Any], pretrained: bool = True,
                text_processor: TextProcessor | None = None) -> RetrievalModel:
    """Build ``config['model']``; with ``pretrained`` load the weight files the config names.

    With ``pretrained=False`` the architecture gets random weights and no weight file is read.
    ``text_processor`` replaces the one the model would build from its files (a checkpoint's).
    """
    model = get_model_builder(config["model"])(config, text_processor)
    known = _encoder_names(RetrievalModel)
    unknown = [part for part in config["allow_random_init"] if part not in known]
    if unknown:  # another model's encoder is fine (configs are shared), a typo is not
        raise ValueError(f"allow_random_init names {unknown}; the encoders of the registered models are "
                         f"{', '.join(sorted(known))}")
    if pretrained:
        model.load_pretrained(config)
    return model


def _encoder_names(cls: type[RetrievalModel]) -> set[str]:
    """Every ``encoder_names`` of ``cls`` and its subclasses."""
    return set(cls.encoder_names).union(*(_encoder_names(sub) for sub in cls.__subclasses__()))
