"""The plain dual encoder (PIR's "VSE2 (CL)" baseline): Swin or ViT + BERT, linear projections, cosine.

Image embedding = L2norm(vision_proj(pooled token)); text embedding = L2norm(text_proj([CLS])).
State-dict keys follow PIR's baseline: ``vision_encoder.*``, ``text_encoder.*``, ``vision_proj.*``,
``text_proj.*``, ``temp``. (PIR and FISVL keep the affiliation temperature ``temp2`` in the model; here the
affiliation loss owns it.)
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dataset.transforms import test_transform, train_transform
from utils.config import Key, register_keys
from utils.weights import Remapped, StateDict, patterns_under, with_prefix

from ._registry import register_model
from .base import RetrievalModel
from .encoders import BertTextEncoder, build_vision_encoder, read_vision_config
from .encoders.text import has_pretrained_weights, read_text_config
from .loading import random_init
from .text import BertWordPieceProcessor, TextProcessor

XVLM_LINEAGE = ("swin_bert_cl", "fisvl", "pir")

register_keys("X-VLM lineage: Swin/ViT + BERT towers (swin_bert_cl, fisvl, pir)", {
    "vision_config": Key((str, dict), doc="vision encoder JSON (arch, sizes, optional ckpt), or its contents",
                         is_path=True),
    "text_config": Key((str, dict), doc="BERT config JSON, or its contents", is_path=True),
    "text_encoder": Key((str,), doc="local folder with vocab.txt (and BERT weights for pretrained runs)", is_path=True),
    "use_swin": Key((bool,), True, "Swin (True) or ViT (False) when the vision JSON names no `arch`"),
    "patch_size": Key((int,), None, "total stride marker (Swin 32, ViT 16); checked when given"),
    "temp1": Key((float,), 0.07, "initial contrastive temperature (learnable)"),
    "temp": Key((float,), None, "X-VLM name of temp1"),
    "text_attention_mask": Key((bool,), True, "pass BERT its attention mask (false reproduces PIR/FISVL)"),
    "is_baseline": Key((bool,), False, "PIR/FISVL switch for the plain Swin+BERT model (alias of model: swin_bert_cl)"),
    "k_test": Key((int,), None, "X-VLM re-rank depth; unused by dual encoders"),
}, models=XVLM_LINEAGE)


class DualEncoder(RetrievalModel):
    """Two towers meeting only in the cosine similarity; the base of the X-VLM lineage (FISVL, PIR)."""

    encoder_names = ("vision_encoder", "text_encoder")

    def __init__(self, config: dict[str, Any], text_processor: TextProcessor | None = None) -> None:
        super().__init__()
        self.vision_cfg = read_vision_config(config["vision_config"], "swin" if config["use_swin"] else "vit")
        if self.vision_cfg["image_res"] != config["image_res"]:
            raise ValueError(f"image_res {config['image_res']} in the YAML differs from "
                             f"{self.vision_cfg['image_res']} in {describe(config['vision_config'])}")
        self.vision_encoder = build_vision_encoder(self.vision_cfg)
        stride = self.vision_encoder.total_stride
        if config["patch_size"] is not None and config["patch_size"] != stride:
            raise ValueError(f"patch_size {config['patch_size']} does not match the vision encoder's total "
                             f"stride {stride} ({describe(config['vision_config'])})")
        self.text_config = read_text_config(config["text_config"])
        self.text_encoder = BertTextEncoder.from_json(self.text_config)
        self.text_processor = text_processor or BertWordPieceProcessor.from_folder(
            config["text_encoder"], config["max_tokens"], config["max_words"])
        if self.text_processor.vocab_size > self.text_encoder.config.vocab_size:
            raise ValueError(f"{config['text_encoder']}/vocab.txt has {self.text_processor.vocab_size} tokens but "
                             f"{describe(config['text_config'])} sets vocab_size {self.text_encoder.config.vocab_size}")
        self.train_transform, self.eval_transform = train_transform(config), test_transform(config)
        self.embed_dim = config["embed_dim"]
        self.vision_proj = nn.Linear(self.vision_encoder.width, self.embed_dim)
        self.text_proj = nn.Linear(self.text_encoder.width, self.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config["temp1"])))
        self.use_attention_mask = config["text_attention_mask"]
        if config["grad_checkpointing"]:
            self.vision_encoder.set_grad_checkpointing(True)
            self.text_encoder.set_grad_checkpointing(True)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_encoder.forward_tokens(images)
        return F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def encode_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = text["attention_mask"] if self.use_attention_mask else None
        tokens = self.text_encoder.forward_tokens(text["input_ids"], mask)
        return F.normalize(self.text_proj(tokens[:, 0]), dim=-1)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The embeddings and the learnable contrastive temperature ``temp``."""
        return {**super().forward(batch), "temp": self.temp}

    def no_weight_decay(self) -> set[str]:
        """Parameter names the encoders exempt from weight decay (position embeddings, class tokens)."""
        return ({f"vision_encoder.{n}" for n in self.vision_encoder.no_weight_decay()}
                | {f"text_encoder.{n}" for n in getattr(self.text_encoder, "no_weight_decay", lambda: set())()})

    def encoders(self) -> dict[str, nn.Module]:
        """The pretrained parts by state-dict prefix; each has ``remap_state`` and ``load_pretrained``."""
        return {"vision_encoder": self.vision_encoder, "text_encoder": self.text_encoder}

    def pretrained_sources(self, config: dict[str, Any]) -> dict[str, str | None]:
        """The weight file (or folder) the config names for each encoder; ``None`` where it names none."""
        return {"vision_encoder": self.vision_cfg.get("ckpt") or None,
                "text_encoder": config["text_encoder"] if has_pretrained_weights(config["text_encoder"]) else None}

    def load_pretrained(self, config: dict[str, Any], parts: Iterable[str] | None = None) -> None:
        """Load the weights the config names into ``parts`` (default: every encoder). An encoder whose config
        names no weights is an error unless ``allow_random_init`` lists it."""
        parts = list(self.encoders()) if parts is None else list(parts)
        allow = config["allow_missing_weights"]
        sources = self.pretrained_sources(config)
        if "vision_encoder" in parts:
            if sources["vision_encoder"]:
                self.vision_encoder.load_pretrained(sources["vision_encoder"], patterns_under(allow, "vision_encoder."))
            else:
                random_init("vision_encoder", config, f"{config['vision_config']} names no ckpt")
        if "text_encoder" in parts:
            if sources["text_encoder"]:
                self.text_encoder.load_pretrained(sources["text_encoder"], patterns_under(allow, "text_encoder."))
            else:
                random_init("text_encoder", config, f"no weights in the text_encoder folder {config['text_encoder']}")

    def inline_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {**config, "vision_config": dict(self.vision_cfg), "text_config": dict(self.text_config)}

    def remap_checkpoint(self, state: StateDict) -> Remapped:
        """A whole-model state dict (this project's, PIR's, FISVL's or X-VLM's) -> this model's names: each
        encoder's tensors go through that encoder's ``remap_state``; the rest keeps its names."""
        prefixes = tuple(f"{name}." for name in self.encoders())
        out = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        resized, dropped = [], []
        for name, encoder in self.encoders().items():
            part = encoder.remap_state(with_prefix(state, f"{name}."))
            out.update({f"{name}.{k}": v for k, v in part.state.items()})
            resized += [f"{name}.{entry}" for entry in part.resized]
            dropped += [f"{name}.{entry}" for entry in part.dropped]
        return Remapped(out, resized, dropped)


def describe(source: str | dict[str, Any]) -> str:
    """A file-valued key for a message: its path, or that it was given inline (from a checkpoint)."""
    return source if isinstance(source, str) else "the inline JSON"


@register_model("swin_bert_cl")
def swin_bert_cl(config: dict[str, Any], text_processor: TextProcessor | None = None) -> DualEncoder:
    """Swin-T (or ViT) + BERT trained with the contrastive loss alone."""
    return DualEncoder(config, text_processor)
