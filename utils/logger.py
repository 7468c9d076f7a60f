"""Console and file logging, the training progress line (ETA, samples/s) and TensorBoard scalars."""
from __future__ import annotations

import datetime
import logging
import resource
import sys
import time
from pathlib import Path

import torch


def setup_logging(output_dir: Path | None, is_main: bool) -> None:
    """INFO to the console on rank 0 (warnings only elsewhere), and everything to ``output_dir/run.log``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if output_dir is not None and is_main:
        file_handler = logging.FileHandler(output_dir / "run.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    for noisy in ("PIL", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_failure(err: BaseException) -> None:
    """Write the error that stops a run, with its traceback, to ``run.log`` (the console already gets it
    from Python), so the run folder says why the run ended."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return
    what = "interrupted" if isinstance(err, KeyboardInterrupt) else "stopped by an error"
    record = logging.getLogger("retrieval").makeRecord("retrieval", logging.ERROR, __file__, 0,
                                                       f"the run {what}: {type(err).__name__}: {err}", (),
                                                       (type(err), err, err.__traceback__))
    for handler in files:
        handler.handle(record)


def max_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress:
    """Prints ``[step/total] eta ... samples/s ...`` every ``print_freq`` steps (X-VLM's MetricLogger line)."""

    def __init__(self, header: str, total: int, print_freq: int, global_batch: int, device: torch.device) -> None:
        self.header, self.total, self.print_freq = header, total, print_freq
        self.global_batch, self.device = global_batch, device
        self.start = self.last = time.time()
        self.data_time = 0.0
        self.log = logging.getLogger("train")

    def data_loaded(self) -> None:
        self.data_time += time.time() - self.last

    def step(self, step: int, values: dict[str, float]) -> None:
        """Call after step ``step`` (0-based) finished; prints on the first, every ``print_freq``-th and the last."""
        now = time.time()
        self.last = now
        done = step + 1
        if not (step % self.print_freq == 0 or done == self.total):
            return
        elapsed = now - self.start
        eta = datetime.timedelta(seconds=int(elapsed / done * (self.total - done)))
        rate = done * self.global_batch / max(elapsed, 1e-9)
        shown = "  ".join(f"{k}: {v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{k}: {v:.2e}" for k, v in values.items())
        self.log.info(f"{self.header} [{done:>{len(str(self.total))}}/{self.total}]  eta: {eta}  {shown}  "
                      f"samples/s: {rate:.1f}  time/it: {elapsed / done:.3f}s  data: {self.data_time / done:.3f}s  "
                      f"max mem: {max_memory_mb(self.device):.0f}MB")

    @property
    def elapsed(self) -> float:
        return time.time() - self.start


class TensorBoard:
    """Scalars per epoch and per step on rank 0; a no-op elsewhere. ``purge_step`` drops events a resume repeats."""

    def __init__(self, log_dir: Path | None, purge_step: int | None = None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
