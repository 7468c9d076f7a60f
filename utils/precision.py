"""Mixed precision as a first-class option: fp32 (replication default), amp_bf16 or amp_fp16."""
from __future__ import annotations

import contextlib

import torch

_DTYPES = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A scaler that is active only for fp16 (bf16 and fp32 need none); always present so resume is uniform."""
    return torch.amp.GradScaler(device.type, enabled=precision == "amp_fp16")
