"""Guards against non-finite training: a NaN or inf loss, gradient or weight stops the run (or, for a step,
is skipped and counted) instead of flowing into the metrics and the checkpoints."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .distributed import all_true


class NonFiniteError(FloatingPointError):
    """Training produced NaN or inf; the message says where (epoch, step, loss terms or tensor names)."""


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The total L2 norm of the gradients (NaN or inf when any gradient is)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def step_is_finite(losses: Mapping[str, torch.Tensor], norm: torch.Tensor | None) -> bool:
    """Whether every loss term (and the gradient norm, when given) is finite on every process: one
    reduction and one host sync per step, so all processes skip or stop together."""
    values = [v.detach().float().reshape(1) for v in losses.values()]
    if norm is not None:
        values.append(norm.detach().float().reshape(1).to(values[0].device))
    return all_true(torch.isfinite(torch.cat(values)).all())


def describe_step(losses: Mapping[str, torch.Tensor], norm: torch.Tensor | None) -> str:
    """``loss=nan, loss_contr=nan, loss_affil=0.4131, grad norm=nan`` for an error message."""
    parts = [f"{name}={value.detach().float().item():.4g}" for name, value in losses.items()]
    if norm is not None:
        parts.append(f"grad norm={norm.float().item():.4g}")
    return ", ".join(parts)


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or inf."""
    return [name for name, tensor in state.items()
            if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all())]
