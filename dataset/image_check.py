"""Decode every image a run will read once, before it starts: a corrupt val or test file then stops the
run in seconds, with its path, instead of after the first training epoch."""
from __future__ import annotations

import logging
import multiprocessing
import time
from typing import Any, Iterable

from utils.distributed import all_gather_object, shard_range

from .annotations import read_json_list
from .images import ImageDecoding, decode_problem, resolve_image_path

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "train_file", "val": "val_file", "test": "test_file"}


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


def _problem(job: tuple[str, ImageDecoding]) -> tuple[str, str | None]:
    path, decoding = job
    return path, decode_problem(path, decoding)


def decode_problems(paths: list[str], decoding: ImageDecoding, workers: int,
                    report_every_s: float = 10.0) -> dict[str, str]:
    """``{path: problem}`` for the files of ``paths`` that do not decode, using ``workers`` processes
    (0 or 1: this process); logs a progress line at most every ``report_every_s`` seconds."""
    start = last = time.time()
    problems: dict[str, str] = {}
    jobs = [(path, decoding) for path in paths]
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(_problem, jobs, chunksize=16) if pool else map(_problem, jobs)
        for done, (path, problem) in enumerate(results, 1):
            if problem is not None:
                problems[path] = problem
            now = time.time()
            if now - last >= report_every_s and done < len(jobs):
                rate = done / (now - start)
                log.info("checking images: %d/%d (%.0f images/s, eta %.0f s)", done, len(jobs), rate,
                         (len(jobs) - done) / rate)
                last = now
    finally:
        if pool is not None:
            pool.terminate()
    return problems


def check_split_images(config: dict[str, Any], splits: Iterable[str]) -> dict[str, str]:
    """Decode every image of ``splits`` once, each process its share, and return the problems of all of them.

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
    return problems
