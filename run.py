"""Launcher, as PIR/X-VLM users type it:

    python run.py                                       # the FISVL demo: generate data, train, evaluate (CPU ok)
    python run.py --task demo_swin_bert_cl              # the demo of any registered model: demo_<model>
    python run.py --task itr_rsitmd --config configs/Retrieval_rsitmd.yaml --output_dir output/rsitmd --dist f2
    python run.py --task itr_rsitmd --evaluate --checkpoint output/rsitmd/checkpoint_best.pth --output_dir output/eval
    python run.py --config configs/demo_fisvl.yaml optimizer.lr=1e-3 schedular.epochs=2     # dotted config overrides
    python run.py --task itr_rsitmd --output_dir output/rsitmd3 --repeats 3   # 3 seeds, then their mean and std

One process runs in place (no torch.distributed); several are started with torchrun. ``--config`` is
always honoured: ``--task`` only supplies the default config.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from utils.cli import add_run_arguments, parse_run_arguments
from utils.protocol import entry_names, label
from utils.repeats import RepeatRun, plan_repeats, summarise

CONFIGS = Path(__file__).resolve().parent / "configs"
# demo_<model> for each configs/demo_<model>.yaml (every registered model has one), the paper tasks, and
# the names earlier versions used.
TASKS = {
    **{path.stem: f"configs/{path.name}" for path in sorted(CONFIGS.glob("demo_*.yaml"))},
    "demo": "configs/demo_fisvl.yaml",
    "demo_baseline": "configs/demo_swin_bert_cl.yaml",
    "itr_rsitmd": "configs/Retrieval_rsitmd.yaml",
    "itr_rsicd": "configs/Retrieval_rsicd.yaml",
    "itr_rsitmd_pir": "configs/Retrieval_rsitmd_pir.yaml",
    "itr_rsicd_pir": "configs/Retrieval_rsicd_pir.yaml",
    "itr_rsitmd_amfmn": "configs/Retrieval_rsitmd_amfmn.yaml",
    "itr_rsicd_amfmn": "configs/Retrieval_rsicd_amfmn.yaml",
    "itr_rsitmd_sirs": "configs/Retrieval_rsitmd_sirs.yaml",
    "itr_rsicd_sirs": "configs/Retrieval_rsicd_sirs.yaml",
    "itr_rsitmd_clip": "configs/Retrieval_rsitmd_clip.yaml",
    "itr_rsicd_clip": "configs/Retrieval_rsicd_clip.yaml",
    "itr_rsitmd_fisvl_clip": "configs/Retrieval_rsitmd_fisvl_clip.yaml",
}

# PIR/X-VLM --dist presets: visible GPUs and processes per node. gpuN (one process on GPU N) and cpu are
# handled separately.
DIST_PRESETS = {
    "f2": ("0,1", 2), "f3": ("0,1,2", 3), "f4": ("0,1,2,3", 4), "f8": ("0,1,2,3,4,5,6,7", 8),
    "f12": ("1,2", 2), "f02": ("0,2", 2), "f03": ("0,3", 2), "l2": ("2,3", 2),
}

log = logging.getLogger("run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="demo", choices=sorted(TASKS), help="names the default config")
    parser.add_argument("--config", default=None, help="YAML config (default: the task's)")
    parser.add_argument("--output_dir", default=None, help="run folder (default: output/<task>)")
    add_run_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None,
                        help="train N times, with seeds seed .. seed+N-1, into output_dir/run_<k>/, then write "
                             "output_dir/summary.json (mean and sample std of every run's selected val and test "
                             "recalls); with --resume, finished runs are skipped")
    parser.add_argument("--dist", default=None,
                        help="cpu, gpuN, or a multi-GPU preset (" + ", ".join(DIST_PRESETS) + "); default: gpu0 "
                             "when CUDA is available, else cpu")
    parser.add_argument("--nproc_per_node", type=int, default=None, help="processes per node (overrides the preset)")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--node_rank", type=int, default=0, help="rank of this node")
    parser.add_argument("--master_addr", default="127.0.0.1", help="address of node 0 (multi-node)")
    parser.add_argument("--master_port", type=int, default=None, help="port on node 0 (default: 9999 multi-node, "
                                                                      "a free port on one node)")
    parser.add_argument("--device", default=None, help="force cuda or cpu (default: from --dist)")
    parser.add_argument("--load_ckpt_from", default="", help="X-VLM pre-training option: accepted and ignored")
    parser.add_argument("--output_hdfs", default="", help="X-VLM HDFS option: accepted and ignored")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optimizer.lr=1e-4")
    return parser


def resolve_dist(dist: str | None, nproc: int | None) -> tuple[str | None, int, str]:
    """(CUDA_VISIBLE_DEVICES or None, processes per node, device) for a ``--dist`` value."""
    if dist is None:
        import torch  # only to pick the default; the worker imports it anyway

        dist = "gpu0" if torch.cuda.is_available() else "cpu"
    if dist == "cpu":
        return None, nproc or 1, "cpu"
    gpu = re.fullmatch(r"gpu(\d+)", dist)
    if gpu:
        return gpu.group(1), nproc or 1, "cuda"
    if dist in DIST_PRESETS:
        devices, count = DIST_PRESETS[dist]
        return devices, nproc or count, "cuda"
    raise SystemExit(f"run.py: unknown --dist {dist!r}; use cpu, gpuN or one of {', '.join(DIST_PRESETS)}")


def worker_arguments(args: argparse.Namespace, config: str, output_dir: str, device: str) -> list[str]:
    """The ``Retrieval.py`` command line: every launcher option is forwarded (the seed too)."""
    argv = ["--config", config, "--output_dir", output_dir, "--checkpoint", args.checkpoint, "--bs", str(args.bs),
            "--seed", str(args.seed), "--device", device, "--split", args.split]
    if args.evaluate:
        argv.append("--evaluate")
    if args.allow_random_eval:
        argv.append("--allow_random_eval")
    if args.resume:
        argv += ["--resume", args.resume]
    if args.overrides:
        argv += ["--opts", *args.overrides]
    return argv


def torchrun_command(args: argparse.Namespace, nproc: int, worker_argv: list[str]) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if args.nnodes == 1 and args.master_port is None:
        command.append("--standalone")
    else:
        command += [f"--nnodes={args.nnodes}", f"--node_rank={args.node_rank}", f"--master_addr={args.master_addr}",
                    f"--master_port={args.master_port or 9999}"]
    return command + [str(Path(__file__).with_name("Retrieval.py")), *worker_argv]


def launch(args: argparse.Namespace, nproc: int, worker_argv: list[str]) -> int:
    """One run: in place for a single process, else under torchrun; its exit status."""
    if nproc * args.nnodes == 1:
        import Retrieval  # in place: no process group, no launcher

        Retrieval.main(worker_argv)
        return 0
    command = torchrun_command(args, nproc, worker_argv)
    log.info("run.py: %s", " ".join(command))
    return subprocess.run(command, check=False).returncode


def check_repeats(args: argparse.Namespace) -> None:
    """Refuse a --repeats value or combination that cannot run, before anything starts."""
    if args.repeats is None:
        return
    if args.repeats < 1:
        raise SystemExit(f"run.py: --repeats is a number of runs >= 1, got {args.repeats}")
    if args.evaluate:
        raise SystemExit("run.py: --repeats repeats training; it cannot be combined with --evaluate")
    if args.resume not in (None, "latest"):
        raise SystemExit("run.py: with --repeats, --resume continues each run from its own checkpoint_last.pth; "
                         f"it takes no checkpoint path (got {args.resume!r})")


def repeat(args: argparse.Namespace, config: str, output_dir: str, device: str, nproc: int) -> int:
    """``--repeats N``: the runs one after another (finished ones skipped on ``--resume``), then the summary."""
    runs = plan_repeats(Path(output_dir), args.seed, args.repeats, args.resume is not None)
    for run in runs:
        console_logging()
        if run.finished:
            log.info("run.py: %s finished earlier (seed %d): skipped", run.folder, run.seed)
            continue
        log.info("run.py: %s, seed %d%s", run.folder, run.seed, ", resumed" if run.resume else "")
        run_args = argparse.Namespace(**{**vars(args), "seed": run.seed, "resume": run.resume})
        status = launch(args, nproc, worker_arguments(run_args, config, str(run.folder), device))
        if status:
            return status
    console_logging()
    if args.node_rank == 0:  # the runs' log.txt are written on node 0
        write_summary(Path(output_dir), runs)
    return 0


def console_logging() -> None:
    """The launcher's console log again: a run in place pointed the root logger at its own run.log."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)


def write_summary(output_dir: Path, runs: list[RepeatRun]) -> None:
    """``summary.json`` and the table of the runs' means and standard deviations."""
    from Retrieval import format_table  # after the runs: torch may start now

    summary = summarise(runs)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    rows = {f"{result['run']} test (seed {result['seed']})": result["test"] for result in summary["runs"]}
    paper = entry_names(summary["mean"])
    for entry in summary["mean"]:
        for stat in ("mean", "std") if summary["std"] is not None else ("mean",):
            rows[f"{label(entry)} ({stat} over runs)" if entry in paper else f"{entry} {stat}"] = summary[stat][entry]
    log.info("run.py: %d runs, each at its checkpoint selected on %s; %s:\n%s", len(runs),
             summary["runs"][0]["selected_on"], output_dir / "summary.json", format_table(rows))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_run_arguments(build_parser(), argv)
    check_repeats(args)
    config = args.config or TASKS[args.task]
    output_dir = args.output_dir or os.path.join("output", args.task)
    for option in ("load_ckpt_from", "output_hdfs"):
        if getattr(args, option).strip():
            log.warning("run.py: --%s is accepted for X-VLM compatibility and ignored", option)
    visible, nproc, device = resolve_dist(args.dist, args.nproc_per_node)
    device = args.device or device
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    if args.repeats is not None:
        return repeat(args, config, output_dir, device, nproc)
    return launch(args, nproc, worker_arguments(args, config, output_dir, device))


if __name__ == "__main__":
    sys.exit(main())
