"""Training and evaluation worker (X-VLM's ``Retrieval.py``): one process, or one of several under torchrun.

    python Retrieval.py --config configs/demo_fisvl.yaml --output_dir output/demo [key.sub=value ...]
    python Retrieval.py --config C --output_dir O --evaluate --checkpoint O/checkpoint_best.pth

Each epoch trains, evaluates val (and test), keeps ``checkpoint_best.pth`` by val ``r_mean`` and writes
``checkpoint_last.pth`` with everything ``--resume`` needs to continue as if never stopped.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import utils.distributed as dist_utils
from dataset import EvalSplit, check_split_images, create_eval_split, create_train_loader, prepare_synthetic_data
from dataset.images import ImageDecoding, load_rgb
from models import RetrievalModel, build_model
from models.loading import initialise_from_checkpoint, load_for_evaluation, untrained_parts
from models.evaluation import check_rerank, evaluate_scores, evaluate_split
from models.inference import checkpoint_payload
from models.objective import RetrievalObjective, build_objective
from models.task import RetrievalTask
from optim import create_optimizer
from scheduler import StageSchedule, create_scheduler, parse_stages
from utils.cli import add_run_arguments, parse_run_arguments
from utils.checkpoint import (load_checkpoint, remove_stale_temporaries, rng_state, save_atomic, set_rng_state,
                              write_text_atomic)
from utils.config import dump_config, load_config
from utils.finite import NonFiniteError, describe_step, grad_norm, non_finite_tensors, step_is_finite
from utils.logger import Progress, TensorBoard, log_failure, max_memory_mb, setup_logging
from utils.figures import plot_image_to_text, plot_recall_curves, plot_text_to_image, plot_training_curves
from utils.metrics import METRIC_KEYS, chance_metrics, retrieval_ranks
from utils.precision import autocast, grad_scaler
from utils.protocol import PAPER_PROTOCOL, check_protocol, entry_name, label, mean_of_last_epochs, paper_epochs
from utils.seg_metrics import SEG_KEYS
from utils.weights import WeightsError

log = logging.getLogger("retrieval")
NO_CHECKPOINT = ("", "-1", "none")


class ResumeError(RuntimeError):
    """``--resume`` names a checkpoint that cannot continue this run."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--output_dir", required=True, help="run folder (created with its parents)")
    add_run_arguments(parser)
    parser.add_argument("--device", default="cuda", help="cuda or cpu; cuda falls back to cpu when absent")
    parser.add_argument("--dist_url", default="env://", help="process-group init method")
    parser.add_argument("--world_size", type=int, default=None, help="accepted for compatibility; the launcher sets it")
    parser.add_argument("--distributed", default=None, help="accepted for compatibility; derived from the environment")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optimizer.lr=1e-4")
    return parser


@dataclass
class TrainState:
    """What an epoch loop carries between epochs, saved in ``checkpoint_last.pth``."""

    epoch: int = 0  # next epoch to run
    best_metric: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0  # steps whose update nan_policy: skip dropped, over the whole run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(requested: str, info: dist_utils.DistInfo) -> torch.device:
    if requested.startswith("cuda") and torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    if requested.startswith("cuda"):
        log.info("CUDA is not available: running on CPU")
    return torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of a batch (nested dicts too: a text processor's output) on ``device``."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True)
            for k, v in batch.items()}


def metric_row(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """X-VLM's log keys with 2-decimal rounding (``val_txt_r1`` ... ``val_r_mean``), and the segmentation
    metrics when there are any (``val_seg_miou`` ...)."""
    return {f"{prefix}_{k}": round(metrics[k], 2) for k in (*METRIC_KEYS, *SEG_KEYS) if k in metrics}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """The R@K table printed at the end of a run or an evaluation; the name column widens for long names."""
    width = max([22, *(len(name) + 1 for name in rows)])
    head = f"{'':<{width}}| {'i2t R@1':>7} {'R@5':>6} {'R@10':>6} | {'t2i R@1':>7} {'R@5':>6} {'R@10':>6} | {'mR':>6}"
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:<{width}}| {m['txt_r1']:7.2f} {m['txt_r5']:6.2f} {m['txt_r10']:6.2f} | "
                     f"{m['img_r1']:7.2f} {m['img_r5']:6.2f} {m['img_r10']:6.2f} | {m['r_mean']:6.2f}")
    return "\n".join(lines)


def train_one_epoch(task: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, epoch: int,
                    config: dict[str, Any], device: torch.device, state: TrainState) -> dict[str, Any]:
    """One pass over the loader; returns X-VLM's ``train_*`` strings plus time, throughput and memory.

    A step whose loss terms or gradient norm are not finite (on any process) never updates the weights:
    ``nan_policy: stop`` raises :class:`NonFiniteError` naming epoch, step and terms; ``skip`` drops the
    update, counts it in ``state.skipped_steps`` and stops once ``nan_skip_limit`` is exceeded. Under fp16
    the grad scaler already skips overflowing gradients, so only the loss is checked there.
    """
    task.train()
    global_batch = config["batch_size_train"] * dist_utils.get_world_size()
    progress = Progress(f"Train Epoch: [{epoch}]", len(loader), config["print_freq"], global_batch, device)
    sums: dict[str, torch.Tensor] = {}
    lr_sum, finite_steps, skipped = 0.0, 0, 0
    check_grads = not scaler.is_enabled()
    for step, batch in enumerate(loader):
        progress.data_loaded()
        batch = to_device(batch, device)
        with autocast(config["precision"], device):
            losses = task(batch, epoch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.unscale_(optimizer)
        if config["grad_clip"] > 0:
            norm = torch.nn.utils.clip_grad_norm_(task.parameters(), config["grad_clip"])
        else:
            norm = grad_norm(task.parameters()) if check_grads else None
        lr_sum += optimizer.param_groups[0]["lr"]
        if step_is_finite(losses, norm):
            scaler.step(optimizer)
            finite_steps += 1
            for name, value in losses.items():
                if name != "loss":
                    sums[name] = sums.get(name, torch.zeros((), device=device)) + value.detach().float()
        else:
            where = f"epoch {epoch}, step {step + 1}/{len(loader)}: non-finite loss or gradient ({describe_step(losses, norm)})"
            if config["nan_policy"] == "stop":
                raise NonFiniteError(f"{where}; nan_policy: stop ended the run (lower the learning rate, try "
                                     f"grad_clip, or set nan_policy: skip to skip such steps)")
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            state.skipped_steps += 1
            if state.skipped_steps > config["nan_skip_limit"]:
                raise NonFiniteError(f"{where}; {state.skipped_steps} steps of this run were skipped, more than "
                                     f"nan_skip_limit {config['nan_skip_limit']}: the run stops")
            log.warning("%s; update skipped (%d in this run, nan_skip_limit %d)", where, state.skipped_steps,
                        config["nan_skip_limit"])
        scaler.update()
        scheduler.step()
        if step % config["print_freq"] == 0 or step + 1 == len(loader):
            means = {k: dist_utils.all_reduce_mean(v).item() / max(finite_steps, 1) for k, v in sums.items()}
            progress.step(step, {"lr": optimizer.param_groups[0]["lr"], **means})
        else:
            progress.step(step, {})
    steps = len(loader)
    stats: dict[str, Any] = {"train_lr": f"{lr_sum / steps:.5f}"}
    stats.update({f"train_{k}": f"{dist_utils.all_reduce_mean(v).item() / max(finite_steps, 1):.5f}"
                  for k, v in sums.items()})
    stats.update({"train_time_s": round(progress.elapsed, 2),
                  "samples_per_s": round(steps * global_batch / progress.elapsed, 1),
                  "max_mem_mb": round(max_memory_mb(device), 1)})
    if skipped:
        stats["train_skipped_steps"] = skipped
    return stats


def model_state(model: RetrievalModel, objective: RetrievalObjective, config: dict[str, Any], epoch: int,
                metric: float, selected_on: str) -> dict[str, Any]:
    """A self-contained checkpoint (``models.load_retriever`` rebuilds the model from it alone) in the
    released layout (``model`` + ``config``, which PIR/FISVL loaders accept), plus the losses' own parameters
    (the affiliation temperature) and provenance."""
    return {**checkpoint_payload(model, config), "objective": objective.state_dict(), "epoch": epoch,
            "metric": metric, "selected_on": selected_on}


def write_log(output_dir: Path, history: list[dict[str, Any]], footer: list[str] = ()) -> None:
    """``log.txt``: one JSON line per finished epoch (rewritten whole, so a resume never duplicates a line)."""
    lines = [json.dumps(record) for record in history] + list(footer)
    write_text_atomic("".join(line + "\n" for line in lines), output_dir / "log.txt")


def split_scores(record: dict[str, Any], split: str) -> dict[str, float]:
    """One split's recalls, and its segmentation metrics where the epoch has them, from an epoch record."""
    return {k: record[f"{split}_{k}"] for k in (*METRIC_KEYS, *SEG_KEYS) if f"{split}_{k}" in record}


def format_segmentation(rows: dict[str, dict[str, float]]) -> str:
    """The segmentation metrics of the rows that have them, one line each."""
    return "\n".join(f"{name:<22}| pixel acc {m['seg_pixel_acc']:6.2f} | class acc {m['seg_class_acc']:6.2f} | "
                     f"mIoU {m['seg_miou']:6.2f} | FWIoU {m['seg_fwiou']:6.2f}" for name, m in rows.items()
                     if "seg_miou" in m)


def summary_lines(state: TrainState, config: dict[str, Any]) -> list[str]:
    """The closing JSON line: test at the selected epoch, at the last epoch, and best-on-test for comparison;
    with the paper protocol, also the mean of test over its last epochs (``utils.protocol``)."""
    by_epoch = {r["epoch"]: r for r in state.history}
    selected = config["select_on"]
    test_epochs = [r for r in state.history if "test_r_mean" in r]
    summary: dict[str, Any] = {"best_epoch": state.best_epoch, "selected_on": selected,
                               f"{selected}_r_mean_at_best": state.best_metric}
    if "test_r_mean" in by_epoch.get(state.best_epoch, {}):
        summary["test_at_best"] = split_scores(by_epoch[state.best_epoch], "test")
    last = state.history[-1]
    if "test_r_mean" in last:
        summary["test_at_last"] = {k: last[f"test_{k}"] for k in METRIC_KEYS} | {"epoch": last["epoch"]}
    if test_epochs:
        oracle = max(test_epochs, key=lambda r: r["test_r_mean"])
        summary["best_on_test_epoch_for_comparison_only"] = oracle["epoch"]
        summary["test_r_mean_best_on_test"] = oracle["test_r_mean"]
    averaged = paper_epochs(config)
    if averaged:
        summary.update({"protocol": PAPER_PROTOCOL, "protocol_epochs": list(averaged),
                        entry_name(len(averaged)): mean_of_last_epochs(state.history, averaged)})
    lines = [json.dumps(summary)]
    if config["legacy_log_footer"]:
        lines.append(f"best epoch: {state.best_epoch}")
    return lines


def resume_path(resume: str, output_dir: Path) -> Path:
    return output_dir / "checkpoint_last.pth" if resume == "latest" else Path(resume)


def claim_run_folder(output_dir: Path, config: dict[str, Any], info: dist_utils.DistInfo) -> None:
    """Write ``config.yaml`` and remove temporary files a killed process left; called only once the run has
    everything it needs (a failed ``--resume`` leaves the folder as it was)."""
    if info.is_main:
        for stale in remove_stale_temporaries(output_dir):
            log.info("removed %s, left by an interrupted process", stale)
        write_text_atomic(dump_config(config), output_dir / "config.yaml")


def evaluated_weights(args: argparse.Namespace, config: dict[str, Any], model: nn.Module,
                      start_from: str | None) -> dict[str, Any]:
    """Load what ``--evaluate`` evaluates and describe it: the ``--checkpoint``, or without one the pretrained
    weights the config names (zero-shot). Parts that would be random are refused unless
    ``--allow_random_eval`` is given."""
    if start_from is not None:
        load_for_evaluation(model, start_from, config)
        log.info("evaluating checkpoint %s", start_from)
        return {"weights": "checkpoint", "checkpoint": start_from}
    files = model.pretrained_sources(config)
    random = untrained_parts(model, files)
    if random and not args.allow_random_eval:
        raise WeightsError(f"--evaluate without --checkpoint evaluates the pretrained weights {args.config} names "
                           f"(zero-shot), but these parts would be randomly initialised: {', '.join(random)}. Give "
                           f"--checkpoint PATH (a trained model), or --allow_random_eval to evaluate them as they are")
    model.load_pretrained({**config, "allow_random_init": list(files)} if random else config)
    kind = "pretrained with random parts (--allow_random_eval)" if random else "pretrained (zero-shot)"
    log.info("evaluating %s weights, no --checkpoint: %s%s", kind,
             ", ".join(f"{part} <- {path}" for part, path in files.items() if path) or "no files",
             f"; random: {', '.join(random)}" if random else "")
    return {"weights": kind, "checkpoint": None, "pretrained_files": {p: f for p, f in files.items() if f},
            "random_parts": random}


def evaluate_only(args: argparse.Namespace, config: dict[str, Any], device: torch.device, output_dir: Path,
                  info: dist_utils.DistInfo, start_from: str | None) -> dict[str, float]:
    problems = check_split_images(config, [args.split])
    model = build_model(config, pretrained=False).to(device)
    weights = evaluated_weights(args, config, model, start_from)
    split = create_eval_split(config, args.split, device, model.eval_transform, problems)
    claim_run_folder(output_dir, config, info)
    metrics, scores = evaluate_scores(model, split, config, device)
    if info.is_main and config["figures"]:
        write_split_figures(output_dir, split, scores, config, f"{weights['weights']} weights")
    if info.is_main:
        chance = chance_metrics(split.annotations.img2txt, len(split.annotations.texts))
        result = {"split": args.split, **weights, "rerank": config["rerank"],
                  **{k: metrics[k] for k in (*METRIC_KEYS, *SEG_KEYS) if k in metrics},
                  "chance_r_mean": chance["r_mean"], "n_images": len(split.annotations.image_paths),
                  "n_texts": len(split.annotations.texts), "eval_time_s": round(metrics["eval_time_s"], 3)}
        write_text_atomic(json.dumps(result, indent=2) + "\n", output_dir / "eval_results.json")
        segmentation = format_segmentation({args.split: metrics})
        log.info("%s weights on %s:\n%s%s", weights["weights"], args.split,
                 format_table({args.split: metrics, "chance": chance}),
                 f"\nsegmentation:\n{segmentation}" if segmentation else "")
    return metrics


def figure_folder(output_dir: Path) -> Path:
    folder = output_dir / "figures"
    folder.mkdir(exist_ok=True)
    return folder


def write_split_figures(output_dir: Path, split: EvalSplit, scores: tuple[torch.Tensor, torch.Tensor | None],
                        config: dict[str, Any], title: str) -> None:
    """Recall@K curves and the qualitative sheets of a split's scores, in ``output_dir/figures/``."""
    folder, annotations = figure_folder(output_dir), split.annotations
    sims, t2i_sims = scores
    i2t_ranks, t2i_ranks = retrieval_ranks(sims, annotations.img2txt, annotations.txt2img, t2i_sims=t2i_sims)
    plot_recall_curves(i2t_ranks, t2i_ranks, folder / f"{split.name}_recall_at_k.png", title=f"{split.name}, {title}")
    load = functools.partial(load_rgb, decoding=ImageDecoding.from_config(config["image_decode"]))
    plot_text_to_image(sims if t2i_sims is None else t2i_sims, annotations.texts, annotations.image_paths,
                       annotations.txt2img, load, folder / f"{split.name}_text_to_image.png", config["figure_queries"])
    plot_image_to_text(sims, annotations.texts, annotations.image_paths, annotations.img2txt, load,
                       folder / f"{split.name}_image_to_text.png", config["figure_queries"])


def resume_training(saved: dict[str, Any], path: Path, task: RetrievalTask, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, stages: StageSchedule,
                    info: dist_utils.DistInfo) -> TrainState:
    """Restore everything ``checkpoint_last.pth`` holds; a checkpoint that does not fit says so by name."""
    try:
        task.model.load_state_dict(saved["model"])
        task.objective.load_state_dict(saved["objective"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        stages.load_state_dict(saved["stage_schedule"])
        state = TrainState(**saved["train_state"])
        set_rng_state(saved["rng"][info.rank])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise ResumeError(f"cannot resume from {path}: it does not match this run ({type(err).__name__}: "
                          f"{err}); is it a checkpoint_last.pth of this config, with as many processes?") from err
    log.info("resumed from %s at epoch %d", path, state.epoch)
    return state


def check_finite_model(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, state: TrainState) -> None:
    """A model or optimizer state with NaN/inf is never evaluated, selected or saved."""
    moments = {f"optimizer state {i}.{k}": v for i, s in enumerate(optimizer.state.values())
               for k, v in s.items() if isinstance(v, torch.Tensor)}
    bad = non_finite_tensors(model.state_dict()) + non_finite_tensors(moments)
    if bad:
        kept = (f"checkpoint_last.pth keeps epoch {epoch - 1}, checkpoint_best.pth epoch {state.best_epoch}"
                if state.history else "no checkpoint was written")
        raise NonFiniteError(f"after epoch {epoch} {len(bad)} tensors hold NaN/inf ({', '.join(bad[:5])}"
                             f"{', ...' if len(bad) > 5 else ''}); nothing of this epoch is saved: {kept}")


def train(args: argparse.Namespace, config: dict[str, Any], device: torch.device, output_dir: Path,
          info: dist_utils.DistInfo, start_from: str | None) -> TrainState:
    """The epoch loop: train, evaluate, select on val, checkpoint; resumable at every epoch boundary."""
    saved = load_checkpoint(resume_path(args.resume, output_dir)) if args.resume else None
    problems = check_split_images(config, ("train", "val", "test"))
    model = build_model(config, pretrained=start_from is None and not args.resume).to(device)
    if start_from is not None:
        initialise_from_checkpoint(model, start_from, config)
    stages = StageSchedule(parse_stages(config), config["stage_patience"], config["schedular"]["epochs"])
    task = RetrievalTask(model, build_objective(config, stages.stages)).to(device)
    train_loader = create_train_loader(config, info, args.seed, device, transform=model.train_transform,
                                       text_processor=model.text_processor, fields=task.sample_fields,
                                       decode_problems=problems)
    optimizer = create_optimizer(config["optimizer"], model, task.objective)
    scheduler = create_scheduler(config["schedular"], optimizer, len(train_loader))
    scaler = grad_scaler(config["precision"], device)
    state = TrainState()
    if saved is not None:
        state = resume_training(saved, resume_path(args.resume, output_dir), task, optimizer, scheduler, scaler,
                                stages, info)
    splits: dict[str, EvalSplit] = {s: create_eval_split(config, s, device, model.eval_transform, problems)
                                    for s in ("val", "test")}
    claim_run_folder(output_dir, config, info)
    task.objective.prepare(train_loader.dataset.ann, output_dir)
    if saved is not None and info.is_main:  # drop log lines of an epoch that ran after the checkpoint
        complete = state.epoch == config["schedular"]["epochs"]
        write_log(output_dir, state.history, summary_lines(state, config) if complete else [])
    wrapped: nn.Module = task
    if info.distributed:
        # a loss that owns parameters (the affiliation temperature) and is off in some stage leaves them unused,
        # and so does a stage that reads no model output beyond the embeddings (the model's temperature)
        unused = (any(stages.varies(name) for name, loss in task.objective.losses.items() if any(loss.parameters()))
                  or task.objective.leaves_model_outputs_unread(stages.stages))
        wrapped = DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=unused)
    board = TensorBoard(output_dir / "tensorboard" if info.is_main else None, purge_step=state.epoch)
    epochs = config["schedular"]["epochs"]
    log.info("training %d epochs x %d steps, global batch %d, on %s x %d", epochs, len(train_loader),
             config["batch_size_train"] * info.world_size, device, info.world_size)
    averaged = paper_epochs(config)
    if averaged:
        log.info("protocol %s (SIRS's paper protocol): epochs %d-%d are evaluated on test and their mean is "
                 "reported beside the selected checkpoint's scores; checkpoint_best.pth is still chosen on %s",
                 PAPER_PROTOCOL, averaged[0], averaged[-1], config["select_on"])
    previous_stage = None
    for epoch in range(state.epoch, epochs):
        train_loader.sampler.set_epoch(epoch)
        stage = stages.stage_for_epoch(epoch)
        if stage is not previous_stage:
            log.info("epoch %d: %s", epoch, stage.describe())
            previous_stage = stage
        task.objective.set_stage(stage)
        record: dict[str, Any] = train_one_epoch(wrapped, train_loader, optimizer, scheduler, scaler, epoch, config,
                                                 device, state)
        check_finite_model(task, optimizer, epoch, state)
        record.update(stage=stages.index, stage_name=stage.name)
        evaluated = {"val": evaluate_split(model, splits["val"], config, device)}
        stages.observe(epoch, evaluated["val"]["r_mean"])
        test_scores = None
        if config["eval_test_every_epoch"] or config["select_on"] == "test" or epoch in averaged:
            evaluated["test"], test_scores = evaluate_scores(model, splits["test"], config, device)
        metric = evaluated[config["select_on"]]["r_mean"]
        improved = metric > state.best_metric
        if improved and "test" not in evaluated:  # the selected checkpoint always has its test score
            evaluated["test"], test_scores = evaluate_scores(model, splits["test"], config, device)
        for split_name, metrics in evaluated.items():
            record.update(metric_row(split_name, metrics))
        record["epoch"] = epoch
        state.history.append(record)
        state.epoch = epoch + 1
        if improved:
            state.best_metric, state.best_epoch = metric, epoch
        rngs = dist_utils.all_gather_object(rng_state())
        if info.is_main:
            if improved:
                save_atomic(model_state(model, task.objective, config, epoch, metric, config["select_on"]),
                            output_dir / "checkpoint_best.pth")
            last = model_state(model, task.objective, config, epoch, metric, config["select_on"])
            last.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict(), stage_schedule=stages.state_dict(), train_state=vars(state),
                        rng=rngs)
            save_atomic(last, output_dir / "checkpoint_last.pth")
            footer = summary_lines(state, config) if state.epoch == epochs else []
            write_log(output_dir, state.history, footer)
            board.scalars({k: float(v) for k, v in record.items() if k not in ("epoch", "stage_name")}, epoch)
            if config["figures"]:
                plot_training_curves({output_dir.name: state.history}, figure_folder(output_dir) / "training_curves.png")
                if improved:
                    write_split_figures(output_dir, splits["test"], test_scores, config, f"epoch {epoch} (selected)")
            log.info("epoch %d: val r_mean %.2f%s%s (best %.2f at epoch %d)", epoch, evaluated["val"]["r_mean"],
                     f", test r_mean {evaluated['test']['r_mean']:.2f}" if "test" in evaluated else "",
                     "".join(f", {split} mIoU {scores['seg_miou']:.2f}" for split, scores in evaluated.items()
                             if "seg_miou" in scores),
                     state.best_metric, state.best_epoch)
        dist_utils.barrier()
    board.close()
    if info.is_main and state.history:
        best = {r["epoch"]: r for r in state.history}[state.best_epoch]
        table = {f"val   @ best epoch {state.best_epoch}": split_scores(best, "val")}
        if "test_r_mean" in best:
            table[f"test  @ best epoch {state.best_epoch}"] = split_scores(best, "test")
        if averaged:
            table[label(entry_name(len(averaged)))] = mean_of_last_epochs(state.history, averaged)
        table["test  chance"] = chance_metrics(splits["test"].annotations.img2txt, len(splits["test"].annotations.texts))
        segmentation = format_segmentation(table)
        log.info("selected on %s r_mean; results:\n%s%s", config["select_on"], format_table(table),
                 f"\nsegmentation:\n{segmentation}" if segmentation else "")
    return state


def run(args: argparse.Namespace, config: dict[str, Any], output_dir: Path, device: torch.device,
        info: dist_utils.DistInfo) -> dict[str, Any]:
    if args.bs > 0:
        if args.bs % info.world_size:
            raise ValueError(f"--bs {args.bs} is not divisible by the {info.world_size} processes")
        config["batch_size_train"] = args.bs // info.world_size
    seed_everything(args.seed + info.rank)
    prepare_synthetic_data(config, info)
    start_from = None if args.checkpoint.strip().lower() in NO_CHECKPOINT else args.checkpoint
    if args.evaluate:
        return {"metrics": evaluate_only(args, config, device, output_dir, info, start_from)}
    return {"state": train(args, config, device, output_dir, info, start_from)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_run_arguments(build_parser(), argv)
    config = load_config(args.config, [*args.opts, *args.overrides])
    parse_stages(config, args.config)  # a bad stage list fails before any data or model is built
    check_rerank(config, args.config)
    check_protocol(config, args.config)
    if args.resume and args.evaluate:
        raise ValueError("--resume continues training; use --evaluate --checkpoint PATH to evaluate")
    info = dist_utils.world_info_from_env()
    device = resolve_device(args.device, info)
    info = dist_utils.init_distributed(device.type, args.dist_url)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(output_dir, info.is_main)
    try:
        return run(args, config, output_dir, device, info)
    except BaseException as err:
        log_failure(err)
        raise
    finally:
        dist_utils.cleanup()


if __name__ == "__main__":
    main()
