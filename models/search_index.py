"""A search index: one folder of image embeddings that a run extends, resumes and searches.

The folder holds
  * ``manifest.json``: the checkpoint (path, sha256, model), the tiling, the shards in row order, the
    FAISS index's kind and parameters, whether the last run finished (``complete``) and the files it could
    not decode (``problems``);
  * ``shard_NNNNNN.jsonl`` + ``shard_NNNNNN.npy``: the items (``dataset.scenes.Item`` records) and their
    float16 embeddings, at most ``shard_size`` rows each. Both are written atomically, the ``.npy`` last: a shard
    without its ``.npy`` was cut off by a kill and is ignored, so a rerun loses nothing already written;
  * ``faiss.index``: exact inner product (``flat``), HNSW or IVF over the L2-normalised embeddings, rows in
    shard order. A pairwise model (``scores_are_dot_products`` False) has none: a query scores every item
    with the model's ``similarity``.

A run keeps the rows whose file is still among its sources with the same size and modification time,
drops the others (removed or changed files), and embeds only the items not yet in the index. Under torchrun
each process embeds its share into shards of its own (numbers interleaved by rank) and rank 0 merges them.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dataset.images import ImageDecoding
from dataset.scenes import Item, ItemImages, collate_items, find_images, plan_file
from utils.checkpoint import remove_stale_temporaries, temporary_path, write_bytes_atomic, write_text_atomic
from utils.distributed import all_gather_object, barrier, get_rank, get_world_size, shard_range
from utils.weights import fingerprint

from .inference import Retriever, embed_image_batches, similarity_matrix

INDEX_VERSION = 1
MANIFEST, FAISS_FILE = "manifest.json", "faiss.index"
FAISS_KINDS = ("flat", "hnsw", "ivf")
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 128


class SearchIndexError(ValueError):
    """An index folder that cannot be used as asked; the message names the folder and what to do."""


@dataclass
class IndexOptions:
    tile: int = 256
    stride: int = 192
    batch_size: int = 64
    workers: int = 2
    shard_size: int = 4096
    faiss: str = "flat"
    precision: str = "fp32"
    image_decode: dict[str, Any] | None = None  # default: the checkpoint's image_decode section


@dataclass
class Shard:
    name: str
    items: list[Item]
    embeddings: np.ndarray  # float16 [rows, dim]


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_shards(folder: Path) -> list[Shard]:
    """The complete shards in name (= row) order; a ``.jsonl`` without its ``.npy`` is a cut-off write."""
    shards = []
    for array in sorted(folder.glob("shard_*.npy")):
        table = array.with_suffix(".jsonl")
        items = [Item.from_record(json.loads(line)) for line in table.read_text(encoding="utf-8").splitlines()]
        embeddings = np.load(array)
        if len(items) != embeddings.shape[0]:
            raise SearchIndexError(f"{table} has {len(items)} rows but {array} has {embeddings.shape[0]}: the "
                                   f"index is damaged; delete the folder and index again")
        shards.append(Shard(array.stem, items, embeddings))
    return shards


def write_shard(folder: Path, shard: Shard) -> None:
    write_text_atomic("".join(json.dumps(item.record()) + "\n" for item in shard.items),
                      folder / f"{shard.name}.jsonl")
    buffer = io.BytesIO()
    np.save(buffer, shard.embeddings.astype(np.float16))
    write_bytes_atomic(buffer.getvalue(), folder / f"{shard.name}.npy")  # last: the shard's commit


def build_faiss(vectors: np.ndarray, kind: str) -> tuple[Any, dict[str, int]]:
    """A FAISS index by inner product over L2-normalised float32 ``vectors``, and its parameters."""
    import faiss

    n, dim = vectors.shape
    if kind == "flat":
        index, params = faiss.IndexFlatIP(dim), {}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    elif kind == "ivf":
        nlist = max(1, min(n, round(4 * math.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        params = {"nlist": nlist, "nprobe": min(nlist, max(16, nlist // 16))}
    else:
        raise SearchIndexError(f"--faiss {kind!r} is not one of {list(FAISS_KINDS)}")
    index.add(vectors)
    return index, params


def tune(index: Any, kind: str, params: dict[str, int]) -> Any:
    """Search-time parameters, which FAISS does not keep in the file."""
    if kind == "hnsw":
        index.hnsw.efSearch = params["efSearch"]
    elif kind == "ivf":
        index.nprobe = params["nprobe"]
    return index


def normalised(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(F.normalize(torch.as_tensor(embeddings).float(), dim=-1).numpy())


class Progress:
    """``embedded N/M items, X images/s, ETA h:mm:ss`` on stderr: rewritten in place on a terminal, a line
    every ``every`` seconds otherwise."""

    def __init__(self, total: int, every: float = 10.0) -> None:
        self.total, self.every, self.start, self.shown = total, every, time.monotonic(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.tty and done < self.total and now - self.shown < self.every:
            return
        self.shown = now
        rate = done / max(now - self.start, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total - done) / rate)) if rate > 0 else "?"
        line = f"embedded {done}/{self.total} items, {rate:.1f} images/s, ETA {eta}"
        print("\r" + line if self.tty else line, end="" if self.tty and done < self.total else "\n",
              file=sys.stderr, flush=True)


def _checkpoint_identity(checkpoint: Path) -> dict[str, str]:
    text = fingerprint(checkpoint)
    return {"checkpoint": str(checkpoint.resolve()), "checkpoint_fingerprint": text,
            "checkpoint_sha256": text.rsplit("sha256 ", 1)[1].rstrip(")")}


def _check_compatible(folder: Path, manifest: dict[str, Any], wanted: dict[str, Any]) -> None:
    if manifest["checkpoint_sha256"] != wanted["checkpoint_sha256"]:
        raise SearchIndexError(f"index {folder} was made with checkpoint {manifest['checkpoint_fingerprint']}, not "
                               f"{wanted['checkpoint_fingerprint']}: embeddings of two models do not mix; index "
                               f"into a new folder")
    for key in ("tile", "stride"):
        if manifest[key] != wanted[key]:
            raise SearchIndexError(f"index {folder} was made with --{key} {manifest[key]}, not {wanted[key]}: "
                                   f"index into a new folder, or rerun with --{key} {manifest[key]}")
    if manifest["image_decode"] != wanted["image_decode"]:
        raise SearchIndexError(f"index {folder} was made with image_decode {manifest['image_decode']}, not "
                               f"{wanted['image_decode']}: index into a new folder, or rerun with the same "
                               f"--bands / --scale / --value_max / --percentiles")


def _keep_unchanged(folder: Path, stats: dict[str, os.stat_result]) -> tuple[list[Shard], int, int]:
    """The shards with the rows whose file is unchanged (same size and mtime), rewritten without the others;
    returns them and the numbers of rows kept and dropped."""
    shards, kept, dropped = [], 0, 0
    for shard in read_shards(folder):
        keep = [i for i, item in enumerate(shard.items) if item.path in stats
                and (item.size, item.mtime_ns) == (stats[item.path].st_size, stats[item.path].st_mtime_ns)]
        kept, dropped = kept + len(keep), dropped + len(shard.items) - len(keep)
        if len(keep) == len(shard.items):
            shards.append(shard)
            continue
        for suffix in (".npy", ".jsonl"):  # the .npy first: a half-dropped shard is ignored, never half-read
            (folder / f"{shard.name}{suffix}").unlink()
        if keep:
            shards.append(Shard(shard.name, [shard.items[i] for i in keep], shard.embeddings[keep]))
            write_shard(folder, shards[-1])
    return shards, kept, dropped


def _plan(files: list[str], done: set, options: IndexOptions,
          decoding: ImageDecoding) -> tuple[list[Item], list[dict[str, Any]]]:
    """The items of ``files`` not yet ``done`` (tiles of the scenes larger than the tile), and the files whose
    header, or a scene's samples for its percentile stretch, cannot be read."""
    pending, problems = [], []
    for path in files:
        try:
            pending.extend(item for item in plan_file(path, options.tile, options.stride, decoding)
                           if item.key not in done)
        except (OSError, ValueError) as err:  # rasterio's and Pillow's read errors; ImageDecodeError
            problems.append({"path": path, "window": None, "error": f"cannot read {path}: {err}"})
    return pending, problems


def _embed(folder: Path, pending: list[Item], first_number: int, retriever: Retriever, options: IndexOptions,
           decoding: ImageDecoding, log: Callable[[str], None], show_progress: bool) -> list[dict[str, Any]]:
    """Embed ``pending`` into shards of ``shard_size`` rows, written as they fill; returns the undecodable
    items. Under torchrun the ranks interleave their shard numbers (``first_number + k * world + rank``), so
    that every process writes its own files and a rerun resumes each process's finished shards."""
    rank, world = get_rank(), get_world_size()
    loader = torch.utils.data.DataLoader(ItemImages(pending, decoding, retriever.model.eval_transform),
                                         batch_size=options.batch_size, num_workers=options.workers,
                                         collate_fn=collate_items)
    buffer_items: list[Item] = []
    buffer_emb: list[np.ndarray] = []
    problems: list[dict[str, Any]] = []
    progress, seen, written = Progress(len(pending)) if show_progress else None, 0, 0

    def flush(count: int) -> None:
        """The first ``count`` buffered rows become this process's next shard."""
        nonlocal written, buffer_items, buffer_emb
        emb = np.concatenate(buffer_emb)
        write_shard(folder, Shard(f"shard_{first_number + written * world + rank:06d}", buffer_items[:count],
                                  emb[:count].astype(np.float16)))
        written, buffer_items, buffer_emb = written + 1, buffer_items[count:], [emb[count:]]

    for positions, images, failures in loader:
        for position, message in failures:
            log(f"skipped: {message}")
            item = pending[position]
            problems.append({"path": item.path, "window": None if item.window is None else list(item.window),
                             "error": message})
        if images is not None:
            buffer_items.extend(pending[p] for p in positions)
            buffer_emb.append(embed_image_batches(retriever.model, [images], retriever.device,
                                                  options.precision).cpu().numpy())
            while len(buffer_items) >= options.shard_size:
                flush(options.shard_size)
        seen += len(positions) + len(failures)
        if progress is not None:
            progress.update(seen)
    if buffer_items:
        flush(len(buffer_items))
    return problems


def update_index(folder: str | Path, checkpoint: str | Path, sources: Sequence[str], retriever: Retriever,
                 options: IndexOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Bring the index in ``folder`` up to date with the images in ``sources``; returns the run's counts
    (``files``, ``kept``, ``dropped``, ``embedded``, ``items``) and ``problems``.

    Under torchrun (the process group initialised) every process calls this with the same arguments: rank 0
    keeps or drops the existing rows, each process embeds its contiguous share of the new items into its own
    shards, and rank 0 merges them into the manifest and the FAISS index."""
    folder, checkpoint = Path(folder), Path(checkpoint)
    main_process = get_rank() == 0
    main_log: Callable[[str], None] = log if main_process else (lambda line: None)
    image_decode = retriever.config["image_decode"] if options.image_decode is None else options.image_decode
    decoding = ImageDecoding.from_config(image_decode)
    manifest = {"version": INDEX_VERSION, **_checkpoint_identity(checkpoint), "model": retriever.config["model"],
                "scores_are_dot_products": retriever.model.scores_are_dot_products, "tile": options.tile,
                "stride": options.stride, "image_decode": image_decode, "precision": options.precision}
    previous = read_manifest(folder)
    if previous is not None:
        _check_compatible(folder, previous, manifest)  # every process: all of them stop with the same error

    files = find_images(sources)
    stats = {path: os.stat(path) for path in files}
    kept = dropped = 0
    if main_process:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        _, kept, dropped = _keep_unchanged(folder, stats)
        write_text_atomic(json.dumps({**manifest, "complete": False}, indent=1), folder / MANIFEST)
    barrier()  # the other processes read the shards rank 0 has settled
    shards = read_shards(folder)
    pending, problems = _plan(files, {item.key for shard in shards for item in shard.items}, options, decoding)
    main_log(f"index {folder}: {len(files)} files; {kept} items kept, {dropped} dropped (removed or changed "
             f"files), {len(pending)} to embed" + (f" by {get_world_size()} processes" if get_world_size() > 1 else ""))
    first_number = 1 + max((int(s.name.split("_")[1]) for s in shards), default=-1)
    span = shard_range(len(pending))
    failures = _embed(folder, pending[span.start:span.stop], first_number, retriever, options, decoding, log,
                      show_progress=main_process)
    problems += [p for rank_failures in all_gather_object(failures) for p in rank_failures]

    summary: dict[str, Any] = {}
    if main_process:
        shards = read_shards(folder)
        summary = _finish(folder, manifest, shards, len(files), kept, dropped, problems, options, main_log)
    return all_gather_object(summary)[0]


def _finish(folder: Path, manifest: dict[str, Any], shards: list[Shard], files: int, kept: int, dropped: int,
            problems: list[dict[str, Any]], options: IndexOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """The FAISS index over every shard and the finished manifest (the run's commit); the run's summary."""
    total = sum(len(s.items) for s in shards)
    faiss_info = None
    if manifest["scores_are_dot_products"] and total:
        import faiss

        index, params = build_faiss(normalised(np.concatenate([s.embeddings for s in shards])), options.faiss)
        tmp = temporary_path(folder / FAISS_FILE)
        faiss.write_index(index, str(tmp))
        os.replace(tmp, folder / FAISS_FILE)
        faiss_info = {"kind": options.faiss, **params}
    else:
        (folder / FAISS_FILE).unlink(missing_ok=True)
    embedded = total - kept
    write_text_atomic(json.dumps({**manifest, "complete": True, "items": total, "files": files,
                                  "shards": [s.name for s in shards], "faiss": faiss_info, "problems": problems},
                                 indent=1), folder / MANIFEST)
    log(f"index {folder}: {total} items ({embedded} embedded now), {len(problems)} problem(s)"
        + (f", FAISS {options.faiss} {faiss_info}" if faiss_info else ", no FAISS (pairwise model)"))
    return {"files": files, "kept": kept, "dropped": dropped, "embedded": embedded, "items": total,
            "problems": problems}


@dataclass
class LoadedIndex:
    folder: Path
    manifest: dict[str, Any]
    items: list[Item]
    embeddings: torch.Tensor  # float32 [items, dim], as the model gave them (through float16)
    faiss: Any | None

    @property
    def decoding(self) -> ImageDecoding:
        """How the index's images were decoded: query images, thumbnails and full-size items likewise."""
        return ImageDecoding.from_config(self.manifest["image_decode"])


def load_index(folder: str | Path) -> LoadedIndex:
    """A finished index, ready to query; an unfinished one (a run was interrupted) is an error saying so."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise SearchIndexError(f"{folder} is not a search index (no {MANIFEST}); make one with: "
                               f"python tools/search.py index --index {folder} ...")
    if not manifest["complete"]:
        raise SearchIndexError(f"index {folder} is incomplete (its last run was interrupted): rerun the same "
                               f"index command to finish it")
    shards = read_shards(folder)
    if [s.name for s in shards] != manifest["shards"]:
        raise SearchIndexError(f"index {folder}: its shards {[s.name for s in shards]} are not those its manifest "
                               f"lists ({manifest['shards']}); rerun the index command")
    items = [item for s in shards for item in s.items]
    embeddings = torch.from_numpy(np.concatenate([s.embeddings for s in shards])).float() if shards else torch.empty(0)
    index = None
    if manifest["faiss"]:
        import faiss

        params = {k: v for k, v in manifest["faiss"].items() if k != "kind"}
        index = tune(faiss.read_index(str(folder / FAISS_FILE)), manifest["faiss"]["kind"], params)
    return LoadedIndex(folder, manifest, items, embeddings, index)


def check_retriever(index: LoadedIndex, checkpoint: Path) -> None:
    if fingerprint(checkpoint).rsplit("sha256 ", 1)[1].rstrip(")") != index.manifest["checkpoint_sha256"]:
        raise SearchIndexError(f"checkpoint {checkpoint} is not the one index {index.folder} was made with "
                               f"({index.manifest['checkpoint_fingerprint']})")


def search(index: LoadedIndex, retriever: Retriever, queries: torch.Tensor, top: int,
           by_text: bool = True) -> list[list[tuple[float, int]]]:
    """The ``top`` (score, row) pairs of each query embedding, best first. A dot-product model searches the
    FAISS index (score: cosine); a pairwise model scores every item with its ``similarity`` for a text
    query. An image query of a pairwise model ranks by the cosine of the image embeddings."""
    top = min(top, len(index.items))
    if top == 0:
        return [[] for _ in range(len(queries))]
    if index.faiss is not None:
        scores, rows = index.faiss.search(normalised(queries), top)
        return [[(float(s), int(r)) for s, r in zip(srow, rrow) if r >= 0] for srow, rrow in zip(scores, rows)]
    if by_text:
        scores = similarity_matrix(retriever.model, index.embeddings.to(retriever.device),
                                   queries.to(retriever.device)).t().cpu()
    else:
        scores = torch.from_numpy(normalised(queries)) @ torch.from_numpy(normalised(index.embeddings)).t()
    values, rows = scores.topk(top, dim=1)
    return [[(float(s), int(r)) for s, r in zip(vrow, rrow)] for vrow, rrow in zip(values.tolist(), rows.tolist())]


def ranked(index: LoadedIndex, found: list[tuple[float, int]]) -> list[dict[str, Any]]:
    """The records of one query's hits, best first, as ``query --json`` and the web API give them: rank,
    score and the item's path, window, CRS and bounds."""
    return [{"rank": rank, "score": score, **index.items[row].describe()} for rank, (score, row) in enumerate(found, 1)]
