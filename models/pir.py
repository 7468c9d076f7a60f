"""PIR (Pan et al., "Prior Instruction Representation for Remote Sensing Image-text Retrieval", ACM MM 2023;
baselines.md §1): a Swin + BERT dual encoder whose two embeddings are refined by progressive attention.

Image, VIR / Spatial-PAE: a frozen ResNet's pooled features, through ``conv_proj``, are the instruction c.
Each of the 50 projected Swin tokens gets a belief, the softmax over the tokens of its product with c; the
``filter_size`` most believed tokens are kept, in order of belief, and ``instru_num`` steps refine them, each
self-attention then cross-attention with the queries a linear map of c:

    F <- CroSA_i(x = mapping_img_i(c) repeated, y = MHSA_i(F));   v = L2norm(V[:, 0] + head_img(F[:, 0]))

Text, LCA / Temporal-PAE: ``cycle_num`` steps over the projected BERT tokens, each step's queries a linear map
of the previous step's output:

    T <- CroSA_i(x = mapping_txt_i(T), y = MHSA_i(T));   t = L2norm(T0[:, 0] + head_txt(T[:, 0]))

Parameter names are PIR's (``conv_encoder``, ``conv_proj``, ``mapping_img.{i}``, ``mapping_txt.{i}``,
``head_img``, ``head_txt``, ``img_sa.{i}``, ``img_ca.{i}``, ``txt_sa.{i}``, ``txt_ca.{i}``), so its released
checkpoints load; their ``temp2`` belongs to the affiliation loss here.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from utils.config import Key, register_keys

from ._registry import register_model
from .fusion import MHSA, CroSA
from .prior import PriorDualEncoder, fusion_steps
from .text import TextProcessor

register_keys("PIR (pir)", {
    "filter_size": Key((int,), doc="VIR: image tokens kept by belief (PIR: 40 of Swin-T's 50)"),
    "instru_num": Key((int,), doc="VIR / Spatial-PAE steps (PIR: 2)"),
    "cycle_num": Key((int,), doc="LCA / Temporal-PAE steps (PIR: 3)"),
    "head": Key((int,), doc="attention heads of the PAE blocks (PIR: 8)"),
    "lca_padding_mask": Key((bool,), True, "LCA's attention leaves [PAD] tokens out (false reproduces the "
                            "published LCA, which attends to them)"),
}, models=("pir",))


class PIR(PriorDualEncoder):
    """VIR on the image side, LCA on the text side; ``init: published`` starts every step of each as a copy of
    one block, as PIR's ``clones()`` does."""

    def __init__(self, config: dict[str, Any], text_processor: TextProcessor | None = None) -> None:
        super().__init__(config, text_processor)
        dim, heads, dropout = config["embed_dim"], config["head"], config["dropout_r"]
        tokens = (config["image_res"] // self.vision_encoder.total_stride) ** 2 + 1
        if not 0 < config["filter_size"] <= tokens:
            raise ValueError(f"filter_size {config['filter_size']} must be between 1 and the {tokens} image tokens "
                             f"of the vision encoder")
        self.filter_size, self.lca_padding_mask = config["filter_size"], config["lca_padding_mask"]
        published = config["init"] == "published"
        images, cycles = config["instru_num"], config["cycle_num"]
        self.mapping_img = fusion_steps(lambda: nn.Linear(dim, dim), images, published)
        self.mapping_txt = fusion_steps(lambda: nn.Linear(dim, dim), cycles, published)
        self.head_img = nn.Linear(dim, dim)
        self.head_txt = nn.Linear(dim, dim)
        self.img_sa = fusion_steps(lambda: MHSA(dim, heads, dropout), images, published)
        self.img_ca = fusion_steps(lambda: CroSA(dim, heads, dropout), images, published)
        self.txt_sa = fusion_steps(lambda: MHSA(dim, heads, dropout), cycles, published)
        self.txt_ca = fusion_steps(lambda: CroSA(dim, heads, dropout), cycles, published)

    def instruction(self, images: torch.Tensor) -> torch.Tensor:
        """c = conv_proj(pooled ResNet features) [B, 1, d]; the frozen CNN runs without autograd."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune_conv):
            _, pooled = self.conv_encoder.forward_prior(images)
        return self.conv_proj(pooled)[:, None]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_proj(self.vision_encoder.forward_tokens(images))  # [B, 1 + L, d]
        instruction = self.instruction(images)
        with torch.no_grad():  # the ranking only chooses tokens; no gradient flows through it, as published
            belief = torch.softmax((tokens @ instruction.transpose(1, 2)).squeeze(-1), dim=-1)
            kept = belief.topk(self.filter_size, dim=1).indices  # most believed first
        fused = tokens.gather(1, kept[..., None].expand(-1, -1, tokens.shape[-1]))
        for self_attention, cross_attention, mapping in zip(self.img_sa, self.img_ca, self.mapping_img):
            fused = cross_attention(mapping(instruction).expand_as(fused), self_attention(fused))
        return F.normalize(tokens[:, 0] + self.head_img(fused[:, 0]), dim=-1)

    def encode_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = text["attention_mask"]
        tokens = self.text_proj(self.text_encoder.forward_tokens(text["input_ids"],
                                                                 mask if self.use_attention_mask else None))
        padding = mask == 0 if self.lca_padding_mask else None
        fused = tokens
        for self_attention, cross_attention, mapping in zip(self.txt_sa, self.txt_ca, self.mapping_txt):
            fused = cross_attention(mapping(fused), self_attention(fused, padding), padding)
        return F.normalize(tokens[:, 0] + self.head_txt(fused[:, 0]), dim=-1)


@register_model("pir")
def pir(config: dict[str, Any], text_processor: TextProcessor | None = None) -> PIR:
    """PIR's model; its losses (contrastive + affiliation, or the triplet loss) come from the config."""
    return PIR(config, text_processor)
