"""Speed of the core against plain references, side by side in one run.

1. Ranking: ``retrieval_metrics`` (each score compared in place with its row's and its column's target,
   no masks) against a per-query NumPy loop (X-VLM's ``itm_eval`` with a stable sort) and against the
   previous vectorised form (dense positive masks, a transposed pass, kept below verbatim) on RSICD-sized
   scores, 1,093 images x 5,465 captions; all three give the same numbers.
2. Training step: the framework's ``train_one_epoch`` (task module, objective with gathering hooks,
   autocast context, scaler, scheduler, NaN guard with its gradient norm, loss bookkeeping, progress
   line) against a bare
   forward + loss + backward + AdamW step of the same model on the same batch.

    python benchmarks/bench_core.py [--steps 20] [--device cpu] [--only ranking|train]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import build_model  # noqa: E402
from models.losses import contrastive_loss  # noqa: E402
from models.objective import build_objective  # noqa: E402
from models.task import RetrievalTask  # noqa: E402
from optim import create_optimizer  # noqa: E402
from Retrieval import TrainState, to_device, train_one_epoch  # noqa: E402
from scheduler import create_scheduler, parse_stages  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.metrics import METRIC_KEYS, RECALL_KS, retrieval_metrics  # noqa: E402
from utils.precision import grad_scaler  # noqa: E402


def per_query_loop(sims: np.ndarray, img2txt: list[list[int]], txt2img: list[int]) -> dict[str, float]:
    ranks_i2t = np.array([min(np.where(np.argsort(-row, kind="stable") == c)[0][0] for c in img2txt[i])
                          for i, row in enumerate(sims)])
    ranks_t2i = np.array([np.where(np.argsort(-col, kind="stable") == txt2img[c])[0][0] for c, col in enumerate(sims.T)])
    out = {f"txt_r{k}": 100.0 * np.mean(ranks_i2t < k) for k in (1, 5, 10)}
    out.update({f"img_r{k}": 100.0 * np.mean(ranks_t2i < k) for k in (1, 5, 10)})
    out["r_mean"] = float(np.mean(list(out.values())))
    return out


# The previous vectorised form (utils/metrics.py before the one-pass ranking), kept verbatim as a reference.
def _ranks_of_targets(scores: torch.Tensor, target_score: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """Rank of one target per row: candidates scoring higher, plus equal-scoring ones with a lower index."""
    candidates = torch.arange(scores.shape[1], device=scores.device)
    higher = (scores > target_score[:, None]).sum(1)
    tied_before = ((scores == target_score[:, None]) & (candidates[None, :] < target_index[:, None])).sum(1)
    return higher + tied_before


def _chunked_ranks(scores: torch.Tensor, positives: torch.Tensor, chunk: int) -> torch.Tensor:
    """Best rank among each row's positive candidates; rows are processed ``chunk`` at a time to bound memory."""
    ranks = []
    for start in range(0, scores.shape[0], chunk):
        rows, pos = scores[start:start + chunk], positives[start:start + chunk]
        best_score = rows.masked_fill(~pos, float("-inf")).max(1).values
        # the first positive reaching the best score is the best-ranked positive under the stable tie rule
        first_best = (pos & (rows == best_score[:, None])).int().argmax(1)
        ranks.append(_ranks_of_targets(rows, best_score, first_best))
    return torch.cat(ranks)


def previous_retrieval_ranks(sims: torch.Tensor, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int],
                             chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks: (per image, best of its captions; per caption, of its image). The argument checks of
    the original are left out: the benchmark's inputs are well-formed."""
    n_img, n_txt = sims.shape
    device = sims.device
    txt2img_t = torch.as_tensor(list(txt2img), dtype=torch.long, device=device)
    owner_rows = torch.as_tensor([i for i, caps in enumerate(img2txt) for _ in caps], dtype=torch.long)
    owner_cols = torch.as_tensor([c for caps in img2txt for c in caps], dtype=torch.long)
    positives = torch.zeros(n_img, n_txt, dtype=torch.bool, device=device)
    positives[owner_rows.to(device), owner_cols.to(device)] = True
    if not bool(positives.any(1).all()):
        raise ValueError("every image needs at least one caption in img2txt")
    i2t = _chunked_ranks(sims, positives, chunk)
    t2i_pos = torch.zeros(n_txt, n_img, dtype=torch.bool, device=device)
    t2i_pos[torch.arange(n_txt, device=device), txt2img_t] = True
    t2i = _chunked_ranks(sims.t(), t2i_pos, chunk)
    return i2t, t2i


def previous_vectorised_form(sims: torch.Tensor, img2txt: list[list[int]], txt2img: list[int]) -> dict[str, float]:
    """The previous ``retrieval_metrics``: recalls from ``previous_retrieval_ranks``."""
    i2t, t2i = previous_retrieval_ranks(sims, img2txt, txt2img)
    metrics = {f"txt_r{k}": 100.0 * (i2t < k).double().mean().item() for k in RECALL_KS}
    metrics.update({f"img_r{k}": 100.0 * (t2i < k).double().mean().item() for k in RECALL_KS})
    metrics["r_mean"] = sum(metrics[key] for key in METRIC_KEYS[:-1]) / 6.0
    return metrics


def time_call(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_ranking(device: torch.device) -> None:
    n_img, per = 1093, 5
    img2txt = [list(range(per * i, per * i + per)) for i in range(n_img)]
    txt2img = [c // per for c in range(n_img * per)]
    sims = torch.randn(n_img, n_img * per, generator=torch.Generator().manual_seed(0)).to(device)
    new = retrieval_metrics(sims, img2txt, txt2img)
    previous = previous_vectorised_form(sims, img2txt, txt2img)
    loop = per_query_loop(sims.cpu().numpy(), img2txt, txt2img)
    assert all(abs(new[k] - loop[k]) < 1e-9 and abs(previous[k] - loop[k]) < 1e-9 for k in loop), (new, previous, loop)
    t_new = time_call(lambda: retrieval_metrics(sims, img2txt, txt2img), 15)
    t_previous = time_call(lambda: previous_vectorised_form(sims, img2txt, txt2img), 9)
    t_loop = time_call(lambda: per_query_loop(sims.cpu().numpy(), img2txt, txt2img), 2)
    print(f"ranking 1093 x 5465 on {device}:  per-query loop {t_loop * 1e3:8.1f} ms   "
          f"previous vectorised form {t_previous * 1e3:7.1f} ms   retrieval_metrics {t_new * 1e3:6.1f} ms   "
          f"speed-up x{t_loop / t_new:.0f} vs loop, x{t_previous / t_new:.1f} vs previous   (same metrics)")


def bench_train_step(device: torch.device, steps: int) -> None:
    config = load_config(ROOT / "configs" / "demo_swin_bert_cl.yaml", ["print_freq=1000000"])
    batch_size, res = config["batch_size_train"], config["image_res"]
    gen = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(batch_size, 3, res, res, generator=gen),
             "text": {"input_ids": torch.randint(5, 190, (batch_size, 16), generator=gen),
                      "attention_mask": torch.ones(batch_size, 16, dtype=torch.long)},
             "image_idx": torch.arange(batch_size) // 5, "caption_weight": torch.ones(batch_size)}
    stages = parse_stages(config)

    def fresh() -> tuple[RetrievalTask, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = build_model(config, pretrained=False).to(device).train()
        task = RetrievalTask(model, build_objective(config, stages))
        return task, create_optimizer(config["optimizer"], model, task.objective)

    task, optimizer = fresh()
    scheduler = create_scheduler(config["schedular"], optimizer, steps + 3)
    scaler = grad_scaler(config["precision"], device)
    train_one_epoch(task, [batch] * 3, optimizer, scheduler, scaler, 0, config, device, TrainState())  # warm-up
    start = time.perf_counter()
    train_one_epoch(task, [batch] * steps, optimizer, scheduler, scaler, 0, config, device, TrainState())
    t_framework = (time.perf_counter() - start) / steps

    task, optimizer = fresh()
    model = task.model
    on_device = to_device(batch, device)

    def bare_step() -> None:
        out = model(on_device)
        loss = contrastive_loss(out["image_feat"], out["text_feat"], on_device["image_idx"], out["temp"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        bare_step()
    start = time.perf_counter()
    for _ in range(steps):
        bare_step()
    t_bare = (time.perf_counter() - start) / steps
    print(f"train step (demo model, batch {batch_size}, {res}px) on {device}:  bare {t_bare * 1e3:7.1f} ms   "
          f"framework {t_framework * 1e3:7.1f} ms   ratio x{t_framework / t_bare:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=("ranking", "train"), help="run one of the two comparisons")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only != "train":
        bench_ranking(device)
    if args.only != "ranking":
        bench_train_step(device, args.steps)


if __name__ == "__main__":
    main()
