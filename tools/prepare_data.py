"""Convert a public retrieval dataset's annotations into the project's train/val/test JSON.

    python tools/prepare_data.py precomp SRC_DIR OUT_DIR --name rsitmd [--fixed-split DIR] [--image-root DIR]
    python tools/prepare_data.py karpathy dataset_sydney.json OUT_DIR --name sydney --labels singleton
    python tools/prepare_data.py coco COCO_DIR OUT_DIR --name ucm --labels ucm
    python tools/prepare_data.py xvlm JSON_DIR OUT_DIR --name rsitmd
    python tools/prepare_data.py precomp SRC_DIR OUT_DIR --name rsitmd --image-root DIR --masks RSITMD_SS_DIR

Writes OUT_DIR/<name>_{train,val,test}.json, <name>_problems.tsv (every problem found), <name>_summary.json
and the figures <name>_scenes.png and <name>_caption_lengths.png. Exits with status 1, after writing the
report, when it finds a hard problem that no --allow accepts. --masks checks every image's segmentation mask
(RSITMD-SS format) and adds the mask classes' shares to the summary.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.annotations import DEFAULT_CAPTION_WEIGHT, DataError  # noqa: E402
from dataset.preparation import (HARD, PrepareOptions, format_summary, prepare_dataset, read_coco,  # noqa: E402
                                 read_karpathy, read_precomp, read_xvlm)
from dataset.preparation.labels import LABEL_SCHEMES  # noqa: E402
from dataset.preparation.sources import Source  # noqa: E402

SOURCES = {
    "precomp": "AMFMN/GaLR/SIRS folder with train_caps.txt, train_filename.txt, test_caps.txt, test_filename.txt",
    "karpathy": "Karpathy-style dataset_*.json with a split per image",
    "coco": "folder of COCO-captions JSON files with train / val / test in their names (val optional)",
    "xvlm": "folder of X-VLM/PIR JSON files with train / val / test in their names (val optional)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, help_text in SOURCES.items():
        sub = formats.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("src", help="the source file or folder")
        sub.add_argument("out_dir", help="folder for the converted files (created)")
        sub.add_argument("--name", required=True, help="dataset name, the prefix of every output file")
        if name == "precomp":
            sub.add_argument("--fixed-split", metavar="DIR",
                             help="folder with {train,val}_{caps,filename}_verify.txt: the standard val split")
        sub.add_argument("--image-root", metavar="DIR",
                         help="check that every image exists (flat, or under train/ val/ test/) and decodes")
        sub.add_argument("--masks", metavar="DIR",
                         help="check that every image has its RSITMD-SS segmentation mask (mask_<stem>.png, value "
                              "10 x class, 255 ignore) that decodes and, with --image-root, has the image's size; "
                              "report the classes' shares of pixels and images")
        sub.add_argument("--labels", choices=LABEL_SCHEMES, default="prefix",
                         help="scene labels: file-name prefix (default; names without one get their own), "
                              "UCM's blocks of 100 file numbers, or one per image")
        sub.add_argument("--captions-per-image", type=int, default=5, metavar="N")
        sub.add_argument("--val-fraction", type=float, default=0.2,
                         help="share of train carved as val, stratified by scene, when the source has no val")
        sub.add_argument("--seed", type=int, default=0, help="seed of the carved val split")
        sub.add_argument("--captions-from", metavar="JSON",
                         help="X-VLM JSON whose captions replace the same images' blank captions")
        sub.add_argument("--allow", action="append", default=[], choices=sorted(HARD), metavar="KIND",
                         help="accept a kind of hard problem: "
                              + "; ".join(f"{kind}: {effect}" for kind, effect in HARD.items()))
        sub.add_argument("--caption-weight", choices=("short_low", "clip", "none"),
                         default=DEFAULT_CAPTION_WEIGHT["rule"], help="rule for the train 'length' field")
        sub.add_argument("--max-words", type=int, default=30, help="as the config's max_words")
        sub.add_argument("--plots-dir", metavar="DIR", help="folder for the PNG figures (default OUT_DIR), "
                                                            "e.g. assets/data")
        sub.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    return parser


def read_source(args: argparse.Namespace) -> Source:
    if args.format == "precomp":
        return read_precomp(args.src, args.fixed_split, args.captions_per_image)
    return {"karpathy": read_karpathy, "coco": read_coco, "xvlm": read_xvlm}[args.format](args.src)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = PrepareOptions(
        name=args.name, source_format=args.format, captions_per_image=args.captions_per_image,
        label_scheme=args.labels, val_fraction=args.val_fraction, seed=args.seed, image_root=args.image_root,
        mask_root=args.masks, allow=frozenset(args.allow), captions_from=args.captions_from,
        caption_weight={**DEFAULT_CAPTION_WEIGHT, "rule": args.caption_weight}, max_words=args.max_words,
        plots=not args.no_plots, plots_dir=args.plots_dir)
    try:
        prepared = prepare_dataset(read_source(args), args.out_dir, options)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_summary(prepared.summary))
    print("wrote " + ", ".join(str(path) for path in prepared.files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
