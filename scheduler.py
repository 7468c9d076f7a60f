"""Schedules: the learning rate (linear warm-up, then linear or cosine decay, stepped every iteration) and
the value-guided stage schedule (which loss terms are on in which epochs)."""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from models import get_loss, list_losses
from models.objective import Stage
from utils.config import ConfigError, did_you_mean

log = logging.getLogger(__name__)


def warmup_steps(num_warmup_steps: int | float, total_steps: int) -> int:
    """A float below 1 is a fraction of all steps (X-VLM's ``num_warmup_steps: 0.1``); otherwise a count."""
    if isinstance(num_warmup_steps, float) and num_warmup_steps < 1:
        return int(num_warmup_steps * total_steps)
    return int(num_warmup_steps)


def lr_factor(step: int, warmup: int, total: int, sched: str, steps_per_epoch: int = 1, step_epochs: int = 1,
              step_gamma: float = 1.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based). ``step``: constant within an epoch,
    times ``step_gamma`` every ``step_epochs`` epochs (AMFMN's ``adjust_learning_rate``)."""
    if step < warmup:
        return step / max(1, warmup)
    if sched == "step":
        return step_gamma ** (step // steps_per_epoch // step_epochs)
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
    sched, step_epochs, step_gamma = sched_config["sched"], 1, 1.0
    if sched == "step":
        step_epochs, step_gamma = sched_config["step_epochs"], sched_config["step_gamma"]
        if step_epochs < 1:
            raise ValueError(f"schedular.step_epochs must be at least 1, got {step_epochs}")
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, sched, steps_per_epoch, step_epochs,
                                                      step_gamma))


# --- The value-guided stage schedule (FISVL's VGLF): which losses, with which weights, in which epochs.

_STAGE_KEYS = ("name", "start_epoch", "losses", "caption_weights")
_LEGACY_LOSS_KEYS = ("use_affil_loss", "center_factor", "use_scene_loss", "scene_factor", "use_triplet_loss")
PUBLISHED_STAGE2_START = 10  # FISVL hard-codes the switch at epoch 10 of 20


def legacy_stages(config: dict[str, Any], source: str = "config") -> list[dict[str, Any]]:
    """The stages PIR/FISVL YAMLs imply: contrastive (+ affiliation); with ``use_scene_loss`` FISVL's two
    stages, contr + affil + scene and then weighted contr + affil from epoch 10; with ``use_triplet_loss``
    PIR's triplet loss alone, which replaces every other loss."""
    if config["use_triplet_loss"]:
        others = [key for key in ("use_affil_loss", "use_scene_loss") if config[key]]
        if others:  # PIR's code would silently drop the triplet loss for the affiliation one
            raise ConfigError(f"{source}: use_triplet_loss replaces every other loss, but {others} also choose "
                              f"one; set them to false (or use `stages`)")
        return [{"name": "triplet", "start_epoch": 0, "losses": {"triplet": 1.0}}]
    losses = {"contr": 1.0}
    if config["use_affil_loss"]:
        losses["affil"] = 1.0 if config["center_factor"] is None else config["center_factor"]
    if not config["use_scene_loss"]:
        return [{"name": "main", "start_epoch": 0, "losses": losses}]
    scene = 1.0 if config["scene_factor"] is None else config["scene_factor"]
    return [{"name": "con_aff_scene", "start_epoch": 0, "losses": {**losses, "scene": scene}},
            {"name": "wcon_aff", "start_epoch": PUBLISHED_STAGE2_START, "losses": losses, "caption_weights": True}]


def _parse_stage(raw: Any, index: int, source: str) -> Stage:
    where = f"{source}: stages[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {list(_STAGE_KEYS)}, got {raw!r}")
    for key in raw:
        if key not in _STAGE_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{did_you_mean(str(key), _STAGE_KEYS)}")
    start, losses = raw.get("start_epoch"), raw.get("losses")
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ConfigError(f"{where}.start_epoch: expected an epoch number >= 0, got {start!r}")
    if not isinstance(losses, dict) or not losses:
        raise ConfigError(f"{where}.losses: expected a mapping of registered losses {list_losses()} to weights")
    for name, weight in losses.items():
        if name not in list_losses():
            raise ConfigError(f"{where}.losses: unknown loss '{name}'{did_you_mean(str(name), list_losses())}; "
                              f"registered: {list_losses()}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"{where}.losses.{name}: expected a weight >= 0, got {weight!r}")
    caption_weights = raw.get("caption_weights", False)
    if not isinstance(caption_weights, bool):
        raise ConfigError(f"{where}.caption_weights: expected true or false, got {caption_weights!r}")
    return Stage(str(raw.get("name", f"stage{index}")), start, {k: float(v) for k, v in losses.items()},
                 caption_weights)


def parse_stages(config: dict[str, Any], source: str = "config") -> list[Stage]:
    """Check ``config['stages']`` (or derive it from the legacy ``use_*`` keys) against the run's settings."""
    raw = config["stages"]
    if raw is None:
        raw = legacy_stages(config, source)
    else:
        given = [key for key in _LEGACY_LOSS_KEYS if config[key] is not None]
        if given:
            raise ConfigError(f"{source}: `stages` and the legacy keys {given} both choose the losses; keep one")
    stages = [_parse_stage(item, i, source) for i, item in enumerate(raw)]
    if not stages or stages[0].start_epoch != 0:
        raise ConfigError(f"{source}: stages must start with a stage at start_epoch 0")
    for before, after in zip(stages, stages[1:]):
        if after.start_epoch <= before.start_epoch:
            raise ConfigError(f"{source}: stage '{after.name}' starts at epoch {after.start_epoch}, not after "
                              f"stage '{before.name}' (epoch {before.start_epoch})")
    for name in dict.fromkeys(name for stage in stages for name in stage.losses):
        get_loss(name).check_config(config, source)
    return stages


class StageSchedule:
    """Walks the stages: a stage starts at its ``start_epoch`` or, with ``patience`` > 0, once val
    ``r_mean`` has not improved for ``patience`` epochs within the current stage."""

    def __init__(self, stages: list[Stage], patience: int = 0, epochs: int | None = None) -> None:
        self.stages, self.patience = stages, patience
        never = [s.name for s in stages if epochs is not None and s.start_epoch >= epochs]
        if never and not patience:
            log.warning("stages %s start after the last of the %d epochs and will not run", never, epochs)
        self.index = 0
        self.best, self.best_epoch = -math.inf, -1

    @property
    def current(self) -> Stage:
        return self.stages[self.index]

    def stage_for_epoch(self, epoch: int) -> Stage:
        while self.index + 1 < len(self.stages) and self.stages[self.index + 1].start_epoch <= epoch:
            self._advance()
        return self.current

    def observe(self, epoch: int, metric: float) -> None:
        """Record the epoch's val metric; move on early when the current stage has plateaued."""
        if metric > self.best:
            self.best, self.best_epoch = metric, epoch
        elif self.patience and epoch - self.best_epoch >= self.patience and self.index + 1 < len(self.stages):
            self._advance()

    def _advance(self) -> None:
        """Next stage; its plateau is counted from its own first val result."""
        self.index += 1
        self.best, self.best_epoch = -math.inf, -1

    def varies(self, term: str) -> bool:
        """True when ``term`` is on in some stages and off in others (DDP must then allow unused parameters
        if the term owns some, as the affiliation loss owns ``temp2``)."""
        return len({term in stage.losses for stage in self.stages}) == 2

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index, self.best, self.best_epoch = state["index"], state["best"], state["best_epoch"]
