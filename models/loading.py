"""Loading a whole-model checkpoint named by ``--checkpoint``: for evaluation, or to start training from it.

Accepted: this project's ``checkpoint_best.pth`` / ``checkpoint_last.pth``, checkpoints released by PIR and
FISVL (``{'model', 'config'}``, Microsoft Swin names, SFGS inside the ResNet) and X-VLM's pre-trained or
fine-tuned checkpoints. The model's ``remap_checkpoint`` turns each into its own names.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from torch import nn

from utils.weights import LoadReport, WeightsError, load_into, read_state_dict

log = logging.getLogger(__name__)


def load_for_evaluation(model: nn.Module, path: str, config: dict[str, Any]) -> LoadReport:
    """Every tensor of the model must come from the file (except ``allow_missing_weights`` patterns)."""
    remapped = model.remap_checkpoint(read_state_dict(path, "checkpoint (--checkpoint)"))
    return load_into(model, remapped, f"model <- {path}", allow_missing=config["allow_missing_weights"])


def initialise_from_checkpoint(model: nn.Module, path: str, config: dict[str, Any]) -> LoadReport:
    """Start training from a checkpoint, as X-VLM's ``--checkpoint`` does.

    An encoder the file holds must be complete in it. An encoder it does not hold at all (the ResNet prior
    in an X-VLM checkpoint) gets the pretrained weights the config names. The heads (projections,
    temperatures, fusion) load when the file has them in this model's shapes, and keep their
    initialisation otherwise: an X-VLM checkpoint's 256-d projections do not fit a 512-d model.
    """
    remapped = model.remap_checkpoint(read_state_dict(path, "checkpoint (--checkpoint)"))
    absent = [name for name in model.encoders() if not any(k.startswith(f"{name}.") for k in remapped.state)]
    model.load_pretrained(config, parts=absent)
    heads = model.head_parameter_names() | {n for n, _ in model.named_buffers()
                                            if not n.startswith(tuple(f"{e}." for e in model.encoders()))}
    own = model.state_dict()
    for key in [k for k, v in remapped.state.items() if k in heads and own[k].shape != v.shape]:
        remapped.dropped.append(f"{key} (shape {tuple(remapped.state.pop(key).shape)} differs; kept the model's "
                                f"initialisation {tuple(own[key].shape)})")
    allow = [*config["allow_missing_weights"], *sorted(heads), *(f"{name}.*" for name in absent)]
    return load_into(model, remapped, f"model <- {path}", allow_missing=allow)


def untrained_parts(model: nn.Module, sources: Mapping[str, str | None]) -> list[str]:
    """What a model built from its config alone starts with at random: each encoder whose config names no
    weights (``sources``, from ``model.pretrained_sources``), and the new heads, which no pretrained file holds
    (scalar temperatures excepted: they start from the config's value)."""
    heads = {name.split(".")[0] for name, param in model.named_parameters()
             if name in model.head_parameter_names() and param.dim() > 0}
    return [name for name, path in sources.items() if not path] + sorted(heads)


def random_init(part: str, config: dict[str, Any], why: str) -> None:
    """An encoder starts from random weights only when the config says it may."""
    if part not in config["allow_random_init"]:
        raise WeightsError(f"{part}: {why}. Name its weights (see the README's weights section), or add {part} "
                           f"to allow_random_init to train it from random weights")
    log.warning("%s: random init (%s; allowed by allow_random_init)", part, why)
