"""AdamW (or Adam) over parameter groups that each model's own no-decay rule decides, with learning-rate
multipliers that really apply."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # torch has no public form

from models import RetrievalModel


def parameter_groups(model: RetrievalModel, lr: float, weight_decay: float, lr_mult: float,
                     objective: nn.Module | None = None) -> list[dict[str, Any]]:
    """Four groups: (decay, no decay) x (pretrained encoders at ``lr``, new heads at ``lr * lr_mult``).

    The model names its new heads (``head_parameter_names()``) and decides weight decay per parameter
    (``decays(name, param)``: X-VLM's substring rule for the X-VLM lineage). Parameters the losses own (the
    affiliation temperature) are new heads too, named ``objective.<name>``. Frozen parameters are left out;
    empty groups are dropped.
    """
    heads = model.head_parameter_names()
    named = [(name, param, name in heads) for name, param in model.named_parameters()]
    if objective is not None:
        named += [(f"objective.{name}", param, True) for name, param in objective.named_parameters()]
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param, head in named:
        if param.requires_grad:
            groups.setdefault((model.decays(name, param), head), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr": lr * (lr_mult if head else 1.0), "name": f"{'head' if head else 'encoder'}_{'decay' if decay else 'no_decay'}"}
            for (decay, head), params in sorted(groups.items(), key=lambda item: (item[0][1], not item[0][0]))]


def create_optimizer(opt_config: dict[str, Any], model: RetrievalModel,
                     objective: nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.98, eps 1e-8 by default), or Adam (``opt: adam``, the AMFMN lineage's) over
    :func:`parameter_groups`; ``fused: true`` selects torch's fused kernel. torch checks the parameters' device
    only at the first step, with a message about an argument the user never wrote: here it is checked at once,
    naming the key."""
    groups = parameter_groups(model, opt_config["lr"], opt_config["weight_decay"], opt_config["lr_mult"], objective)
    optimizer = torch.optim.Adam if opt_config["opt"] == "adam" else torch.optim.AdamW
    if not opt_config["fused"]:
        return optimizer(groups, lr=opt_config["lr"], betas=tuple(opt_config["betas"]), eps=opt_config["eps"])
    supported = _get_fused_kernels_supported_devices()
    devices = sorted({p.device.type for group in groups for p in group["params"]})
    if any(device not in supported for device in devices):
        raise ValueError(f"optimizer.fused: true, but torch {torch.__version__} has no fused {optimizer.__name__} for "
                         f"parameters on {', '.join(devices)} (it has one on {', '.join(supported)}); set "
                         f"optimizer.fused: false")
    return optimizer(groups, lr=opt_config["lr"], betas=tuple(opt_config["betas"]), eps=opt_config["eps"], fused=True)
