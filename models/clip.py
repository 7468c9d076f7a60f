"""CLIP towers through open_clip (model ``clip``): any open_clip architecture with weights from a local file
(OpenAI, RemoteCLIP, GeoRSCLIP, open_clip training checkpoints), zero-shot or fine-tuned (clip-and-search.md).

The open_clip model lives under ``clip.`` in the state dict, with open_clip's (= OpenAI's) names below it, so a
released weight file also loads as a whole-model ``--checkpoint``. The text processor is open_clip's tokenizer,
the transforms are open_clip's preprocessing of the architecture (bicubic resize and centre crop at
evaluation, a random resized crop of scale 0.9-1 in training, CLIP's mean and std). Fine-tuning follows
open_clip's trainer: the learnable ``logit_scale`` is clamped to [0, ln 100] (before each use, which gives the
values open_clip's clamp after each step gives), weight decay applies to matrices only, and gradient
checkpointing is open_clip's.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from utils.config import Key, register_keys
from utils.weights import Remapped, StateDict, WeightsError, load_into, patterns_under, with_prefix

from ._registry import register_model
from .base import RetrievalModel
from .encoders.open_clip_towers import (architecture, build_clip, check_activation, read_clip_weights,
                                        remap_clip_state, uses_quick_gelu)
from .loading import random_init
from .text import ClipTokenizerProcessor, TextProcessor

CLIP_MODELS = ("clip", "fisvl_clip")
MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp: a temperature of at least 0.01
# Parameters open_clip's trainer keeps out of weight decay beyond the 1-d ones (gains, biases, class embeddings,
# logit_scale): the position embeddings, which are matrices.
NO_DECAY_MATRICES = ("positional_embedding",)

register_keys("CLIP towers through open_clip (clip, fisvl_clip)", {
    "clip_model": Key((str, dict), doc="open_clip architecture: a name (ViT-B-32, ViT-L-14, RN50, ViT-B-32-quickgelu, "
                      "... as open_clip.list_models() lists them) or the path of a model JSON of one's own"),
    "clip_weights": Key((str,), None, "local CLIP weight file: OpenAI's TorchScript .pt, RemoteCLIP / GeoRSCLIP state "
                        "dicts, open_clip training checkpoints (state_dict / module. wrappers), .safetensors; nothing "
                        "is downloaded; null = random weights (needs clip in allow_random_init)", is_path=True),
    "clip_quick_gelu": Key((bool,), False, "use QuickGELU, as OpenAI's weights and the CLIPs fine-tuned from them were "
                           "trained (a -quickgelu architecture name sets it too); checked against the weight file "
                           "where it tells"),
}, models=CLIP_MODELS)


class CLIPModel(RetrievalModel):
    """open_clip's CLIP as a retrieval model: L2-normalised ``encode_image`` / ``encode_text``, cosine score,
    temperature ``exp(-logit_scale)``."""

    encoder_names = ("clip",)

    def __init__(self, config: dict[str, Any], text_processor: TextProcessor | None = None) -> None:
        super().__init__()
        self.arch_name, self.arch_config = architecture(config["clip_model"])
        self.quick_gelu = uses_quick_gelu(self.arch_name, self.arch_config, config["clip_quick_gelu"])
        self.clip, self.train_transform, self.eval_transform = build_clip(
            self.arch_name, self.quick_gelu, config["image_res"])
        self.embed_dim = int(self.arch_config["embed_dim"])
        self.text_processor = text_processor or ClipTokenizerProcessor(
            {"name": self.arch_name, "config": self.arch_config}, config["max_words"])
        if config["grad_checkpointing"]:
            self.clip.set_grad_checkpointing(True)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def encode_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(text["input_ids"]), dim=-1)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The embeddings and the temperature ``temp`` = exp(-logit_scale), the scale clamped as open_clip does."""
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {**super().forward(batch), "temp": torch.exp(-self.clip.logit_scale)}

    def decays(self, name: str, param: torch.Tensor) -> bool:
        """open_clip's rule, by shape: matrices decay; gains, biases, ``logit_scale`` and class embeddings (1-d)
        do not, nor do position embeddings."""
        return param.ndim >= 2 and not name.endswith(NO_DECAY_MATRICES)

    def encoders(self) -> dict[str, nn.Module]:
        return {"clip": self.clip}

    def pretrained_sources(self, config: dict[str, Any]) -> dict[str, str | None]:
        return {"clip": config["clip_weights"] or None}

    def load_pretrained(self, config: dict[str, Any], parts: Iterable[str] | None = None) -> None:
        """Load ``clip_weights`` into the CLIP towers with a load report; the activation is checked against the file."""
        if "clip" not in (list(self.encoders()) if parts is None else list(parts)):
            return
        path = config["clip_weights"]
        if not path:
            random_init("clip", config, "clip_weights is not set")
            return
        state, file_quick_gelu = read_clip_weights(path)
        check_activation(path, file_quick_gelu, self.quick_gelu, self.arch_name)
        load_into(self.clip, remap_clip_state(self.clip, state), f"clip <- {path}",
                  allow_missing=patterns_under(config["allow_missing_weights"], "clip."))

    def remap_checkpoint(self, state: StateDict) -> Remapped:
        """This project's checkpoints (``clip.*``), or a released CLIP weight file given as ``--checkpoint``."""
        own = with_prefix(state, "clip.")
        rest = {k: v for k, v in state.items() if not k.startswith("clip.")}
        remapped = remap_clip_state(self.clip, own if own else state)
        if not remapped.state:
            raise WeightsError("the checkpoint holds no CLIP weights (no clip.* keys and no open_clip names)")
        out = {**({} if not own else rest), **{f"clip.{k}": v for k, v in remapped.state.items()}}
        return Remapped(out, [f"clip.{entry}" for entry in remapped.resized])

    def inline_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {**config, "clip_model": {"name": self.arch_name, "config": self.arch_config}}


@register_model("clip")
def clip(config: dict[str, Any], text_processor: TextProcessor | None = None) -> CLIPModel:
    """A CLIP dual encoder from open_clip; the losses and stages come from the config."""
    return CLIPModel(config, text_processor)
