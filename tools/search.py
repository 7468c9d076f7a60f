"""Search your own imagery with a trained checkpoint: index folders and scenes, then query by text or image.

    python tools/search.py index --checkpoint output/demo/checkpoint_best.pth --images photos/ scenes/*.tif \\
        --index my_index [--tile 256 --stride 192] [--faiss flat|hnsw|ivf]
    torchrun --nproc_per_node 8 tools/search.py index ... --device cuda   # a shard per process, one index
    python tools/search.py query --index my_index "storage tanks beside a river" [--queries FILE]
        [--image PATH] [--top 20] [--json] [--out DIR]
    python tools/search.py serve --index my_index [--host 127.0.0.1] [--port 8000] [--top 20]

``index`` embeds every image Pillow reads under the given folders (recursively) or globs, and cuts
GeoTIFF / JPEG2000 scenes larger than --tile into overlapping tiles; rerunning it embeds only new or
changed files, drops removed ones and finishes an interrupted run. ``query`` prints a ranked table (or JSON
with --json); --out writes a contact sheet PNG and an HTML page per query. ``serve`` answers the same
queries on a web page and a JSON API (search_app.py). See README, "Search your own imagery".
"""
from __future__ import annotations

import argparse
import html
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw  # noqa: E402

from dataset.images import ImageDecoding, load_rgb  # noqa: E402
from dataset.scenes import THUMB, Item, read_item, thumbnail  # noqa: E402
from models import Retriever, load_retriever  # noqa: E402
from models.search_index import (FAISS_KINDS, IndexOptions, LoadedIndex, SearchIndexError,  # noqa: E402
                                 check_retriever, load_index, ranked, search, update_index)
from utils.config import ConfigError  # noqa: E402
from utils.distributed import cleanup, init_distributed  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="embed images into an index folder (incremental, resumable)")
    index.add_argument("--checkpoint", required=True, help="a checkpoint written by training (self-contained)")
    index.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_GLOB",
                       help="image files, folders (searched recursively) or globs ('**' recurses)")
    index.add_argument("--index", required=True, metavar="OUT", help="the index folder (created)")
    index.add_argument("--tile", type=int, default=256, help="tile size in pixels for GeoTIFF / JPEG2000 scenes "
                                                             "larger than it (0: embed scenes whole)")
    index.add_argument("--stride", type=int, default=192, help="pixels between tiles (less than --tile: overlap)")
    index.add_argument("--batch_size", type=int, default=64)
    index.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images")
    index.add_argument("--shard_size", type=int, default=4096,
                       help="rows per embedding shard: what an interrupted run can lose at most")
    index.add_argument("--faiss", choices=FAISS_KINDS, default="flat",
                       help="flat: exact; hnsw (M=32, efConstruction=200, efSearch=128) or ivf (nlist ~ "
                            "4 sqrt(N), nprobe = max(16, nlist/16)) for large collections")
    decode = index.add_argument_group("decoding (default: the checkpoint's image_decode; recorded in the index)")
    decode.add_argument("--bands", type=int, nargs="+", help="1-based bands to read as RGB (or one as grey), "
                                                             "e.g. 4 3 2 for Sentinel-2 true colour")
    decode.add_argument("--scale", choices=("depth", "percentile"),
                        help="depth: divide by --value_max; percentile: stretch --percentiles to 0..255 (a "
                             "scene's tiles by the whole scene's percentiles)")
    decode.add_argument("--value_max", type=float, help="the sample value that becomes 255 (depth scale)")
    decode.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"))
    index.add_argument("--precision", choices=("fp32", "amp_bf16", "amp_fp16"), help="default: the checkpoint's")
    index.add_argument("--device", default="cpu", help="cpu or cuda")
    query = commands.add_parser("query", help="search an index by text or image")
    query.add_argument("--index", required=True, help="an index folder made by 'index'")
    query.add_argument("texts", nargs="*", help="text queries")
    query.add_argument("--queries", metavar="FILE", help="a text file of queries, one per line")
    query.add_argument("--image", action="append", default=[], metavar="PATH", help="image-to-image search")
    query.add_argument("--top", type=int, default=20)
    query.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
    query.add_argument("--out", metavar="DIR", help="write a contact sheet PNG and an HTML page per query here")
    query.add_argument("--checkpoint", help="default: the one the index was made with (it must be that one)")
    query.add_argument("--device", default="cpu")
    serve = commands.add_parser("serve", help="a web page and a JSON API over an index (the model loads once)")
    serve.add_argument("--index", required=True, help="an index folder made by 'index'")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines too")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--top", type=int, default=20, help="results per query unless the request says otherwise")
    serve.add_argument("--checkpoint", help="default: the one the index was made with (it must be that one)")
    serve.add_argument("--device", default="cpu")
    return parser


def run_index(args: argparse.Namespace) -> int:
    if args.tile > 0 and not 0 < args.stride <= args.tile:
        print(f"error: --stride {args.stride} must be in 1..--tile ({args.tile})", file=sys.stderr)
        return 2
    info = init_distributed("cuda" if args.device.startswith("cuda") else "cpu")  # under torchrun: its group
    try:
        device = f"cuda:{info.local_rank}" if info.distributed and args.device == "cuda" else args.device
        retriever = load_retriever(args.checkpoint, device)
        overrides = {key: value for key in ("bands", "scale", "value_max", "percentiles")
                     if (value := getattr(args, key)) is not None}
        image_decode = {**retriever.config["image_decode"], **overrides}
        ImageDecoding.from_config(image_decode)  # checked before anything is read
        options = IndexOptions(args.tile, args.stride, args.batch_size, args.workers, args.shard_size, args.faiss,
                               args.precision or retriever.config["precision"], image_decode)
        update_index(args.index, args.checkpoint, args.images, retriever, options,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        cleanup()
    return 0


def table(query: str, results: list[dict[str, Any]]) -> str:
    lines = [f"query: {query}", f"{'rank':>4}  {'score':>7}  path"]
    for r in results:
        where = "" if r["window"] is None else f"  window {r['window']}"
        geo = "" if r["bounds"] is None else f"  bounds {[round(b, 2) for b in r['bounds']]} {r['crs']}"
        lines.append(f"{r['rank']:>4}  {r['score']:>7.4f}  {r['path']}{where}{geo}")
    return "\n".join(lines)


def write_report(out: Path, number: int, label: str, query_image: Image.Image | None,
                 results: list[dict[str, Any]], items: list[Item], index: LoadedIndex) -> None:
    """``query_NNN.png`` (the query and the results' thumbnails with their scores) and ``query_NNN.html``
    (thumbnails linking to the files, by relative paths); a tile's thumbnail is its window of the scene."""
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    decoding = index.decoding
    columns, cell, header = 5, THUMB + 10, 70 if query_image is None else THUMB + 30
    rows = max(1, -(-len(results) // columns))
    sheet = Image.new("RGB", (columns * cell, header + rows * (cell + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    if query_image is None:
        draw.multiline_text((5, 5), "\n".join(textwrap.wrap(label, 80)[:4]), fill="black")
    else:
        sheet.paste(thumbnail(query_image), (5, 5))
        draw.text((5, THUMB + 10), f"query image: {os.path.basename(label)}", fill="black")
    cards = []
    for r, item in zip(results, items):
        name = f"query_{number:03d}_rank_{r['rank']:03d}.png"
        try:
            thumb = thumbnail(read_item(item, decoding))
        except Exception:  # a file changed since indexing: a grey card, the page still lists it
            thumb = Image.new("RGB", (THUMB, THUMB), "grey")
        thumb.save(thumbs / name)
        x, y = ((r["rank"] - 1) % columns) * cell, header + ((r["rank"] - 1) // columns) * (cell + 30)
        sheet.paste(thumb, (x + 5, y + 5))
        draw.text((x + 5, y + THUMB + 8), f"#{r['rank']} {r['score']:.3f} {os.path.basename(item.path)}"[:28],
                  fill="black")
        link = os.path.relpath(item.path, out)
        caption = html.escape(f"#{r['rank']} {r['score']:.4f} {os.path.basename(item.path)}"
                              + ("" if item.window is None else f" window {list(item.window)}"))
        cards.append(f'<figure><a href="{html.escape(link)}"><img src="thumbs/{name}"></a>'
                     f"<figcaption>{caption}</figcaption></figure>")
    sheet.save(out / f"query_{number:03d}.png")
    page = ("<!doctype html><meta charset='utf-8'><title>search results</title>"
            "<style>figure{display:inline-block;margin:6px;font:12px sans-serif;width:170px}</style>"
            f"<h2>{html.escape(label)}</h2>\n" + "\n".join(cards) + "\n")
    (out / f"query_{number:03d}.html").write_text(page, encoding="utf-8")


def open_index(args: argparse.Namespace) -> tuple[LoadedIndex, Retriever]:
    """The index and the model it was made with (``--checkpoint`` if it moved: the same sha256)."""
    index = load_index(args.index)
    checkpoint = Path(args.checkpoint or index.manifest["checkpoint"])
    check_retriever(index, checkpoint)
    return index, load_retriever(checkpoint, args.device)


def run_query(args: argparse.Namespace) -> int:
    texts = list(args.texts)
    if args.queries:
        texts += [line.strip() for line in Path(args.queries).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts and not args.image:
        print("error: give text queries, --queries FILE or --image PATH", file=sys.stderr)
        return 2
    index, retriever = open_index(args)
    labelled: list[tuple[str, Image.Image | None, list[tuple[float, int]]]] = []
    if texts:
        hits = search(index, retriever, retriever.encode_texts(texts).cpu(), args.top, by_text=True)
        labelled += [(text, None, found) for text, found in zip(texts, hits)]
    if args.image:
        images = [load_rgb(path, index.decoding) for path in args.image]
        hits = search(index, retriever, retriever.encode_images(images).cpu(), args.top, by_text=False)
        labelled += [(path, image, found) for path, image, found in zip(args.image, images, hits)]
    answers = []
    for number, (label, image, found) in enumerate(labelled):
        results = ranked(index, found)
        answers.append({"query": label if image is None else {"image": label}, "results": results})
        if args.out:
            write_report(Path(args.out), number, label, image, results, [index.items[row] for _, row in found], index)
        if not args.json:
            print(table(label, results) + "\n")
    if args.json:
        print(json.dumps(answers, indent=1))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # search_app.py beside this file, however it was loaded
    from search_app import MAX_TOP, create_app

    if not 1 <= args.top <= MAX_TOP:
        print(f"error: --top {args.top} must be in 1..{MAX_TOP}", file=sys.stderr)
        return 2
    index, retriever = open_index(args)
    print(f"serving index {index.folder} ({len(index.items)} items) at http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    uvicorn.run(create_app(index, retriever, args.top), host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"index": run_index, "query": run_query, "serve": run_serve}[args.command](args)
    except (SearchIndexError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
