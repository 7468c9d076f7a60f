"""Training and evaluation worker (X-VLM's ``Retrieval.py``): one process, or one of several under torchrun.

    python Retrieval.py --config configs/demo.yaml --output_dir output/demo [key.sub=value ...]
    python Retrieval.py --config C --output_dir O --evaluate --checkpoint O/checkpoint_best.pth

Each epoch trains, evaluates val (and test), keeps ``checkpoint_best.pth`` by val ``r_mean`` and writes
``checkpoint_last.pth`` with everything ``--resume`` needs to continue as if never stopped.
"""
from __future__ import annotations

import argparse
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
from dataset import EvalSplit, create_eval_split, create_train_loader, prepare_synthetic_data
from dataset.tokenizer import build_tokenizer
from models import build_model
from models.loading import initialise_from_checkpoint, load_for_evaluation
from models.objective import build_objective
from models.task import RetrievalTask
from optim import create_optimizer
from scheduler import StageSchedule, create_scheduler, parse_stages
from utils.cli import add_run_arguments
from utils.checkpoint import (CHECKPOINT_VERSION, load_checkpoint, rng_state, save_atomic, set_rng_state,
                              write_text_atomic)
from utils.config import dump_config, load_config
from utils.evaluation import evaluate_split
from utils.logger import Progress, TensorBoard, max_memory_mb, setup_logging
from utils.metrics import METRIC_KEYS, chance_metrics
from utils.precision import autocast, grad_scaler

log = logging.getLogger("retrieval")
NO_CHECKPOINT = ("", "-1", "none")


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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def metric_row(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """X-VLM's log keys with 2-decimal rounding (``val_txt_r1`` ... ``val_r_mean``)."""
    return {f"{prefix}_{k}": round(metrics[k], 2) for k in METRIC_KEYS}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """The R@K table printed at the end of a run or an evaluation."""
    head = f"{'':<22}| {'i2t R@1':>7} {'R@5':>6} {'R@10':>6} | {'t2i R@1':>7} {'R@5':>6} {'R@10':>6} | {'mR':>6}"
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:<22}| {m['txt_r1']:7.2f} {m['txt_r5']:6.2f} {m['txt_r10']:6.2f} | "
                     f"{m['img_r1']:7.2f} {m['img_r5']:6.2f} {m['img_r10']:6.2f} | {m['r_mean']:6.2f}")
    return "\n".join(lines)


def train_one_epoch(task: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, epoch: int,
                    config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One pass over the loader; returns X-VLM's ``train_*`` strings plus time, throughput and memory."""
    task.train()
    global_batch = config["batch_size_train"] * dist_utils.get_world_size()
    progress = Progress(f"Train Epoch: [{epoch}]", len(loader), config["print_freq"], global_batch, device)
    sums: dict[str, torch.Tensor] = {}
    lr_sum = 0.0
    for step, batch in enumerate(loader):
        progress.data_loaded()
        batch = to_device(batch, device)
        with autocast(config["precision"], device):
            losses = task(batch, epoch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        if config["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(task.parameters(), config["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        lr_sum += optimizer.param_groups[0]["lr"]
        scheduler.step()
        for name, value in losses.items():
            if name != "loss":
                sums[name] = sums.get(name, torch.zeros((), device=device)) + value.detach().float()
        if step % config["print_freq"] == 0 or step + 1 == len(loader):
            means = {k: dist_utils.all_reduce_mean(v).item() / (step + 1) for k, v in sums.items()}
            progress.step(step, {"lr": optimizer.param_groups[0]["lr"], **means})
        else:
            progress.step(step, {})
    steps = len(loader)
    stats: dict[str, Any] = {"train_lr": f"{lr_sum / steps:.5f}"}
    stats.update({f"train_{k}": f"{dist_utils.all_reduce_mean(v).item() / steps:.5f}" for k, v in sums.items()})
    stats.update({"train_time_s": round(progress.elapsed, 2),
                  "samples_per_s": round(steps * global_batch / progress.elapsed, 1),
                  "max_mem_mb": round(max_memory_mb(device), 1)})
    return stats


def model_state(model: nn.Module, config: dict[str, Any], epoch: int, metric: float, selected_on: str) -> dict[str, Any]:
    """The released-checkpoint layout (``model`` + ``config``) plus provenance; PIR/FISVL loaders accept it."""
    return {"model": model.state_dict(), "config": config, "epoch": epoch, "metric": metric,
            "selected_on": selected_on, "version": CHECKPOINT_VERSION}


def write_log(output_dir: Path, history: list[dict[str, Any]], footer: list[str] = ()) -> None:
    """``log.txt``: one JSON line per finished epoch (rewritten whole, so a resume never duplicates a line)."""
    lines = [json.dumps(record) for record in history] + list(footer)
    write_text_atomic("".join(line + "\n" for line in lines), output_dir / "log.txt")


def summary_lines(state: TrainState, config: dict[str, Any]) -> list[str]:
    """The closing JSON line: test at the selected epoch, at the last epoch, and best-on-test for comparison."""
    by_epoch = {r["epoch"]: r for r in state.history}
    selected = config["select_on"]
    test_epochs = [r for r in state.history if "test_r_mean" in r]
    summary: dict[str, Any] = {"best_epoch": state.best_epoch, "selected_on": selected,
                               f"{selected}_r_mean_at_best": state.best_metric}
    if "test_r_mean" in by_epoch.get(state.best_epoch, {}):
        summary["test_at_best"] = {k: by_epoch[state.best_epoch][f"test_{k}"] for k in METRIC_KEYS}
    last = state.history[-1]
    if "test_r_mean" in last:
        summary["test_at_last"] = {k: last[f"test_{k}"] for k in METRIC_KEYS} | {"epoch": last["epoch"]}
    if test_epochs:
        oracle = max(test_epochs, key=lambda r: r["test_r_mean"])
        summary["best_on_test_epoch_for_comparison_only"] = oracle["epoch"]
        summary["test_r_mean_best_on_test"] = oracle["test_r_mean"]
    lines = [json.dumps(summary)]
    if config["legacy_log_footer"]:
        lines.append(f"best epoch: {state.best_epoch}")
    return lines


def resume_path(resume: str, output_dir: Path) -> Path:
    return output_dir / "checkpoint_last.pth" if resume == "latest" else Path(resume)


def evaluate_only(args: argparse.Namespace, config: dict[str, Any], model: nn.Module, tokenizer: Any,
                  device: torch.device, output_dir: Path, info: dist_utils.DistInfo) -> dict[str, float]:
    split = create_eval_split(config, args.split, device)
    metrics = evaluate_split(model, split, tokenizer, config, device)
    if info.is_main:
        chance = chance_metrics(split.annotations.img2txt, len(split.annotations.texts))
        result = {"split": args.split, "checkpoint": args.checkpoint, **{k: metrics[k] for k in METRIC_KEYS},
                  "chance_r_mean": chance["r_mean"], "n_images": len(split.annotations.image_paths),
                  "n_texts": len(split.annotations.texts), "eval_time_s": round(metrics["eval_time_s"], 3)}
        write_text_atomic(json.dumps(result, indent=2) + "\n", output_dir / "eval_results.json")
        log.info("\n%s", format_table({args.split: metrics, "chance": chance}))
    return metrics


def train(args: argparse.Namespace, config: dict[str, Any], model: nn.Module, tokenizer: Any,
          device: torch.device, output_dir: Path, info: dist_utils.DistInfo) -> TrainState:
    """The epoch loop: train, evaluate, select on val, checkpoint; resumable at every epoch boundary."""
    task = RetrievalTask(model, build_objective(config)).to(device)
    train_loader = create_train_loader(config, tokenizer, info, args.seed, device)
    optimizer = create_optimizer(config["optimizer"], model)
    scheduler = create_scheduler(config["schedular"], optimizer, len(train_loader))
    scaler = grad_scaler(config["precision"], device)
    stages = StageSchedule(parse_stages(config), config["stage_patience"], config["schedular"]["epochs"])
    state = TrainState()
    if args.resume:
        path = resume_path(args.resume, output_dir)
        saved = load_checkpoint(path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        stages.load_state_dict(saved["stage_schedule"])
        state = TrainState(**saved["train_state"])
        set_rng_state(saved["rng"][info.rank])
        log.info("resumed from %s at epoch %d", path, state.epoch)
        if info.is_main:  # drop log lines of an epoch that ran after the checkpoint
            complete = state.epoch == config["schedular"]["epochs"]
            write_log(output_dir, state.history, summary_lines(state, config) if complete else [])
    wrapped: nn.Module = task
    if info.distributed:
        wrapped = DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=stages.varies("affil"))  # owns temp2
    splits: dict[str, EvalSplit] = {s: create_eval_split(config, s, device) for s in ("val", "test")}
    board = TensorBoard(output_dir / "tensorboard" if info.is_main else None, purge_step=state.epoch)
    epochs = config["schedular"]["epochs"]
    log.info("training %d epochs x %d steps, global batch %d, on %s x %d", epochs, len(train_loader),
             config["batch_size_train"] * info.world_size, device, info.world_size)
    previous_stage = None
    for epoch in range(state.epoch, epochs):
        train_loader.sampler.set_epoch(epoch)
        stage = stages.stage_for_epoch(epoch)
        if stage is not previous_stage:
            log.info("epoch %d: %s", epoch, stage.describe())
            previous_stage = stage
        task.objective.set_stage(stage)
        record: dict[str, Any] = train_one_epoch(wrapped, train_loader, optimizer, scheduler, scaler, epoch, config,
                                                 device)
        record.update(stage=stages.index, stage_name=stage.name)
        evaluated = {"val": evaluate_split(model, splits["val"], tokenizer, config, device)}
        stages.observe(epoch, evaluated["val"]["r_mean"])
        if config["eval_test_every_epoch"] or config["select_on"] == "test":
            evaluated["test"] = evaluate_split(model, splits["test"], tokenizer, config, device)
        metric = evaluated[config["select_on"]]["r_mean"]
        improved = metric > state.best_metric
        if improved and "test" not in evaluated:  # the selected checkpoint always has its test score
            evaluated["test"] = evaluate_split(model, splits["test"], tokenizer, config, device)
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
                save_atomic(model_state(model, config, epoch, metric, config["select_on"]),
                            output_dir / "checkpoint_best.pth")
            last = model_state(model, config, epoch, metric, config["select_on"])
            last.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict(), stage_schedule=stages.state_dict(), train_state=vars(state),
                        rng=rngs)
            save_atomic(last, output_dir / "checkpoint_last.pth")
            footer = summary_lines(state, config) if state.epoch == epochs else []
            write_log(output_dir, state.history, footer)
            board.scalars({k: float(v) for k, v in record.items() if k not in ("epoch", "stage_name")}, epoch)
            log.info("epoch %d: val r_mean %.2f%s (best %.2f at epoch %d)", epoch, evaluated["val"]["r_mean"],
                     f", test r_mean {evaluated['test']['r_mean']:.2f}" if "test" in evaluated else "",
                     state.best_metric, state.best_epoch)
        dist_utils.barrier()
    board.close()
    if info.is_main and state.history:
        best = {r["epoch"]: r for r in state.history}[state.best_epoch]
        table = {f"val   @ best epoch {state.best_epoch}": {k: best[f"val_{k}"] for k in METRIC_KEYS}}
        if "test_r_mean" in best:
            table[f"test  @ best epoch {state.best_epoch}"] = {k: best[f"test_{k}"] for k in METRIC_KEYS}
        table["test  chance"] = chance_metrics(splits["test"].annotations.img2txt, len(splits["test"].annotations.texts))
        log.info("selected on %s r_mean; results:\n%s", config["select_on"], format_table(table))
    return state


def check_vocabulary(tokenizer: Any, model: nn.Module, config: dict[str, Any]) -> None:
    """Token ids must fit the text encoder's embedding table."""
    size = model.text_encoder.config.vocab_size
    if tokenizer.vocab_size > size:
        raise ValueError(f"{config['text_encoder']}/vocab.txt has {tokenizer.vocab_size} tokens but "
                         f"{config['text_config']} sets vocab_size {size}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    config = load_config(args.config, [*args.opts, *args.overrides])
    parse_stages(config, args.config)  # a bad stage list fails before any data or model is built
    info = dist_utils.world_info_from_env()
    device = resolve_device(args.device, info)
    info = dist_utils.init_distributed(device.type, args.dist_url)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(output_dir, info.is_main)
    if args.bs > 0:
        if args.bs % info.world_size:
            raise ValueError(f"--bs {args.bs} is not divisible by the {info.world_size} processes")
        config["batch_size_train"] = args.bs // info.world_size
    if info.is_main:
        write_text_atomic(dump_config(config), output_dir / "config.yaml")
    if args.resume and args.evaluate:
        raise ValueError("--resume continues training; use --evaluate --checkpoint PATH to evaluate")
    seed_everything(args.seed + info.rank)
    prepare_synthetic_data(config, info)
    tokenizer = build_tokenizer(config["text_encoder"])
    start_from = None if args.checkpoint.strip().lower() in NO_CHECKPOINT else args.checkpoint
    model = build_model(config, pretrained=start_from is None and not args.resume).to(device)
    check_vocabulary(tokenizer, model, config)
    if start_from is not None:
        (load_for_evaluation if args.evaluate else initialise_from_checkpoint)(model, start_from, config)
    try:
        if args.evaluate:
            return {"metrics": evaluate_only(args, config, model, tokenizer, device, output_dir, info)}
        return {"state": train(args, config, model, tokenizer, device, output_dir, info)}
    finally:
        dist_utils.cleanup()


if __name__ == "__main__":
    main()
