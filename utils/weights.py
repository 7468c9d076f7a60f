"""Reading weight files safely and loading them with a report instead of a silent ``strict=False``.

Every load says how many tensors arrived, which were resized, which the module lacks (an error, unless
a pattern of ``allow_missing`` covers them) and which the file has but the module does not (ignored and
listed). Key remapping is not done here: it lives next to the module that needs it (``remap_state``).
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class WeightsError(RuntimeError):
    """A weight file is missing, unsafe to read, or does not fit the module it is meant for."""


def read_state_dict(path: str | Path, what: str) -> StateDict:
    """Tensors of a ``.pth``/``.bin``/``.safetensors`` file, unwrapped from ``model``/``state_dict`` and ``module.``.

    ``what`` says what the file is, for the error when it is absent ("Swin checkpoint (vision_config's
    ckpt)"). Nothing is downloaded. Pickles are read with ``weights_only=True``: a file that needs
    arbitrary code fails here rather than running it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} not found: {path} (nothing is downloaded; see the README's weights section)")
    log.info("reading %s: %s", what, fingerprint(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on the content
            raise WeightsError(f"{what} {path} cannot be read with weights_only=True (it may need arbitrary "
                               f"code to unpickle; if you trust it, convert it once to a plain state dict with "
                               f"torch.save(state_dict)): {err}") from err
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{what} {path} does not hold a state dict (found {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def fingerprint(path: Path) -> str:
    """``PATH (N bytes, sha256 HEX)``: which file a run started from, for the log."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{path} ({path.stat().st_size} bytes, sha256 {digest.hexdigest()})"


def with_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """The tensors under ``prefix``, with it removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def shape_changes(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> list[str]:
    """``key: (a, b) -> (c, d)`` for tensors a remap resized (same key, other shape)."""
    return [f"{k}: {tuple(before[k].shape)} -> {tuple(v.shape)}" for k, v in after.items()
            if k in before and before[k].shape != v.shape]


def matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


@dataclass
class Remapped:
    """A state dict in a module's own names, with what the remap resized and what it left out (and why)."""

    state: StateDict
    resized: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def patterns_under(patterns: Iterable[str], prefix: str) -> list[str]:
    """``allow_missing_weights`` patterns (model names) for a sub-module under ``prefix``: ``vision_encoder.*``
    becomes ``*`` for the vision encoder; patterns that start with a wildcard apply everywhere."""
    return [p[len(prefix):] if p.startswith(prefix) else p for p in patterns
            if p.startswith(prefix) or p.startswith(("*", "?", "["))]


@dataclass
class LoadReport:
    """What a load did: counts for the log, names for the error message."""

    name: str
    loaded: int
    resized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.name}: loaded {self.loaded} tensors ({len(self.resized)} resized), "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected")

    def log(self) -> None:
        log.info("%s", self)
        if self.resized:
            log.info("%s: resized %s", self.name, "; ".join(self.resized))
        if self.missing:
            log.warning("%s: allowed to stay as initialised: %s", self.name, _listing(self.missing))
        if self.unexpected:
            log.info("%s: tensors of the file not used: %s", self.name, _listing(self.unexpected))


def _listing(keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_into(module: nn.Module, remapped: Remapped, name: str, *, ignore_unexpected: Iterable[str] = (),
              allow_missing: Iterable[str] = ()) -> LoadReport:
    """Load a remapped state into ``module`` and log the report.

    A tensor the module has and the file lacks is an error unless a ``fnmatch`` pattern of
    ``allow_missing`` covers it. Keys starting with an ``ignore_unexpected`` prefix (a classifier head, an
    MLM head) are dropped silently; other extra tensors, and what the remap left out, are listed. A shape
    mismatch is always an error.
    """
    ignore = tuple(ignore_unexpected)
    state = {k: v for k, v in remapped.state.items() if not (ignore and k.startswith(ignore))}
    own = module.state_dict()
    shape_errors = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shape_errors:
        raise WeightsError(f"{name}: tensor shapes differ (does the config describe this checkpoint's model?):\n  "
                           + "\n  ".join(shape_errors[:20]))
    result = module.load_state_dict(state, strict=False)
    report = LoadReport(name, len(state) - len(result.unexpected_keys), list(remapped.resized),
                        list(result.missing_keys), list(result.unexpected_keys) + list(remapped.dropped))
    allowed = list(allow_missing)
    needed = [k for k in report.missing if not matches(k, allowed)]
    if needed:
        raise WeightsError(f"{report}; missing: {_listing(needed)} (a wrong or incomplete checkpoint; if these "
                           f"may keep their initial values, give a pattern for them in allow_missing_weights)")
    report.log()
    return report
