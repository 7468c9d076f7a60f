"""Reading weight files safely and loading them with a report instead of a silent ``strict=False``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """A weight file is missing, unsafe to read, or does not fit the module it is meant for."""


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.bin``/``.safetensors`` file, unwrapped from ``model``/``state_dict`` and ``module.``.

    ``what`` describes the file for error messages ("Swin checkpoint", ...). Pickles are read with
    ``weights_only=True``: a file that needs arbitrary code fails here rather than running it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on the content
            raise WeightsError(f"{what} {path} cannot be read with weights_only=True (it may need arbitrary "
                               f"code to unpickle; convert it to a plain state dict first): {err}") from err
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{what} {path} does not hold a state dict (found {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


@dataclass
class LoadReport:
    """What a load did: counts for the log, names for the error message."""

    name: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.name}: loaded {self.loaded} tensors, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected")


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], name: str,
              ignore_unexpected: Iterable[str] = ()) -> LoadReport:
    """Load ``state`` into ``module``; any missing tensor is an error, unexpected ones are reported.

    ``ignore_unexpected`` lists key prefixes that a source file may carry for parts this module does
    not have (a classifier head, an MLM head).
    """
    ignore = tuple(ignore_unexpected)
    state = {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else dict(state)
    own = module.state_dict()
    shape_errors = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shape_errors:
        raise WeightsError(f"{name}: tensor shapes differ:\n  " + "\n  ".join(shape_errors[:20]))
    result = module.load_state_dict(state, strict=False)
    report = LoadReport(name, len(state) - len(result.unexpected_keys), list(result.missing_keys),
                        list(result.unexpected_keys))
    log.info("%s", report)
    if report.missing:
        raise WeightsError(f"{report}; missing: {', '.join(report.missing[:20])}")
    if report.unexpected:
        log.warning("%s: unexpected tensors ignored: %s", name, ", ".join(report.unexpected[:20]))
    return report
