"""AMFMN (Yuan et al., "Exploring a Fine-Grained Multiscale Method for Cross-Modal Remote Sensing Image
Retrieval", TGRS 2021; baselines.md §3) and GaLR's global branch (baselines.md §4): the root of the second
code lineage (AMFMN -> GaLR -> SIRS).

Image: a fine-tuned ResNet-18 at 256 px; v = MVSA(stages) * Linear(mean of layer 4). Text: the paper's bi-GRU
over a word vocabulary, or the released code's pretrained skip-thoughts uni-skip GRU (``text_arch``). Score (``amfmn``): cosine(v, t_v) with t_v the visual-guided text vector of the pair
(``att_type``), so every (image, caption) pair runs the attention head; evaluation fills the matrix in
blocks (``similarity_chunks``). ``galr_global``: the same towers scored by the plain cosine.

Released checkpoints (``extract_feature.resnet.*``, ``text_feature.*``, ``cross_attention_s.*``) are read
through ``remap_checkpoint``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dataset.annotations import DataError, read_json_list
from dataset.transforms import resnet_eval_transform, resnet_train_transform
from utils.config import Key, register_keys
from utils.weights import Remapped, StateDict, patterns_under, with_prefix

from ._registry import register_model
from .base import RetrievalModel
from .encoders.gru import BiGRUTextEncoder
from .encoders.resnet import ResNetEncoder
from .encoders.skipthoughts import UniSkipEncoder
from .fusion import GUIDED_ATTENTIONS, MVSA, VisualGuidedText
from .loading import random_init
from .text import TextProcessor, WordVocabProcessor

AMFMN_LINEAGE = ("amfmn", "galr_global", "sirs")

register_keys("AMFMN lineage: ResNet, word-vocabulary GRU (amfmn, galr_global, sirs)", {
    "image_arch": Key((str,), "resnet18", "image backbone (torchvision layout)",
                      choices=("resnet18", "resnet34", "resnet50")),
    "image_ckpt": Key((str,), None, "image backbone weights, torchvision layout (e.g. torchvision's ImageNet "
                      "resnet18-f37072fd.pth)", is_path=True),
    "multiscale_input_channel": Key((int,), 3, "MVSA: channels of the converted low- and high-level maps"),
    "multiscale_output_channel": Key((int,), 1, "MVSA: channels of the saliency map"),
    "att_type": Key((str,), "soft_att", "AMFMN's visual-guided text attention (amfmn)", choices=GUIDED_ATTENTIONS),
    "vocab_file": Key((str,), None, "AMFMN vocabulary JSON (*_splits_vocab.json); none: built from the training "
                      "captions", is_path=True),
    "vocab_min_count": Key((int,), 5, "words seen fewer times in the training captions are <unk> (vocabulary "
                           "built when vocab_file is not set; stop words are always <unk>, as in AMFMN)"),
    "text_arch": Key((str,), "bigru", "text encoder: bigru (the paper's, trained from scratch) or skipthoughts (the "
                     "released code's pretrained uni-skip GRU + Linear 2400 -> embed_dim + ReLU)",
                     choices=("bigru", "skipthoughts")),
    "word_dim": Key((int,), 300, "bi-GRU word embedding width (AMFMN paper: 300)"),
    "skipthoughts_dir": Key((str,), None, "folder with Kiros et al.'s uni_skip.npz, utable.npy and dictionary.txt "
                            "(text_arch: skipthoughts)", is_path=True),
    "skipthoughts_dropout": Key((float,), 0.25, "Bayesian dropout of the uni-skip GRU in training (AMFMN: 0.25)"),
    "skipthoughts_fixed_emb": Key((bool,), False, "freeze the uni-skip word vectors (AMFMN: false)"),
    "skipthoughts_widths": Key((list,), [620, 2400], "word-vector and state widths of the skip-thoughts files "
                               "(the original uni-skip files: 620 and 2400)"),
    "resize_res": Key((int,), 278, "train images are resized to this square before the random crop to image_res"),
    "rotation_degrees": Key((list,), [0, 90], "range of the random train rotation (AMFMN's intended (0, 90))"),
}, models=AMFMN_LINEAGE)


def build_word_processor(config: dict[str, Any]) -> WordVocabProcessor:
    """The vocabulary file the config names, or one built from the training captions."""
    if config["vocab_file"]:
        return WordVocabProcessor.from_vocab_file(config["vocab_file"])
    captions = []
    for path in config["train_file"]:
        for number, entry in enumerate(read_json_list(path)):
            if not isinstance(entry, dict) or not isinstance(entry.get("caption"), str):
                raise DataError(f"{path}: entry {number} has no caption text (needed to build the vocabulary)")
            captions.append(entry["caption"])
    return WordVocabProcessor.from_captions(captions, config["vocab_min_count"],
                                            source=f"captions of {', '.join(config['train_file'])}")


def pairwise_cosine(image_emb: torch.Tensor, guided_text: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """cosine(v_i, t_ij) for v [I, d] and t [I, T, d], as AMFMN computes it (norm product clamped at ``eps``)."""
    dots = (image_emb[:, None, :] * guided_text).sum(-1)
    return dots / (image_emb.norm(dim=-1)[:, None] * guided_text.norm(dim=-1)).clamp(min=eps)


class AMFMNLineage(RetrievalModel):
    """What AMFMN, GaLR-global and SIRS share: a fine-tuned torchvision ResNet (``image_encoder``) with AMFMN's
    transforms, and a text branch over a word vocabulary (the bi-GRU, or the skip-thoughts GRU + ``text_proj``).
    Subclasses build their image head on the ResNet's stages and say how pairs are scored."""

    encoder_names = ("image_encoder", "text_encoder")

    def __init__(self, config: dict[str, Any], text_processor: TextProcessor | None = None) -> None:
        super().__init__()
        dim, res = config["embed_dim"], config["image_res"]
        degrees = config["rotation_degrees"]
        if len(degrees) != 2:
            raise ValueError(f"rotation_degrees must be [min, max], got {degrees}")
        self.text_processor = text_processor or build_word_processor(config)
        self.train_transform = resnet_train_transform(config["resize_res"], res, tuple(degrees))
        self.eval_transform = resnet_eval_transform(res)
        self.image_encoder = ResNetEncoder(config["image_arch"])
        self.skipthoughts = config["text_arch"] == "skipthoughts"
        if self.skipthoughts:
            word_width, state_width = config["skipthoughts_widths"]
            self.text_encoder = UniSkipEncoder(self.text_processor.words, config["skipthoughts_dropout"],
                                               config["skipthoughts_fixed_emb"], embed_dim=word_width,
                                               hidden_dim=state_width)
            self.text_proj = nn.Linear(state_width, dim)
        else:
            self.text_encoder = BiGRUTextEncoder(self.text_processor.vocab_size, config["word_dim"], dim)

    def encode_words(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The text branch's vector [B, d], not normalised (the released ``Skipthoughts_Embedding_Module``)."""
        text_emb = self.text_encoder(text["input_ids"], text["lengths"])
        return F.relu(self.text_proj(text_emb)) if self.skipthoughts else text_emb

    # --- weights

    def encoders(self) -> dict[str, nn.Module]:
        """The pretrained parts: the ResNet, and the skip-thoughts GRU (the bi-GRU has no pretrained weights)."""
        return {"image_encoder": self.image_encoder, **({"text_encoder": self.text_encoder} if self.skipthoughts else {})}

    def pretrained_sources(self, config: dict[str, Any]) -> dict[str, str | None]:
        sources = {"image_encoder": config["image_ckpt"] or None}
        return {**sources, "text_encoder": config["skipthoughts_dir"] or None} if self.skipthoughts else sources

    def load_pretrained(self, config: dict[str, Any], parts: Iterable[str] | None = None) -> None:
        parts = list(self.encoders()) if parts is None else list(parts)
        sources = self.pretrained_sources(config)
        if "image_encoder" in parts:
            if sources["image_encoder"]:
                self.image_encoder.load_pretrained(sources["image_encoder"],
                                                   patterns_under(config["allow_missing_weights"], "image_encoder."),
                                                   key="image_ckpt", role="image encoder")
            else:
                random_init("image_encoder", config, "image_ckpt is not set")
        if "text_encoder" in parts:
            if sources["text_encoder"]:
                self.text_encoder.load_original(sources["text_encoder"])
            else:
                random_init("text_encoder", config, "text_arch is skipthoughts but skipthoughts_dir is not set")

    def remap_released(self, state: StateDict, renames: dict[str, str], backbone: str) -> Remapped:
        """A released checkpoint of the lineage -> this model's names: the ResNet under ``backbone`` (torchvision
        names, its ``fc`` dropped), the skip-thoughts port's names under ``text_feature.seq2vec``,
        ``text_feature.to_out``, and the model's own ``renames`` (old prefix -> new prefix); everything else is
        reported as unused."""
        renames = {**renames, "text_feature.to_out.": "text_proj."}
        out = {new + key: value for old, new in renames.items() for key, value in with_prefix(state, old).items()}
        encoders = {backbone: ("image_encoder.", self.image_encoder.remap_state),
                    "text_feature.seq2vec.": ("text_encoder.", self.text_encoder.remap_state if self.skipthoughts
                                              else Remapped)}
        dropped = [f"{key} (not used by the released forward)" for key in state
                   if not key.startswith((*renames, *encoders))]
        for old, (new, remap) in encoders.items():
            part = remap(with_prefix(state, old))
            out.update({new + key: value for key, value in part.state.items()})
            dropped += [old + entry for entry in part.dropped]
        return Remapped(out, dropped=dropped)


class AMFMN(AMFMNLineage):
    """``encode_image``: MVSA-gated global vector [B, d]; ``encode_text``: the text branch's vector [B, d];
    ``similarity``: the guided cosine of every pair (``guided``), else the cosine of the L2-normalised
    embeddings."""

    similarity_chunks = (64, 1024)  # images x captions per block: 64 x 1024 x d floats at a time

    def __init__(self, config: dict[str, Any], text_processor: TextProcessor | None = None,
                 guided: bool = True) -> None:
        super().__init__(config, text_processor)
        dim = config["embed_dim"]
        self.global_proj = nn.Linear(self.image_encoder.width, dim)
        self.mvsa = MVSA(self.image_encoder.stage_channels, config["image_res"], dim,
                         config["multiscale_input_channel"], config["multiscale_output_channel"])
        self.guided_text = VisualGuidedText(config["att_type"], dim) if guided else None
        self.scores_are_dot_products = not guided

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        stages = self.image_encoder.forward_stages(images)
        image_emb = self.mvsa(stages, self.global_proj(stages[-1].mean(dim=(2, 3))))
        return image_emb if self.guided_text else F.normalize(image_emb, dim=-1)

    def encode_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        text_emb = self.encode_words(text)
        return text_emb if self.guided_text else F.normalize(text_emb, dim=-1)

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        if self.guided_text is None:
            return image_emb @ text_emb.t()
        return pairwise_cosine(image_emb, self.guided_text(image_emb, text_emb))

    def remap_checkpoint(self, state: StateDict) -> Remapped:
        """This project's names, or AMFMN's released ones: ``extract_feature.resnet``, ``extract_feature.linear``,
        ``mvsa``, ``text_feature``, ``cross_attention_s``; the never-called ``vgmf_gate`` is left out."""
        if not any(key.startswith("extract_feature.") for key in state):
            return Remapped(dict(state))
        return self.remap_released(state, {"extract_feature.linear.": "global_proj.", "mvsa.": "mvsa.",
                                           "cross_attention_s.": "guided_text."}, "extract_feature.resnet.")


@register_model("amfmn")
def amfmn(config: dict[str, Any], text_processor: TextProcessor | None = None) -> AMFMN:
    """AMFMN with its visual-guided text attention (``att_type``), trained with the triplet loss."""
    return AMFMN(config, text_processor, guided=True)


@register_model("galr_global")
def galr_global(config: dict[str, Any], text_processor: TextProcessor | None = None) -> AMFMN:
    """GaLR's global branch: AMFMN's towers and the plain cosine (GaLR's local GCN branch needs detector
    inputs that are not public; baselines.md §4)."""
    return AMFMN(config, text_processor, guided=False)
