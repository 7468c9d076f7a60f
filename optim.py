"""AdamW with X-VLM's no-decay rule and learning-rate multipliers that really apply."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# X-VLM / PIR / FISVL: no weight decay for any parameter whose name contains one of these.
NO_DECAY_NAME_PARTS = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
                       "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, lr_mult: float) -> list[dict[str, Any]]:
    """Four groups: (decay, no decay) x (pretrained encoders at ``lr``, new heads at ``lr * lr_mult``).

    The model names its new heads with ``head_parameter_names()`` and its extra no-decay parameters with
    ``no_weight_decay()``; frozen parameters are left out. Empty groups are dropped.
    """
    heads = set(model.head_parameter_names()) if hasattr(model, "head_parameter_names") else set()
    extra_no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (any(part in name for part in NO_DECAY_NAME_PARTS) or name in extra_no_decay)
        groups.setdefault((decay, name in heads), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr": lr * (lr_mult if head else 1.0), "name": f"{'head' if head else 'encoder'}_{'decay' if decay else 'no_decay'}"}
            for (decay, head), params in sorted(groups.items(), key=lambda item: (item[0][1], not item[0][0]))]


def create_optimizer(opt_config: dict[str, Any], model: nn.Module) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.98, eps 1e-8 by default) over :func:`parameter_groups`."""
    groups = parameter_groups(model, opt_config["lr"], opt_config["weight_decay"], opt_config["lr_mult"])
    return torch.optim.AdamW(groups, lr=opt_config["lr"], betas=tuple(opt_config["betas"]), eps=opt_config["eps"])
