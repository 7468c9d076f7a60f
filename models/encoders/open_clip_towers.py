"""CLIP towers built by open_clip: architectures by name or model JSON, and weight files in every published
layout read with a load report (clip-and-search.md §2).

Nothing here downloads: an architecture is one of open_clip's bundled model JSONs or a JSON of one's own,
and weights come from a local file only. The layouts:

* OpenAI's TorchScript archives (``ViT-B-32.pt``): read with ``torch.jit.load`` (no pickle runs), the archive's
  ``input_resolution`` / ``context_length`` / ``vocab_size`` entries (and a stored causal mask) dropped;
* plain state dicts (RemoteCLIP, GeoRSCLIP), open_clip training checkpoints (``state_dict`` wrapper,
  ``module.`` prefix) and ``.safetensors``, read with ``weights_only=True``;

then open_clip's own conversions (third-party layouts, the custom-text layout, a resized position embedding
when the image size differs) bring them to the model's names.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import open_clip
import torch
from open_clip.factory import convert_state_dict, convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
from torch import nn

from utils.weights import Remapped, StateDict, WeightsError, fingerprint, read_state_dict, shape_changes

log = logging.getLogger(__name__)

# Entries of TorchScript archives that are not weights: OpenAI's hyper-parameters, and the causal text mask a
# scripted open_clip model stores (open_clip builds it itself, as a non-persistent buffer).
ARCHIVE_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# The activation the published weight files were trained with, by file name (clip-and-search.md §2): OpenAI's
# weights and the CLIPs fine-tuned from them through open_clip's old OpenAI path used QuickGELU; GeoRSCLIP's
# ViT-H-14 started from LAION-2B weights, trained with GELU.
KNOWN_ACTIVATIONS = ((re.compile(r"^RS5M_ViT-H-14"), False),
                     (re.compile(r"^(RemoteCLIP-(RN50|ViT-B-32|ViT-L-14)|RS5M_ViT-(B-32|L-14))"), True))


class ArchitectureError(ValueError):
    """An open_clip architecture that cannot be built here."""


def architecture(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, model config)`` of a ``clip_model`` value: an open_clip name (``ViT-B-32``), a path to a model
    JSON of one's own (named by its file stem), or ``{"name", "config"}`` as a checkpoint inlines it. The
    architecture is registered with open_clip under ``name``, so ``create_model`` and ``get_tokenizer`` find it."""
    if isinstance(spec, dict):
        if set(spec) != {"name", "config"}:
            raise ArchitectureError(f"an inline clip_model needs exactly the keys name and config, got {sorted(spec)}")
        name, config = spec["name"], spec["config"]
    elif spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise ArchitectureError(f"clip_model: model JSON not found: {path}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ArchitectureError(f"clip_model: {path} is not valid JSON: {err}") from err
        name = path.stem
    else:
        config = open_clip.get_model_config(spec)
        if config is None:
            known = {m.lower(): m for m in open_clip.list_models()}
            close = ([m for lower, m in known.items() if spec.lower() in lower][:8]
                     or [known[m] for m in difflib.get_close_matches(spec.lower(), known, n=5)])
            raise ArchitectureError(f"clip_model: unknown open_clip architecture {spec!r}"
                                    + (f"; similar: {', '.join(close)}" if close else "")
                                    + " (open_clip.list_models() lists them; a model JSON path works too)")
        return spec, config
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in config:
            raise ArchitectureError(f"clip_model {name!r}: the model config has no {key!r} (an open_clip model JSON "
                                    f"has embed_dim, vision_cfg and text_cfg)")
    if open_clip.get_model_config(name) != config:
        _register(name, config)
    return name, copy.deepcopy(config)


def _register(name: str, config: dict[str, Any]) -> None:
    """Register ``config`` under ``name`` through open_clip's public ``add_model_config`` (which reads files)."""
    folder = Path(tempfile.mkdtemp(prefix="open_clip_arch_"))
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    open_clip.add_model_config(path)


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """open_clip logs through the root logger: "Model initialized randomly" for every model it builds without a
    tag (here the weights are loaded right after, with their own report) and each step of finding a tokenizer."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def build_clip(name: str, quick_gelu: bool, image_size: int) -> tuple[nn.Module, Any, Any]:
    """``(model, train transform, eval transform)`` of a registered architecture, random weights, nothing fetched."""
    with quiet_open_clip():
        return open_clip.create_model_and_transforms(
            name, pretrained=None, force_quick_gelu=quick_gelu, force_image_size=image_size,
            pretrained_image=False, pretrained_text=False, cache_dir=None)


def uses_quick_gelu(name: str, config: dict[str, Any], force: bool) -> bool:
    return force or bool(config.get("quick_gelu", False)) or name.endswith("-quickgelu")


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's releases are TorchScript zip archives (a ``constants.pkl`` and compiled ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.endswith("/constants.pkl") for entry in archive.namelist())


def read_clip_weights(path: str | Path) -> tuple[StateDict, bool | None]:
    """The tensors of a CLIP weight file in any published layout, and the activation the file says it was trained
    with (``True`` = QuickGELU, ``False`` = GELU, ``None`` = the file cannot tell)."""
    path = Path(path)
    if path.is_file() and is_torchscript_archive(path):
        log.info("reading CLIP weights (clip_weights, a TorchScript archive): %s", fingerprint(path))
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as err:
            raise WeightsError(f"clip_weights {path}: a TorchScript archive torch.jit.load cannot read: {err}") from err
        state = {k: v for k, v in scripted.state_dict().items() if k not in ARCHIVE_NON_WEIGHTS}
        return state, _scripted_activation(scripted)
    return read_state_dict(path, "CLIP weights (clip_weights)"), _known_activation(path.name)


def _known_activation(file_name: str) -> bool | None:
    """The activation of a published file by its name (``KNOWN_ACTIVATIONS``); ``None`` for any other file."""
    return next((quick for pattern, quick in KNOWN_ACTIVATIONS if pattern.search(file_name)), None)


def _scripted_activation(scripted: torch.jit.ScriptModule) -> bool | None:
    """Whether the archive's modules include QuickGELU (OpenAI's) or GELU, from their original class names."""
    names = {module.original_name for module in scripted.modules()}
    return True if "QuickGELU" in names else False if "GELU" in names else None


def check_activation(path: str | Path, file_quick_gelu: bool | None, model_quick_gelu: bool, name: str) -> None:
    """Warn, saying what to set, when the config's activation differs from the one the file was trained with."""
    if file_quick_gelu is None:
        log.info("clip_weights %s: the file does not say whether it was trained with QuickGELU; the model uses %s "
                 "(OpenAI's weights and the CLIPs fine-tuned from them need QuickGELU: a -quickgelu architecture "
                 "or clip_quick_gelu: true)", path, "QuickGELU" if model_quick_gelu else "GELU")
    elif file_quick_gelu != model_quick_gelu:
        fix = (f"clip_model: {name.removesuffix('-quickgelu')}-quickgelu or clip_quick_gelu: true" if file_quick_gelu
               else f"clip_model: {name.removesuffix('-quickgelu')} and clip_quick_gelu: false")
        log.warning("clip_weights %s was trained with %s but the model uses %s: its embeddings will be off and "
                    "zero-shot recalls several points low; set %s", path,
                    "QuickGELU" if file_quick_gelu else "GELU", "QuickGELU" if model_quick_gelu else "GELU", fix)


def remap_clip_state(model: nn.Module, state: StateDict) -> Remapped:
    """A CLIP state dict -> ``model``'s names and shapes, by open_clip's own conversions: third-party layouts,
    the custom-text layout, a 1-d or scalar ``logit_scale``, position embeddings resized to the model's image
    size and context length (listed as resized)."""
    state = convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and state["logit_scale"].shape != model.logit_scale.shape:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    before, own = dict(state), model.state_dict()
    # open_clip resizes the sequence length only (and asserts on another text width): a file of other widths
    # is left to the load report, which names each tensor whose shape differs
    if _same_width(state, own, "visual.positional_embedding"):
        resize_pos_embed(state, model)
    if _same_width(state, own, "positional_embedding") and _same_width(state, own, "text.positional_embedding"):
        resize_text_pos_embed(state, model)
    return Remapped(state, resized=shape_changes(before, state))


def _same_width(state: StateDict, own: StateDict, key: str) -> bool:
    """Whether the file's position embedding ``key`` has the model's width (or either lacks it)."""
    return key not in state or key not in own or state[key].shape[-1] == own[key].shape[-1]
