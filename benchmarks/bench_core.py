"""Speed of the core against plain references, side by side in one run.

1. Ranking: ``retrieval_metrics`` (vectorised) against a per-query NumPy loop (X-VLM's ``itm_eval``
   with a stable sort) on RSICD-sized scores, 1,093 images x 5,465 captions; both give the same numbers.
2. Training step: the framework's ``train_one_epoch`` (task module, objective with gathering hooks,
   autocast context, scaler, scheduler, loss bookkeeping, progress line) against a bare
   forward + loss + backward + AdamW step of the same model on the same batch.

    python benchmarks/bench_core.py [--steps 20] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import build_model  # noqa: E402
from models.losses import contrastive_loss  # noqa: E402
from models.objective import build_objective  # noqa: E402
from models.task import RetrievalTask  # noqa: E402
from optim import create_optimizer  # noqa: E402
from Retrieval import train_one_epoch  # noqa: E402
from scheduler import create_scheduler  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.metrics import retrieval_metrics  # noqa: E402
from utils.precision import grad_scaler  # noqa: E402


def per_query_loop(sims: np.ndarray, img2txt: list[list[int]], txt2img: list[int]) -> dict[str, float]:
    ranks_i2t = np.array([min(np.where(np.argsort(-row, kind="stable") == c)[0][0] for c in img2txt[i])
                          for i, row in enumerate(sims)])
    ranks_t2i = np.array([np.where(np.argsort(-col, kind="stable") == txt2img[c])[0][0] for c, col in enumerate(sims.T)])
    out = {f"txt_r{k}": 100.0 * np.mean(ranks_i2t < k) for k in (1, 5, 10)}
    out.update({f"img_r{k}": 100.0 * np.mean(ranks_t2i < k) for k in (1, 5, 10)})
    out["r_mean"] = float(np.mean(list(out.values())))
    return out


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
    fast = retrieval_metrics(sims, img2txt, txt2img)
    slow = per_query_loop(sims.cpu().numpy(), img2txt, txt2img)
    assert all(abs(fast[k] - slow[k]) < 1e-9 for k in slow), (fast, slow)
    t_fast = time_call(lambda: retrieval_metrics(sims, img2txt, txt2img), 5)
    t_slow = time_call(lambda: per_query_loop(sims.cpu().numpy(), img2txt, txt2img), 2)
    print(f"ranking 1093 x 5465 on {device}:  per-query loop {t_slow * 1e3:8.1f} ms   "
          f"retrieval_metrics {t_fast * 1e3:8.1f} ms   speed-up x{t_slow / t_fast:.1f}   (same metrics)")


def bench_train_step(device: torch.device, steps: int) -> None:
    config = load_config(ROOT / "configs" / "demo_baseline.yaml", ["print_freq=1000000"])
    batch_size, res = config["batch_size_train"], config["image_res"]
    gen = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(batch_size, 3, res, res, generator=gen),
             "input_ids": torch.randint(5, 190, (batch_size, 16), generator=gen),
             "attention_mask": torch.ones(batch_size, 16, dtype=torch.long),
             "image_idx": torch.arange(batch_size) // 5, "label": torch.zeros(batch_size, dtype=torch.long)}

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = build_model(config, pretrained=False).to(device).train()
        return model, create_optimizer(config["optimizer"], model)

    model, optimizer = fresh()
    task = RetrievalTask(model, build_objective(config))
    scheduler = create_scheduler(config["schedular"], optimizer, steps)
    scaler = grad_scaler(config["precision"], device)
    train_one_epoch(task, [batch] * 3, optimizer, scheduler, scaler, 0, config, device)  # warm-up
    start = time.perf_counter()
    train_one_epoch(task, [batch] * steps, optimizer, scheduler, scaler, 0, config, device)
    t_framework = (time.perf_counter() - start) / steps

    model, optimizer = fresh()
    on_device = {k: v.to(device) for k, v in batch.items()}

    def bare_step() -> None:
        out = model(on_device["images"], on_device["input_ids"], on_device["attention_mask"])
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
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_ranking(device)
    bench_train_step(device, args.steps)


if __name__ == "__main__":
    main()
