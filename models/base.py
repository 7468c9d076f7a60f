"""The interface every registered retrieval model implements (timm's uniform model API, open_clip's
``encode_image`` / ``encode_text`` and model-owned preprocessing).

The training loop, evaluation, inference and the data pipeline use only this interface: a model brings
its text processor, its image transforms, its score and the per-sample fields it needs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from utils.weights import Remapped, StateDict

from .text import TextProcessor

# X-VLM / PIR / FISVL: no weight decay for any parameter whose name contains one of these.
XVLM_NO_DECAY_NAME_PARTS = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
                            "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")


class RetrievalModel(nn.Module, ABC):
    """An image tower, a text tower and a score between their embeddings.

    Attributes a model sets in ``__init__``:

    * ``text_processor``: raw strings -> the dict ``encode_text`` takes (cleaning included);
    * ``train_transform`` / ``eval_transform``: PIL image -> tensor;
    * ``sample_fields``: per-sample inputs beyond image and caption that ``forward`` reads from the batch
      (a segmentation mask, ...); the data pipeline carries each declared field through;
    * ``encoder_names`` (class attribute): the names ``encoders()`` can return;
    * ``scores_are_dot_products``: False for a model whose ``similarity`` is not the dot product of its
      embeddings (a pairwise head); only losses that call ``similarity`` then apply;
    * ``similarity_chunks``: (images, captions) scored at a time in evaluation (``None`` = all captions);
    * ``seg_classes``: the classes ``segment`` predicts, for a model that also segments (0 = it does not).
    """

    text_processor: TextProcessor
    train_transform: Callable
    eval_transform: Callable
    sample_fields: tuple[str, ...] = ()
    encoder_names: ClassVar[tuple[str, ...]] = ()  # the keys of encoders(), for checking allow_random_init
    scores_are_dot_products: bool = True
    similarity_chunks: tuple[int, int | None] = (1024, None)
    seg_classes: int = 0

    @abstractmethod
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, D]`` image embeddings."""

    @abstractmethod
    def encode_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``text_processor``'s output -> ``[B, D']`` text embeddings."""

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """``[n_images, n_texts]`` scores; cosine for L2-normalised embeddings. A model whose score is not a
        dot product overrides this; evaluation calls it on blocks of ``similarity_chunks``."""
        return image_emb @ text_emb.t()

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, seg_classes, H, W]`` segmentation logits, for a model with ``seg_classes`` > 0."""
        raise NotImplementedError(f"{type(self).__name__} does not segment")

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The features the losses read: ``image_feat``, ``text_feat`` and whatever else the model adds."""
        return {"image_feat": self.encode_image(batch["images"]), "text_feat": self.encode_text(batch["text"])}

    # --- weights

    def encoders(self) -> dict[str, nn.Module]:
        """Pretrained parts by state-dict prefix; each has ``remap_state`` and ``load_pretrained``."""
        return {}

    def pretrained_sources(self, config: dict[str, Any]) -> dict[str, str | None]:
        """The weight file (or folder) the config names for each encoder; ``None`` where it names none."""
        return {}

    def load_pretrained(self, config: dict[str, Any], parts: Iterable[str] | None = None) -> None:
        """Load the weights the config names into ``parts`` (default: every encoder)."""

    def remap_checkpoint(self, state: StateDict) -> Remapped:
        """A whole-model state dict in a published layout -> this model's names."""
        return Remapped(dict(state))

    def head_parameter_names(self) -> set[str]:
        """Newly initialised parameters (no pretrained file holds them); ``optimizer.lr_mult`` applies to them."""
        prefixes = tuple(f"{name}." for name in self.encoders())
        return {n for n, _ in self.named_parameters() if not n.startswith(prefixes)}

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay beyond the model's rule (position embeddings, ...)."""
        return set()

    def decays(self, name: str, param: torch.Tensor) -> bool:
        """Whether weight decay applies to parameter ``name``: X-VLM's substring rule by default (the X-VLM
        lineage keeps it exactly); a model with another rule (open_clip's by shape) overrides this."""
        return not (any(part in name for part in XVLM_NO_DECAY_NAME_PARTS) or name in self.no_weight_decay())

    # --- self-contained checkpoints

    def inline_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with every file the architecture is read from replaced by its contents, so that
        ``build_model`` rebuilds this model (with ``pretrained=False``) on a machine without those files."""
        return dict(config)
