"""Decode every image (and segmentation mask) a run will read once, before it starts: a corrupt val or test
file then stops the run in seconds, with its path, instead of after the first training epoch."""
from __future__ import annotations

import logging
import multiprocessing
import time
from typing import Any, Callable, Iterable, TypeVar

from utils.distributed import all_gather_object, shard_range

from .annotations import read_json_list
from .images import ImageDecoding, decode_problem, resolve_image_path
from .masks import mask_problem, resolve_mask_path

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "train_file", "val": "val_file", "test": "test_file"}
Job = TypeVar("Job")


def image_paths(files: Iterable[str], image_root: str) -> list[str]:
    """The existing image files that the entries of ``files`` name, each once, in order of appearance.
    Malformed entries and missing files are left to the annotation loader, which reports them in full."""
    seen: dict[str, None] = {}
    for file in files:
        for entry in read_json_list(file):
            image = entry.get("image") if isinstance(entry, dict) else None
            path = resolve_image_path(image_root, image) if isinstance(image, str) else None
            if path is not None:
                seen.setdefault(path, None)
    return list(seen)


def mask_pairs(files: Iterable[str], image_root: str, mask_root: str) -> list[tuple[str, str]]:
    """(mask, image) paths of the entries of ``files`` whose image and mask both exist, each once; the
    annotation loader reports the others."""
    seen: dict[tuple[str, str], None] = {}
    for file in files:
        for entry in read_json_list(file):
            image = entry.get("image") if isinstance(entry, dict) else None
            mask = entry.get("mask") if isinstance(entry, dict) else None
            if not isinstance(image, str) or not isinstance(mask, (str, type(None))):
                continue
            image_path = resolve_image_path(image_root, image)
            mask_path = resolve_mask_path(mask_root, image, mask)
            if image_path is not None and mask_path is not None:
                seen.setdefault((mask_path, image_path), None)
    return list(seen)


def _image_job(job: tuple[str, ImageDecoding]) -> tuple[str, str | None]:
    path, decoding = job
    return path, decode_problem(path, decoding)


def _mask_job(job: tuple[str, str]) -> tuple[str, str | None]:
    path, image_path = job
    return path, mask_problem(path, image_path)


def _problems(check: Callable[[Job], tuple[str, str | None]], jobs: list[Job], workers: int, noun: str,
              report_every_s: float) -> dict[str, str]:
    """``{path: problem}`` of the ``jobs`` that ``check`` finds a problem with, in ``workers`` processes
    (0 or 1: this process); logs a progress line at most every ``report_every_s`` seconds."""
    start = last = time.time()
    problems: dict[str, str] = {}
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(check, jobs, chunksize=16) if pool else map(check, jobs)
        for done, (path, problem) in enumerate(results, 1):
            if problem is not None:
                problems[path] = problem
            now = time.time()
            if now - last >= report_every_s and done < len(jobs):
                rate = done / (now - start)
                log.info("checking %s: %d/%d (%.0f %s/s, eta %.0f s)", noun, done, len(jobs), rate, noun,
                         (len(jobs) - done) / rate)
                last = now
    finally:
        if pool is not None:
            pool.terminate()
    return problems


def decode_problems(paths: list[str], decoding: ImageDecoding, workers: int,
                    report_every_s: float = 10.0) -> dict[str, str]:
    """``{path: problem}`` for the files of ``paths`` that do not decode, using ``workers`` processes
    (0 or 1: this process); logs a progress line at most every ``report_every_s`` seconds."""
    return _problems(_image_job, [(path, decoding) for path in paths], workers, "images", report_every_s)


def mask_problems(pairs: list[tuple[str, str]], workers: int, report_every_s: float = 10.0) -> dict[str, str]:
    """``{mask path: problem}`` for the (mask, image) ``pairs`` whose mask is unusable for its image
    (:func:`dataset.masks.mask_problem`), as :func:`decode_problems` checks images."""
    return _problems(_mask_job, pairs, workers, "masks", report_every_s)


def check_split_images(config: dict[str, Any], splits: Iterable[str]) -> dict[str, str]:
    """Decode every image of ``splits`` once, and with ``mask_root`` every mask, each process its share, and
    return the problems of all of them (keyed by the image's or the mask's path).

    Runs when ``check_images`` or ``skip_bad_samples`` is on (the latter needs to know what to skip); else
    returns no problems and a bad file fails when it is first read.
    """
    if not (config["check_images"] or config["skip_bad_samples"]):
        return {}
    splits = list(splits)
    files = [f for split in splits for f in (config[SPLIT_FILES[split]] if split == "train"
                                             else [config[SPLIT_FILES[split]]])]
    paths = image_paths(files, config["image_root"])
    share = shard_range(len(paths))
    mine = paths[share.start:share.stop]
    start = time.time()
    decoding = ImageDecoding.from_config(config["image_decode"])
    found = decode_problems(mine, decoding, config["num_workers"])
    problems = {path: problem for part in all_gather_object(found) for path, problem in part.items()}
    log.info("checked %d images of %s in %.1f s: %d do not decode", len(paths), "/".join(splits),
             time.time() - start, len(problems))
    if config["mask_root"] is not None:
        pairs = mask_pairs(files, config["image_root"], config["mask_root"])
        share, start = shard_range(len(pairs)), time.time()
        found = mask_problems(pairs[share.start:share.stop], config["num_workers"])
        bad = {path: problem for part in all_gather_object(found) for path, problem in part.items()}
        log.info("checked %d masks of %s in %.1f s: %d are unusable", len(pairs), "/".join(splits),
                 time.time() - start, len(bad))
        problems.update(bad)
    return problems
