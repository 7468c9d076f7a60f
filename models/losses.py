"""Retrieval losses as pure, vectorised functions of already-gathered, L2-normalised features, and the
registered loss modules that stages name (at the end of this file).

Each training item is one (image, caption) pair; ``image_ids`` says which pairs share an image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataset.annotations import TrainAnnotations
from dataset.masks import IGNORE_INDEX, mask_class_weights
from dataset.text_similarity import cached_prior_text_similarity
from utils.config import ConfigError, Key, register_keys
from utils.distributed import barrier, get_rank, get_world_size

from ._registry import register_loss

SOFT_TARGET_EPS = 6e-5


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Softmax in fp32 under autocast; float64 inputs (tests against formulas) stay float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_targets(query_ids: torch.Tensor, key_ids: torch.Tensor, eps: float = SOFT_TARGET_EPS,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row-normalised multi-positive targets: every key of the query's image is a positive, plus ``eps`` everywhere."""
    same = (query_ids[:, None] == key_ids[None, :]).to(dtype)
    targets = same + eps
    return targets / targets.sum(1, keepdim=True)


def contrastive_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor,
                     temp: torch.Tensor | float, caption_weights: torch.Tensor | None = None,
                     eps: float = SOFT_TARGET_EPS, rows: slice | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with soft multi-positive targets (X-VLM's ITC with FISVL's epsilon).

    ``caption_weights`` (w_j per caption) turns it into the weighted contrastive loss: the logit of
    caption j is scaled by w_j, in both directions. ``rows`` restricts the queries to this process's
    pairs (local loss); the mean over all processes' rows equals the full loss.
    """
    rows = slice(None) if rows is None else rows
    logits_i2t = image_feat[rows] @ text_feat.t() / temp  # query images x all captions
    logits_t2i = text_feat[rows] @ image_feat.t() / temp  # query captions x all images
    if caption_weights is not None:
        logits_i2t = logits_i2t * caption_weights[None, :]
        logits_t2i = logits_t2i * caption_weights[rows, None]
    logits_i2t, logits_t2i = _at_least_fp32(logits_i2t), _at_least_fp32(logits_t2i)
    targets = soft_targets(image_ids[rows], image_ids, eps, logits_i2t.dtype)
    loss_i2t = -(F.log_softmax(logits_i2t, dim=1) * targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(logits_t2i, dim=1) * targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def affiliation_centres(features: torch.Tensor, labels: torch.Tensor, eps: float = SOFT_TARGET_EPS,
                        chunk: int = 0) -> torch.Tensor:
    """Scene centre of each row: the mean of the rows with its label, plus ``eps`` weight on every other row.

    The published code builds centres from each process's own batch; ``chunk`` > 0 reproduces that on a
    gathered batch (rows are rank-major, so chunk = per-process batch), 0 uses the whole batch.
    """
    n = features.shape[0]
    weights = (labels[:, None] == labels[None, :]).to(features.dtype) + eps
    if 0 < chunk < n:
        block = torch.arange(n, device=features.device) // chunk
        weights = weights * (block[:, None] == block[None, :]).to(features.dtype)
    return weights @ features / weights.sum(1, keepdim=True)


def affiliation_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, labels: torch.Tensor,
                     temp: torch.Tensor | float, eps: float = SOFT_TARGET_EPS, chunk: int = 0,
                     symmetric: bool = False, rows: slice | None = None) -> torch.Tensor:
    """PIR/FISVL's scene-centre ("affiliation") loss with temperature ``temp`` (tau_2).

    Term 1: each image against all text centres, target its own row's centre. Term 2 as published: each
    image centre against all texts (a transpose in the original code); ``symmetric`` gives the intended
    form instead, each text against all image centres.
    """
    rows = slice(None) if rows is None else rows
    text_centres = affiliation_centres(text_feat, labels, eps, chunk)
    image_centres = affiliation_centres(image_feat, labels, eps, chunk)
    targets = torch.arange(image_feat.shape[0], device=image_feat.device)[rows]
    image_to_centres = _at_least_fp32(image_feat[rows] @ text_centres.t() / temp)
    if symmetric:
        second = _at_least_fp32(text_feat[rows] @ image_centres.t() / temp)
    else:
        second = _at_least_fp32(image_centres[rows] @ text_feat.t() / temp)
    return (F.cross_entropy(image_to_centres, targets) + F.cross_entropy(second, targets)) / 2


def thresholded_softmax(logits: torch.Tensor, threshold: float, eps: float = SOFT_TARGET_EPS) -> torch.Tensor:
    """FISVL's softmax: logits below ``threshold`` are set to 0 (not -inf) and get no gradient, and ``eps``
    is added to the denominator. Computed shifted by the row maximum, which is exact and cannot overflow."""
    kept = torch.where(logits >= threshold, logits, torch.zeros_like(logits))
    shift = kept.detach().amax(1, keepdim=True)
    numerators = torch.exp(kept - shift)
    return numerators / (numerators.sum(1, keepdim=True) + eps * torch.exp(-shift))


def scene_weights(epoch: int, beta1: float, beta2: float, integer: bool) -> tuple[float, float]:
    """(intra-scene, inter-scene) weights exp(beta2 * e) and exp(beta1 * e); the published code truncates
    them to integers (so 1 and 1 at epoch 0, then 1 and 0 while exp(beta2 * e) < 2)."""
    intra, inter = math.exp(beta2 * epoch), math.exp(beta1 * epoch)
    return (float(int(intra)), float(int(inter))) if integer else (intra, inter)


def scene_adaptive_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor,
                        labels: torch.Tensor, temp: torch.Tensor | float, epoch: int, alpha_m: float,
                        beta1: float, beta2: float, mode: str = "published", eps: float = SOFT_TARGET_EPS,
                        rows: slice | None = None) -> torch.Tensor:
    """FISVL's scene-adaptive fine-grained perceptual loss (fisvl-method.md §3.4).

    For each image b its top-ranked text h_T(b) (and for each text its top image h_I(b)) is the "hard
    negative"; every anchor a of the same modality gets a thresholded softmax over those items, and the
    loss is the probability mass on items weighted by scene: intra-scene exp(beta2 * e), inter-scene
    exp(beta1 * e). ``mode="published"`` keeps the official code's behaviour (positives are not masked when
    choosing h, weights truncated to integers: the loss is about 1.0 at epoch 0); ``"intended"`` masks
    same-image positives and keeps float weights.
    """
    if mode not in ("published", "intended"):
        raise ValueError(f"scene loss mode must be 'published' or 'intended', got {mode!r}")
    rows = slice(None) if rows is None else rows
    with torch.no_grad():
        similarity = image_feat @ text_feat.t()
        if mode == "intended":
            similarity = similarity.masked_fill(image_ids[:, None] == image_ids[None, :], float("-inf"))
        top_text = similarity.argmax(1)  # h_T(b): the top text of image b
        top_image = similarity.argmax(0)  # h_I(b): the top image of text b
    intra, inter = scene_weights(epoch, beta1, beta2, integer=mode == "published")
    anchor_labels = labels[rows, None]
    total = 0.0
    for feat, hard in ((text_feat, top_text), (image_feat, top_image)):
        logits = _at_least_fp32(feat[rows] @ feat[hard].t() / temp)
        probs = thresholded_softmax(logits, alpha_m, eps)
        same_scene = anchor_labels == labels[hard][None, :]
        weights = torch.where(same_scene, probs.new_tensor(intra), probs.new_tensor(inter))
        total = total + (probs * weights).sum(1).mean()
    return total / 2


def triplet_loss(scores: torch.Tensor, image_ids: torch.Tensor, margin: torch.Tensor | float = 0.2,
                 max_violation: bool = False, rows: slice | None = None) -> torch.Tensor:
    """VSE++'s bidirectional hinge loss (PIR's ``use_triplet_loss``), summed over every violation.

    ``scores[i, j]`` is the score of item i's image with item j's caption; item i's positive is the diagonal
    ``scores[i, i]``. Every caption of another image is a negative of image i, and every other image a negative
    of caption j; captions of the same image are not negatives of each other (the published code only masks
    the diagonal). ``margin`` is a float or a [B, B] tensor, ``margin[i, j]`` being the margin of the pair
    (image i, caption j) in both directions. ``max_violation`` keeps each anchor's hardest negative only.
    ``rows`` restricts the anchors (images and captions) to this process's items; the sum over all
    processes' rows is the full loss.
    """
    rows = slice(None) if rows is None else rows
    scores = _at_least_fp32(scores)
    margin = torch.as_tensor(margin, dtype=scores.dtype, device=scores.device).expand_as(scores)
    positive = scores.diagonal()
    negative = image_ids[:, None] != image_ids[None, :]
    # image i against the captions j of other images: margin + s(i, j) - s(i, i), per row
    cost_caption = (margin[rows] + scores[rows] - positive[rows, None]).clamp(min=0) * negative[rows]
    # caption j against the images i of other images: margin + s(i, j) - s(j, j), per column
    cost_image = (margin[:, rows] + scores[:, rows] - positive[None, rows]).clamp(min=0) * negative[:, rows]
    if max_violation:
        return cost_caption.amax(1).sum() + cost_image.amax(0).sum()
    return cost_caption.sum() + cost_image.sum()


# --- The registered loss modules: what a stage's ``losses`` name. Each declares its config keys, the batch
# fields it needs beyond ``image_idx`` and the parameters it owns, and calls its pure function above.


def dot_product_scores(image_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
    """The score of a dual encoder: ``[n_images, n_texts]`` dot products (cosines of normalised features)."""
    return image_feat @ text_feat.t()


@dataclass
class LossInputs:
    """What a loss sees: features gathered from every process, the batch fields the losses declared (also
    gathered; ``image_idx`` always), the model's other outputs (``temp``), this process's query rows
    (``None`` = all), the per-process batch, the epoch, whether the stage weights captions, and the model's
    score of every (image, caption) pair (``similarity``, for losses on pairwise-scored models) and this
    process's own batch (``batch``, for the ``local_fields`` a loss reads without gathering)."""

    image_feat: torch.Tensor
    text_feat: torch.Tensor
    fields: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor]
    rows: slice | None
    local_batch: int
    epoch: int
    caption_weights: bool = False
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = dot_product_scores
    batch: dict[str, Any] = field(default_factory=dict)


class RetrievalLoss(nn.Module):
    """A loss term: ``name`` is what stages call it; ``sample_fields`` the batch fields it reads, gathered from
    every process; ``local_fields`` those it reads from this process's batch only (segmentation masks);
    ``model_outputs`` the model's outputs beyond the embeddings it reads (``temp``); ``uses_model_similarity``
    whether it scores pairs with the model's ``similarity`` (else with dot products of the embeddings, which
    only a model whose score is one supports)."""

    name: ClassVar[str]
    sample_fields: ClassVar[tuple[str, ...]] = ()
    local_fields: ClassVar[tuple[str, ...]] = ()
    model_outputs: ClassVar[tuple[str, ...]] = ()
    uses_model_similarity: ClassVar[bool] = False

    @classmethod
    def check_config(cls, config: dict[str, Any], source: str) -> None:
        """Fail early, before any data or model is built, when a key this loss needs is not set."""

    def prepare(self, annotations: TrainAnnotations, run_dir: Path) -> None:
        """Compute what the loss needs from the whole training set, once before training (most need nothing)."""

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        raise NotImplementedError


register_keys("Loss: contr (contrastive)", {
    "soft_target_eps": Key((float,), 6e-5, "mass added to every target of the multi-positive contrastive loss "
                           "(and of the affiliation and scene losses' softmaxes)"),
})


@register_loss
class ContrastiveLoss(RetrievalLoss):
    """Symmetric multi-positive InfoNCE at the model's temperature ``temp``; a stage with
    ``caption_weights: true`` makes it the weighted contrastive loss."""

    name = "contr"
    sample_fields = ("caption_weight",)
    model_outputs = ("temp",)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.eps = config["soft_target_eps"]

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        weights = inputs.fields["caption_weight"].to(inputs.image_feat.dtype) if inputs.caption_weights else None
        return contrastive_loss(inputs.image_feat, inputs.text_feat, inputs.fields["image_idx"],
                                inputs.features["temp"], weights, self.eps, inputs.rows)


register_keys("Loss: affil (affiliation)", {
    "temp2": Key((float,), 0.07, "initial affiliation temperature (learnable, owned by the affiliation loss)"),
    "affil_symmetric": Key((bool,), False, "affiliation loss: intended form (text vs image centres) instead of the "
                           "published transpose"),
    "affil_center_chunk": Key((int,), 0, "affiliation centres over chunks of this many rows of the global batch "
                              "(0 = each process's batch, as published)"),
})


@register_loss
class AffiliationLoss(RetrievalLoss):
    """PIR/FISVL's scene-centre loss; it owns its learnable temperature (PIR's ``temp2``)."""

    name = "affil"
    sample_fields = ("label",)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(float(config["temp2"])))
        self.eps, self.chunk = config["soft_target_eps"], config["affil_center_chunk"]
        self.symmetric = config["affil_symmetric"]

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return affiliation_loss(inputs.image_feat, inputs.text_feat, inputs.fields["label"], self.temp, self.eps,
                                self.chunk or inputs.local_batch, self.symmetric, inputs.rows)


register_keys("Loss: scene (scene-adaptive)", {
    "scene_mode": Key((str,), "published", "scene-adaptive loss: published (no positive masking, integer "
                      "weights) or intended", choices=("published", "intended")),
    "alpha_m": Key((float,), None, "scene loss: softmax threshold on logits / temp (FISVL)"),
    "beta1": Key((float,), None, "scene loss: inter-scene weight exp(beta1 * epoch) (FISVL)"),
    "beta2": Key((float,), None, "scene loss: intra-scene weight exp(beta2 * epoch) (FISVL)"),
})


@register_loss
class SceneAdaptiveLoss(RetrievalLoss):
    """FISVL's scene-adaptive fine-grained perceptual loss at the model's temperature ``temp``."""

    name = "scene"
    sample_fields = ("label",)
    model_outputs = ("temp",)

    @classmethod
    def check_config(cls, config: dict[str, Any], source: str) -> None:
        missing = [key for key in ("alpha_m", "beta1", "beta2") if config[key] is None]
        if missing:
            raise ConfigError(f"{source}: the scene loss needs {missing}")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.mode, self.eps = config["scene_mode"], config["soft_target_eps"]
        self.alpha_m, self.beta1, self.beta2 = config["alpha_m"], config["beta1"], config["beta2"]

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return scene_adaptive_loss(inputs.image_feat, inputs.text_feat, inputs.fields["image_idx"],
                                   inputs.fields["label"], inputs.features["temp"], inputs.epoch, self.alpha_m,
                                   self.beta1, self.beta2, self.mode, self.eps, inputs.rows)


register_keys("Loss: triplet (VSE++ hinge)", {
    "triplet_margin": Key((float,), 0.2, "triplet loss margin (PIR, AMFMN's released code: 0.2)"),
    "triplet_max_violation": Key((bool,), False, "triplet loss: hardest negative of each anchor only (VSE++'s "
                                 "max_violation) instead of the sum over all violations (as PIR and AMFMN publish it)"),
    "triplet_margin_mode": Key((str,), "fixed", "fixed: triplet_margin for every pair; adaptive: AMFMN's paper margin "
                               "gamma (e^beta - e^(beta S)) / (e^beta - 1) from the prior text similarity S of the "
                               "pair's caption and the image's captions (computed once, cached in the run folder)",
                               choices=("fixed", "adaptive")),
    "adaptive_margin_gamma": Key((float,), 0.6, "adaptive margin: its value at S = 0 (AMFMN's best: 0.6)"),
    "adaptive_margin_beta": Key((float,), 5.0, "adaptive margin: how fast it falls as S grows (AMFMN's best: 5)"),
    "triplet_normalise": Key((bool,), False, "divide the triplet sum by 2N^2 - 2N, the number of (anchor, negative) "
                             "terms of a batch of N (SIRS)"),
})

PRIOR_SIMILARITY_FILE = "prior_text_similarity.npy"


def adaptive_margin(similarity: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """AMFMN's margin (paper Eqs. 28-30): gamma at similarity 0, falling to 0 at similarity 1."""
    return gamma * (math.exp(beta) - torch.exp(beta * similarity)) / (math.exp(beta) - 1)


@register_loss
class TripletLoss(RetrievalLoss):
    """PIR's ``use_triplet_loss`` and the AMFMN lineage's loss: the VSE++ hinge on the model's scores of the
    gathered batch, no temperature; AMFMN's adaptive margin and SIRS's normalisation as options.

    The loss is a sum, not a mean, so each process's rows give a part of it, and DDP averages the processes'
    gradients. Each process therefore returns its part times the number of processes: the average of the
    processes' values is the full loss, and the averaged gradients are the full loss's gradients, as on one
    process holding the whole batch.

    Adaptive margin: the margin of the pair (image i, caption j), in both directions, is alpha(S[i, j]) with
    S[i, j] the prior similarity of caption j to image i's captions (baselines.md §3.4, the recommended pairing:
    a negative caption is compared with the anchor image's captions, a negative image's captions with the
    anchor caption). S covers every training (image, caption) pair; ``prepare`` computes it once per dataset
    and keeps it memory-mapped from the run folder.
    """

    name = "triplet"
    uses_model_similarity = True

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.margin, self.max_violation = config["triplet_margin"], config["triplet_max_violation"]
        self.adaptive = config["triplet_margin_mode"] == "adaptive"
        self.gamma, self.beta = config["adaptive_margin_gamma"], config["adaptive_margin_beta"]
        self.normalise = config["triplet_normalise"]
        self.sample_fields = ("caption_idx",) if self.adaptive else ()
        self.prior: np.ndarray | None = None

    def prepare(self, annotations: TrainAnnotations, run_dir: Path) -> None:
        """The prior text similarity of every training (image, caption) pair: computed by the main process into
        ``run_dir`` (or found there from an earlier start of the run), then read by every process."""
        if not self.adaptive:
            return
        image_captions: list[list[str]] = [[] for _ in range(max(annotations.image_index) + 1)]
        for caption, image in zip(annotations.captions, annotations.image_index):
            image_captions[image].append(caption)
        path = run_dir / PRIOR_SIMILARITY_FILE
        if get_rank() == 0:
            self.prior = cached_prior_text_similarity(path, image_captions, annotations.captions)
        barrier()
        if get_rank() != 0:
            self.prior = cached_prior_text_similarity(path, image_captions, annotations.captions)

    def pair_margins(self, inputs: LossInputs, like: torch.Tensor) -> torch.Tensor | float:
        if not self.adaptive:
            return self.margin
        if self.prior is None:
            raise RuntimeError("the adaptive triplet margin needs the prior text similarity: call prepare() first")
        images = inputs.fields["image_idx"].cpu().numpy()
        captions = inputs.fields["caption_idx"].cpu().numpy()
        prior = torch.from_numpy(np.asarray(self.prior[images[:, None], captions[None, :]]))
        return adaptive_margin(prior.to(like), self.gamma, self.beta)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        scores = inputs.similarity(inputs.image_feat, inputs.text_feat)
        margin = self.pair_margins(inputs, scores)
        loss = triplet_loss(scores, inputs.fields["image_idx"], margin, self.max_violation, inputs.rows)
        if self.normalise:
            loss = loss / (2 * scores.shape[0] ** 2 - 2 * scores.shape[0])
        processes = 1 if inputs.rows is None else inputs.image_feat.shape[0] // inputs.local_batch
        return loss * processes


@register_loss
class SegmentationLoss(RetrievalLoss):
    """SIRS's L_SS: pixel cross-entropy over the model's ``seg_logits`` and the batch's masks (255 ignored), each
    class weighted by max_k(count_k) / count_c over the training masks' pixels (counted in ``prepare``), the
    weighted mean divided by the batch size, as released. The batch size is the global one, so that with DDP's
    gradient averaging several processes train as one holding the whole batch (up to the weighted mean being
    taken per process)."""

    name = "seg"
    local_fields = ("mask",)
    model_outputs = ("seg_logits",)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.workers = config["num_workers"]
        self.class_weights: torch.Tensor | None = None

    def prepare(self, annotations: TrainAnnotations, run_dir: Path) -> None:
        if annotations.mask_paths is None:
            raise ValueError("the seg loss needs segmentation masks: set mask_root (README, \"Segmentation masks\")")
        self.class_weights = mask_class_weights(annotations.mask_paths, self.workers)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if "seg_logits" not in inputs.features:
            raise ValueError("the seg loss needs a model with a segmentation decoder (sirs with seg_decoder: true)")
        if self.class_weights is None:
            raise RuntimeError("the seg loss needs the class weights of the training masks: call prepare() first")
        logits = _at_least_fp32(inputs.features["seg_logits"])
        loss = F.cross_entropy(logits, inputs.batch["mask"], weight=self.class_weights.to(logits),
                               ignore_index=IGNORE_INDEX)
        return loss / (logits.shape[0] * get_world_size())
