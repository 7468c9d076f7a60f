"""Using a trained model: embed images and texts in batches, score them, and rebuild a model from its
checkpoint alone (``load_retriever``). Evaluation embeds through the same functions, so embeddings from
``load_retriever`` reproduce the evaluated recalls exactly."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image

from dataset.images import ImageDecoding, load_rgb
from utils.checkpoint import CHECKPOINT_VERSION, load_checkpoint
from utils.config import config_from_dict
from utils.precision import autocast

from .base import RetrievalModel
from .text import processor_from_state


@torch.no_grad()
def embed_image_batches(model: RetrievalModel, batches: Iterable[torch.Tensor], device: torch.device,
                        precision: str = "fp32") -> torch.Tensor:
    """``encode_image`` over batches of transformed images, as float32 rows in order."""
    model.eval()
    with autocast(precision, device):
        parts = [model.encode_image(images.to(device, non_blocking=True)).float() for images in batches]
    return torch.cat(parts) if parts else torch.empty(0, 0, device=device)


@torch.no_grad()
def embed_texts(model: RetrievalModel, texts: Sequence[str], batch_size: int, device: torch.device,
                precision: str = "fp32") -> torch.Tensor:
    """``encode_text`` of raw strings through the model's own text processor, ``batch_size`` at a time."""
    model.eval()
    parts = []
    with autocast(precision, device):
        for start in range(0, len(texts), batch_size):
            tokens = model.text_processor(list(texts[start:start + batch_size]))
            parts.append(model.encode_text({k: v.to(device) for k, v in tokens.items()}).float())
    return torch.cat(parts) if parts else torch.empty(0, 0, device=device)


@torch.no_grad()
def similarity_matrix(model: RetrievalModel, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """``[n_images, n_texts]`` scores by the model's ``similarity``, block by block (``similarity_chunks``): a
    pairwise model scores each block of pairs vectorised, with bounded memory."""
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    if n_images == 0 or n_texts == 0:
        return image_emb.new_zeros(n_images, n_texts)
    images_per, texts_per = model.similarity_chunks
    texts_per = texts_per or n_texts
    return torch.cat([torch.cat([model.similarity(image_emb[i:i + images_per], text_emb[j:j + texts_per]).float()
                                 for j in range(0, n_texts, texts_per)], dim=1)
                      for i in range(0, n_images, images_per)])


def checkpoint_payload(model: RetrievalModel, config: dict[str, Any]) -> dict[str, Any]:
    """What makes a checkpoint self-contained: the weights, the config with the architecture files inlined,
    and the text processor's state (vocabulary included)."""
    return {"model": model.state_dict(), "config": model.inline_config(config),
            "text_processor": model.text_processor.state(), "version": CHECKPOINT_VERSION}


class Retriever:
    """A trained model ready for use: ``encode_images`` (paths or PIL images), ``encode_texts`` (raw strings),
    ``similarity``; batches, transforms, decoding and precision come from the checkpoint's config."""

    def __init__(self, model: RetrievalModel, config: dict[str, Any], device: torch.device) -> None:
        self.model, self.config, self.device = model.to(device).eval(), config, device
        self.decoding = ImageDecoding.from_config(config["image_decode"])

    def _image_batches(self, images: Sequence[str | Path | Image.Image], batch_size: int) -> Iterable[torch.Tensor]:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            yield torch.stack([self.model.eval_transform(image if isinstance(image, Image.Image)
                                                         else load_rgb(image, self.decoding)) for image in chunk])

    def encode_images(self, images: Sequence[str | Path | Image.Image], batch_size: int | None = None) -> torch.Tensor:
        batch_size = batch_size or self.config["batch_size_test"]
        return embed_image_batches(self.model, self._image_batches(images, batch_size), self.device,
                                   self.config["precision"])

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        return embed_texts(self.model, texts, batch_size or self.config["batch_size_test_text"], self.device,
                           self.config["precision"])

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return similarity_matrix(self.model, image_emb.to(self.device), text_emb.to(self.device))


def load_retriever(path: str | Path, device: str | torch.device = "cpu") -> Retriever:
    """Rebuild the model, its text processor and transforms from a checkpoint written by training; no config,
    JSON or vocabulary file is needed beside it."""
    from . import build_model

    saved = load_checkpoint(path)
    if "text_processor" not in saved or "config" not in saved:
        raise ValueError(f"{path} is not a self-contained checkpoint (it has no text processor or config; "
                         f"checkpoints written before version {CHECKPOINT_VERSION} and released PIR/FISVL ones "
                         f"evaluate with: python run.py --evaluate --checkpoint {path} --config <their YAML>)")
    config = config_from_dict(saved["config"], f"{path} (its config)")
    model = build_model(config, pretrained=False, text_processor=processor_from_state(saved["text_processor"]))
    model.load_state_dict(saved["model"])
    return Retriever(model, config, torch.device(device))
