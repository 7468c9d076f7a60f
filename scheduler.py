"""Learning-rate schedule: linear warm-up, then linear or cosine decay to zero, stepped every iteration."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_steps(num_warmup_steps: int | float, total_steps: int) -> int:
    """A float below 1 is a fraction of all steps (X-VLM's ``num_warmup_steps: 0.1``); otherwise a count."""
    if isinstance(num_warmup_steps, float) and num_warmup_steps < 1:
        return int(num_warmup_steps * total_steps)
    return int(num_warmup_steps)


def lr_factor(step: int, warmup: int, total: int, sched: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if sched == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def create_scheduler(sched_config: dict[str, Any], optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LambdaLR:
    """Schedule over the iterations that really run (``steps_per_epoch`` = batches per epoch after drop_last)."""
    total = sched_config["epochs"] * steps_per_epoch
    warmup = warmup_steps(sched_config["num_warmup_steps"], total)
    if warmup > total:
        raise ValueError(f"schedular.num_warmup_steps = {warmup} exceeds the {total} training steps")
    sched = sched_config["sched"]
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, sched))
