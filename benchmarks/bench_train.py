"""Training step and evaluation of the paper-size models, fp32 against bf16 autocast and its companions, side
by side in one run on whatever device there is.

Models: FISVL (configs/Retrieval_rsitmd.yaml, contr + affil + scene), PIR (configs/Retrieval_rsitmd_pir.yaml,
contr + affil) and CLIP ViT-B-32 (configs/demo_clip.yaml with ``clip_model: ViT-B-32``, 224 px, contr), all at
paper size with random weights; a vocabulary from the demo dataset's words stands in for bert-base-uncased's (it
changes no parameter), so nothing is read or downloaded.

1. Training step: ``train_one_epoch`` (the trainer's forward, backward, grad-norm guard and optimizer step) on
   one synthetic batch, for variants that each add one option to the previous one: fp32; amp_bf16; + fused
   AdamW (``optimizer.fused``); + channels_last (model and images); + gradient checkpointing
   (``grad_checkpointing``); + ``torch.compile`` of the model. Warm-up steps are not timed; CUDA is synchronised
   around the timed steps. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident
   memory over the timed steps (sampled every 5 ms) above the memory before the model was built. The first
   step's loss shows that the variants compute the same thing.
2. Evaluation at RSICD test size (1,093 images, 5,465 captions): ``embed_image_batches`` over synthetic
   in-memory image tensors, ``embed_texts`` of synthetic captions through the model's own tokenizer,
   ``similarity_matrix`` and ``retrieval_metrics``, end to end, in fp32 and amp_bf16.

Ratios are speed ratios against fp32 (above 1: faster).

    python benchmarks/bench_train.py [--device cuda|cpu] [--batch N] [--steps 10] [--models fisvl pir clip]
    python benchmarks/bench_train.py --quick   # CPU, about a minute: the demo-size models, batch 8, 2 timed steps,
                                               # every variant but torch.compile, evaluation on 64 x 320
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset.synthetic import SPECIAL_TOKENS, demo_vocabulary  # noqa: E402
from models import RetrievalModel, build_model  # noqa: E402
from models.inference import embed_image_batches, embed_texts, similarity_matrix  # noqa: E402
from models.objective import build_objective  # noqa: E402
from models.task import RetrievalTask  # noqa: E402
from models.text import BertWordPieceProcessor  # noqa: E402
from optim import create_optimizer  # noqa: E402
from Retrieval import TrainState, train_one_epoch  # noqa: E402
from scheduler import create_scheduler, parse_stages  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.metrics import retrieval_metrics  # noqa: E402
from utils.precision import grad_scaler  # noqa: E402

ModelTable = dict[str, tuple[str, tuple[str, ...]]]  # name -> (config in configs/, overrides)
PAPER_MODELS: ModelTable = {
    "fisvl": ("Retrieval_rsitmd.yaml", ()),
    "pir": ("Retrieval_rsitmd_pir.yaml", ()),
    "clip": ("demo_clip.yaml", ("clip_model=ViT-B-32", "image_res=224", "synthetic_data=null")),
}
# --quick: the same models and losses at the demo configs' sizes (a paper-size step takes tens of seconds on a CPU)
DEMO_MODELS: ModelTable = {name: (f"demo_{name}.yaml", ("synthetic_data=null",)) for name in ("fisvl", "pir", "clip")}
# the issue's global batches for one GPU: FISVL/PIR's per-process 128, CLIP ViT-B-32's 600
GPU_BATCH = {"fisvl": 128, "pir": 128, "clip": 600}
RSICD_TEST = (1093, 5)  # images, captions per image
RSICD_CLASSES = 30
CAPTION_WORDS = 12


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str = "fp32"
    fused: bool = False
    channels_last: bool = False
    checkpointing: bool = False
    compile: bool = False


VARIANTS = (
    Variant("fp32"),
    Variant("amp_bf16", "amp_bf16"),
    Variant("+ fused AdamW", "amp_bf16", fused=True),
    Variant("+ channels_last", "amp_bf16", fused=True, channels_last=True),
    Variant("+ grad checkpointing", "amp_bf16", fused=True, channels_last=True, checkpointing=True),
    Variant("+ torch.compile", "amp_bf16", fused=True, channels_last=True, checkpointing=True, compile=True),
)


@dataclass
class StepResult:
    samples_per_s: float
    peak_mib: float
    first_loss: float


class RssPeak:
    """Peak resident memory of this process while active, sampled by a thread: ``ru_maxrss`` is a lifetime
    maximum, which cannot show a later variant's smaller peak."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssPeak:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory_note(device: torch.device) -> str:
    return ("peak MiB: torch.cuda.max_memory_allocated" if device.type == "cuda" else
            "peak MiB: resident memory above the process's before the model was built, sampled every 5 ms")


def synthetic_captions(count: int, seed: int = 0) -> list[str]:
    """Captions of the demo dataset's words, about as long as RSICD's."""
    rng = np.random.default_rng(seed)
    words = demo_vocabulary()
    return [" ".join(rng.choice(words, CAPTION_WORDS)) for _ in range(count)]


def model_config(models: ModelTable, name: str, *overrides: str) -> dict[str, Any]:
    path, own = models[name]
    return load_config(ROOT / "configs" / path, [*own, "print_freq=1000000", *overrides])


def build(config: dict[str, Any]) -> RetrievalModel:
    """Random weights; BERT models get the demo words as vocabulary (CLIP brings its own tokenizer)."""
    processor = None
    if config["model"] != "clip":
        vocab = "\n".join([*SPECIAL_TOKENS, *demo_vocabulary()]) + "\n"
        processor = BertWordPieceProcessor({"vocab.txt": vocab}, config["max_tokens"], config["max_words"])
    torch.manual_seed(0)
    return build_model(config, pretrained=False, text_processor=processor)


def training_batch(task: RetrievalTask, batch_size: int, res: int, channels_last: bool) -> dict[str, Any]:
    """One batch of distinct images, each with one caption, and a scene class for the losses that read one."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, res, res, generator=gen)
    fields = {"image_idx": torch.arange(batch_size), "caption_idx": torch.arange(batch_size),
              "label": torch.randint(RSICD_CLASSES, (batch_size,), generator=gen),
              "caption_weight": torch.ones(batch_size)}
    return {"images": images.contiguous(memory_format=torch.channels_last) if channels_last else images,
            "text": task.model.text_processor(synthetic_captions(batch_size)),
            **{name: fields[name] for name in task.sample_fields}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(models: ModelTable, name: str, variant: Variant, device: torch.device,
               batch_size: int, steps: int, warmup: int) -> StepResult:
    """``warmup`` untimed steps (the first gives the loss), then ``steps`` timed ones, through ``train_one_epoch``."""
    config = model_config(models, name, f"precision={variant.precision}", f"batch_size_train={batch_size}",
                          f"grad_checkpointing={str(variant.checkpointing).lower()}",
                          f"optimizer.fused={str(variant.fused).lower()}")
    stages = parse_stages(config)
    baseline = RssPeak.current()
    model = build(config).to(device).train()
    if variant.channels_last:
        model.to(memory_format=torch.channels_last)
    task = RetrievalTask(model, build_objective(config, stages)).to(device)
    task.objective.set_stage(stages[0])
    optimizer = create_optimizer(config["optimizer"], model, task.objective)
    if variant.compile:
        model.compile()
    scheduler = create_scheduler(config["schedular"], optimizer, warmup + steps)
    scaler = grad_scaler(config["precision"], device)
    batch = training_batch(task, batch_size, config["image_res"], variant.channels_last)

    def run(count: int) -> dict[str, Any]:
        return train_one_epoch(task, [batch] * count, optimizer, scheduler, scaler, 0, config, device, TrainState())

    first = run(1)
    first_loss = sum(weight * float(first[f"train_loss_{loss}"]) for loss, weight in stages[0].losses.items())
    if warmup > 1:
        run(warmup - 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    with RssPeak() as rss:
        start = time.perf_counter()
        run(steps)
        synchronize(device)
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak - baseline
    return StepResult(steps * batch_size / elapsed, peak / 2**20, first_loss)


def release(device: torch.device) -> None:
    """Free the previous variant's model, optimizer and activations before the next one is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_training(models: ModelTable, name: str, variants: Sequence[Variant],
                   skipped: dict[str, str], device: torch.device, batch_size: int, steps: int, warmup: int) -> None:
    """One model's table: each variant against fp32. A variant that fails (no fused kernel, a compile error)
    prints its reason instead of a row."""
    print(f"\n{name}: training step, batch {batch_size}, {steps} timed steps after {warmup} warm-up, on {device} "
          f"({memory_note(device)})")
    print(f"{'variant':<22} {'samples/s':>10} {'vs fp32':>8} {'peak MiB':>10} {'first loss':>11}")
    reference = None
    for variant in variants:
        if variant.name in skipped:
            print(f"{variant.name:<22} skipped: {skipped[variant.name]}")
            continue
        try:
            result = train_step(models, name, variant, device, batch_size, steps, warmup)
        except Exception as err:  # noqa: BLE001 (a variant that does not apply is reported, the rest still run)
            print(f"{variant.name:<22} skipped: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        finally:
            release(device)
        reference = reference or result
        print(f"{variant.name:<22} {result.samples_per_s:>10.3g} {result.samples_per_s / reference.samples_per_s:>7.2f}x "
              f"{result.peak_mib:>10.0f} {result.first_loss:>11.4f}", flush=True)


def timed_evaluation(model: RetrievalModel, images: torch.Tensor, captions: list[str], config: dict[str, Any],
                     device: torch.device, precision: str) -> tuple[float, float]:
    """Seconds for embedding, scoring and ranking, end to end; and R_mean (random weights: near chance)."""
    per = len(captions) // len(images)
    img2txt = [list(range(per * i, per * i + per)) for i in range(len(images))]
    txt2img = [c // per for c in range(len(captions))]
    synchronize(device)
    start = time.perf_counter()
    image_emb = embed_image_batches(model, images.split(config["batch_size_test"]), device, precision)
    text_emb = embed_texts(model, captions, config["batch_size_test_text"], device, precision)
    metrics = retrieval_metrics(similarity_matrix(model, image_emb, text_emb), img2txt, txt2img)
    synchronize(device)
    return time.perf_counter() - start, metrics["r_mean"]


def bench_evaluation(models: ModelTable, device: torch.device, n_images: int, captions_per_image: int) -> None:
    """Each model's test-split evaluation in fp32 and amp_bf16, after an untimed warm-up of both paths."""
    print(f"\nevaluation, {n_images:,} images x {n_images * captions_per_image:,} captions (synthetic image tensors "
          f"in memory, synthetic captions through each model's tokenizer), on {device}")
    print(f"{'model':<8} {'fp32 s':>9} {'amp_bf16 s':>11} {'bf16 vs fp32':>13} {'R_mean fp32/bf16':>18}")
    captions = synthetic_captions(n_images * captions_per_image, seed=1)
    for name in models:
        config = model_config(models, name)
        model = build(config).to(device)
        res = config["image_res"]
        images = torch.randn(n_images, 3, res, res, generator=torch.Generator().manual_seed(1))
        timed_evaluation(model, images[:2], captions[:2 * captions_per_image], config, device, "fp32")
        timed_evaluation(model, images[:2], captions[:2 * captions_per_image], config, device, "amp_bf16")
        fp32_s, fp32_r = timed_evaluation(model, images, captions, config, device, "fp32")
        bf16_s, bf16_r = timed_evaluation(model, images, captions, config, device, "amp_bf16")
        print(f"{name:<8} {fp32_s:>9.2f} {bf16_s:>11.2f} {fp32_s / bf16_s:>12.2f}x {fp32_r:>8.2f} / {bf16_r:<8.2f}",
              flush=True)
        del model
        release(device)


def run(models: ModelTable, device: torch.device, batches: dict[str, int],
        steps: int, warmup: int, variants: Sequence[Variant], skipped: dict[str, str], n_images: int,
        captions_per_image: int) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    for name in models:
        bench_training(models, name, variants, skipped, device, batches[name], steps, warmup)
    bench_evaluation(models, device, n_images, captions_per_image)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="batch of every model (default: FISVL/PIR 128, CLIP 600; --quick 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (the first gives the loss)")
    parser.add_argument("--models", nargs="+", choices=tuple(PAPER_MODELS), default=tuple(PAPER_MODELS))
    parser.add_argument("--quick", action="store_true", help="reduced mode for a CPU, about a minute: the models at "
                        "the demo configs' sizes, batch 8, 1 warm-up and 2 timed steps, every variant but "
                        "torch.compile, evaluation on 64 images x 320 captions")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps need at least 1 step (the first warm-up step gives the loss)")
    device = torch.device(args.device)
    models = {name: (DEMO_MODELS if args.quick else PAPER_MODELS)[name] for name in args.models}
    n_images, per = RSICD_TEST
    skipped = {}
    if args.quick:
        args.steps, args.warmup, n_images = 2, 1, 64
        skipped = {VARIANTS[-1].name: "not in --quick (compiling takes longer than the steps it would speed up)"}
    batch = args.batch or (8 if args.quick else None)
    batches = {name: batch or GPU_BATCH[name] for name in models}
    run(models, device, batches, args.steps, args.warmup, VARIANTS, skipped, n_images, per)


if __name__ == "__main__":
    main()
