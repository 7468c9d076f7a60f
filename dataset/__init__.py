"""Data: annotation reading and checks, image, mask and text pipelines, loaders for training and evaluation."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.utils.data import DataLoader

from utils.distributed import DistInfo, barrier, shard_range

from .annotations import DataError, EvalAnnotations, load_eval_annotations, load_train_annotations
from .image_check import check_split_images
from .images import ImageDecoding
from .masks import mask_class_weights
from .re_dataset import EvalImageDataset, RetrievalTrainDataset, TrainCollator
from .samplers import SeededShardSampler

log = logging.getLogger(__name__)

__all__ = ["DataError", "EvalSplit", "check_split_images", "create_eval_split", "create_train_loader",
           "mask_class_weights", "prepare_synthetic_data"]


@dataclass
class EvalSplit:
    """A val/test split: all its annotations, and a loader over this process's shard of its images. Its
    batches are ``(images, indices)``, or ``(images, indices, masks)`` (LongTensor [B, H, W], 255 = ignore)
    when ``mask_root`` is set; ``annotations.mask_paths`` names the mask files."""

    name: str
    annotations: EvalAnnotations
    image_loader: DataLoader


def prepare_synthetic_data(config: dict[str, Any], info: DistInfo) -> None:
    """Generate the procedural demo dataset when the config asks for it (rank 0 writes, the others wait)."""
    spec = config["synthetic_data"]
    if not spec:
        return
    if info.is_main:
        from .synthetic import DemoSpec, ensure_demo_dataset

        root = ensure_demo_dataset(spec["root"], DemoSpec(**{k: v for k, v in spec.items() if k != "root"}))
        log.info("demo dataset ready in %s", root)
    barrier()


def _loader_options(config: dict[str, Any], device: torch.device, seed: int) -> dict[str, Any]:
    """Worker settings, and a generator of the loader's own: a loader otherwise draws its workers' base seed
    from the global generator each time an iterator starts, and persistent workers start one only in the
    first epoch a process runs, so a resumed run's global random stream (dropout) would differ."""
    workers = config["num_workers"]
    return {"num_workers": workers, "pin_memory": config["pin_memory"] and device.type == "cuda",
            "persistent_workers": config["persistent_workers"] and workers > 0,
            "generator": torch.Generator().manual_seed(seed)}


def create_train_loader(config: dict[str, Any], info: DistInfo, seed: int, device: torch.device, *,
                        transform: Callable, text_processor: Callable, fields: Iterable[str] = ("image_idx",),
                        decode_problems: Mapping[str, str] | None = None) -> DataLoader:
    """Loader of this process's share of each epoch; call ``loader.sampler.set_epoch(e)`` before epoch e.

    ``transform`` and ``text_processor`` are the model's; ``fields`` the per-sample fields the model and the
    losses declared (``mask`` batches as a LongTensor [B, H, W], 255 = ignore, aligned with ``images``);
    ``decode_problems`` the results of :func:`check_split_images`.
    """
    fields = tuple(fields)
    ann = load_train_annotations(config["train_file"], config["image_root"], config["max_words"],
                                 config["skip_bad_samples"], config["caption_weight"], decode_problems,
                                 config["mask_root"])
    if ann.skipped:
        log.warning("train: skipped %d entries with missing or unreadable images or masks", ann.skipped)
    if ann.mask_paths is not None:
        log.info("train: segmentation masks from %s (%s)", config["mask_root"],
                 "read with the images" if "mask" in fields else "no model or loss reads them")
    log.info("train: %d captions of %d images, %d scene labels", len(ann.captions), len(set(ann.image_index)),
             len(set(ann.labels)))
    log.info("train: caption weights from %s", ann.weight_source)
    steps = getattr(transform, "transforms", [transform])
    log.info("train: image transform %s; word deletion rate %g", " -> ".join(type(t).__name__ for t in steps),
             config["deletion_rate"])
    dataset = RetrievalTrainDataset(ann, transform, config["deletion_rate"],
                                    ImageDecoding.from_config(config["image_decode"]), fields)
    sampler = SeededShardSampler(len(dataset), seed, info.rank, info.world_size)
    if len(sampler) < config["batch_size_train"]:
        raise DataError(f"batch_size_train {config['batch_size_train']} exceeds the {len(sampler)} training "
                        f"captions each process gets")
    return DataLoader(dataset, batch_size=config["batch_size_train"], sampler=sampler, drop_last=True,
                      collate_fn=TrainCollator(text_processor), **_loader_options(config, device, seed + info.rank))


def create_eval_split(config: dict[str, Any], split: str, device: torch.device, transform: Callable,
                      decode_problems: Mapping[str, str] | None = None) -> EvalSplit:
    """Annotations of ``val`` or ``test`` and a loader over this process's contiguous shard of images,
    transformed by the model's ``transform``."""
    ann = load_eval_annotations(config[f"{split}_file"], config["image_root"], config["max_words"],
                                config["skip_bad_samples"], decode_problems, config["mask_root"])
    if ann.skipped:
        log.warning("%s: skipped %d images that are missing or unreadable, or whose masks are (with their "
                    "captions)", split, ann.skipped)
    shard = EvalImageDataset(ann, transform, shard_range(len(ann.image_paths)),
                             ImageDecoding.from_config(config["image_decode"]))
    options = _loader_options(config, device, seed=0)
    options["persistent_workers"] = False
    loader = DataLoader(shard, batch_size=config["batch_size_test"], shuffle=False, **options)
    return EvalSplit(split, ann, loader)
