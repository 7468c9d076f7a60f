"""AdamW groups (the model's no-decay rule, X-VLM's by default; lr_mult on new heads, the losses' parameters
included) and the warm-up + decay schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models import RetrievalModel
from models.losses import AffiliationLoss
from models.objective import RetrievalObjective
from optim import create_optimizer, parameter_groups
from scheduler import create_scheduler, lr_factor, warmup_steps

OPT = {"opt": "adamW", "lr": 1e-3, "weight_decay": 0.05, "lr_mult": 2.0, "betas": [0.9, 0.98], "eps": 1e-8,
       "fused": False}


class Toy(RetrievalModel):
    """An 'encoder' and a 'head', named like the real models; X-VLM's no-decay rule (the default ``decays``)."""

    def __init__(self) -> None:
        super().__init__()
        self.vision_encoder = nn.Sequential()
        self.vision_encoder.add_module("fc", nn.Linear(4, 4))
        self.vision_encoder.add_module("norm1", nn.LayerNorm(4))
        self.vision_encoder.pos_embed = nn.Parameter(torch.zeros(1, 4))
        self.vision_proj = nn.Linear(4, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Linear(4, 4).requires_grad_(False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(self.vision_encoder(images))

    def encode_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return text["input_ids"].float()

    def head_parameter_names(self) -> set[str]:
        return {"vision_proj.weight", "vision_proj.bias", "temp"}

    def no_weight_decay(self) -> set[str]:
        return {"vision_encoder.pos_embed"}


LOSS_CONFIG = {"temp2": 0.05, "soft_target_eps": 6e-5, "affil_center_chunk": 0, "affil_symmetric": False}


def affiliation_objective() -> RetrievalObjective:
    """An objective whose affiliation loss owns the affiliation temperature (PIR's ``temp2``)."""
    return RetrievalObjective({"affil": AffiliationLoss(LOSS_CONFIG)})


def names_by_group(model: RetrievalModel, objective: nn.Module | None = None) -> dict[str, set[str]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    if objective is not None:
        ids.update({id(p): f"objective.{n}" for n, p in objective.named_parameters()})
    return {g["name"]: {ids[id(p)] for p in g["params"]}
            for g in parameter_groups(model, 1e-3, 0.05, 2.0, objective)}


def test_groups_follow_the_no_decay_rule_and_heads() -> None:
    groups = names_by_group(Toy())
    assert groups == {
        "encoder_decay": {"vision_encoder.fc.weight"},
        "encoder_no_decay": {"vision_encoder.fc.bias", "vision_encoder.norm1.weight", "vision_encoder.norm1.bias",
                             "vision_encoder.pos_embed"},
        "head_decay": {"vision_proj.weight", "temp"},  # the temperatures are decayed, as in PIR/FISVL
        "head_no_decay": {"vision_proj.bias"},
    }


def test_the_losses_parameters_are_decayed_heads() -> None:
    """The affiliation temperature, now owned by its loss, keeps PIR/FISVL's treatment of ``temp2``."""
    groups = names_by_group(Toy(), affiliation_objective())
    assert groups["head_decay"] == {"vision_proj.weight", "temp", "objective.losses.affil.temp"}
    assert groups["head_no_decay"] == {"vision_proj.bias"}


def test_lr_mult_really_applies_through_the_schedule() -> None:
    model, objective = Toy(), affiliation_objective()
    optimizer = create_optimizer(OPT, model, objective)
    scheduler = create_scheduler({"sched": "linear", "epochs": 2, "num_warmup_steps": 2}, optimizer, steps_per_epoch=5)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    factor = lr_factor(3, 2, 10, "linear")
    assert lrs["encoder_decay"] == pytest.approx(1e-3 * factor)
    assert lrs["head_decay"] == pytest.approx(2e-3 * factor)
    head_decay = next(g for g in optimizer.param_groups if g["name"] == "head_decay")["params"]
    assert any(p is objective.losses["affil"].temp for p in head_decay)
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups}["encoder_no_decay"] == 0.0
    assert optimizer.defaults["betas"] == (0.9, 0.98)


def test_weight_decay_changes_only_decayed_parameters() -> None:
    model, objective = Toy(), affiliation_objective()
    optimizer = create_optimizer({**OPT, "weight_decay": 0.5}, model, objective)
    named = {**dict(model.named_parameters()), **{f"objective.{n}": p for n, p in objective.named_parameters()}}
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.zeros_like(p)  # zero gradient: only decoupled weight decay can move a parameter
    optimizer.step()
    moved = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert moved == {"vision_encoder.fc.weight", "vision_proj.weight", "temp", "objective.losses.affil.temp"}


@pytest.mark.parametrize("opt", ["adamW", "adam"])
def test_fused_reaches_the_optimizer_with_the_same_groups_and_update(opt: str) -> None:
    """``optimizer.fused: true`` keeps the parameter groups and gives the update of the unfused kernel (on CPU,
    where this torch has the fused kernel)."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model, objective = Toy(), affiliation_objective()
        optimizer = create_optimizer({**OPT, "opt": opt, "fused": fused}, model, objective)
        assert optimizer.defaults["fused"] is (True if fused else None)
        for p in [*model.parameters(), *objective.parameters()]:
            p.grad = torch.full_like(p, 0.5) if p.requires_grad else None
        optimizer.step()
        results.append(([(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups],
                        [p.detach().clone() for p in model.parameters()]))
    (groups, unfused), (fused_groups, fused_params) = results
    assert fused_groups == groups
    assert all(torch.allclose(a, b) for a, b in zip(unfused, fused_params))


def test_fused_on_a_device_without_the_kernel_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"optimizer.fused: true, but torch .* on meta"):
        create_optimizer({**OPT, "fused": True}, Toy().to("meta"))


def test_schedule_values() -> None:
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(7, 200) == 7
    assert [lr_factor(s, 4, 12, "linear") for s in (0, 2, 4, 8, 12)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert lr_factor(8, 4, 12, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(12, 4, 12, "cosine") == pytest.approx(0.0)


def test_scheduler_state_survives_a_resume() -> None:
    def build() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = create_optimizer(OPT, Toy())
        return optimizer, create_scheduler({"sched": "cosine", "epochs": 3, "num_warmup_steps": 0.2}, optimizer, 10)

    optimizer, scheduler = build()
    for _ in range(13):
        optimizer.step()
        scheduler.step()
    optimizer2, scheduler2 = build()
    scheduler2.load_state_dict(scheduler.state_dict())
    optimizer2.load_state_dict(optimizer.state_dict())
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]
    optimizer.step(), scheduler.step(), optimizer2.step(), scheduler2.step()
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_too_long_warmup_is_an_error() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        create_scheduler({"sched": "linear", "epochs": 1, "num_warmup_steps": 50}, create_optimizer(OPT, Toy()), 10)
