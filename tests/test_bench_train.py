"""benchmarks/bench_train.py runs end to end: every model's table with the fp32 and amp_bf16 rows, a skipped
variant with its reason, and the evaluation table (the demo configs' tiny models stand in for the paper-size
ones, whose steps take tens of seconds on a CPU; the timings are not checked)."""
from __future__ import annotations

import importlib.util
import re
import sys
from types import ModuleType

import pytest
import torch

from conftest import ROOT


def bench_train() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_model_gets_its_variants_and_evaluation(capsys: pytest.CaptureFixture[str]) -> None:
    bench = bench_train()
    demo = bench.DEMO_MODELS
    variants = bench.VARIANTS[:3]  # fp32, amp_bf16, + fused AdamW
    bench.run(demo, torch.device("cpu"), {name: 4 for name in demo}, steps=1, warmup=1, variants=variants,
              skipped={variants[2].name: "not in this test"}, n_images=4, captions_per_image=5)
    out = capsys.readouterr().out
    assert "resident memory" in out
    for name in demo:
        table = out.split(f"\n{name}: training step")[1].split("\n\n")[0]
        losses = [float(re.match(rf"{variant}\s+[\d.]+\s+[\d.]+x\s+-?\d+\s+([\d.]+)$", line).group(1))
                  for variant, line in zip(("fp32", "amp_bf16"), table.splitlines()[2:4])]
        assert losses[0] == pytest.approx(losses[1], rel=0.05)  # the same batch and weights in both precisions
        assert "+ fused AdamW          skipped: not in this test" in table
        assert re.search(rf"\n{name}\s+[\d.]+\s+[\d.]+\s+[\d.]+x", out.split("evaluation, 4 images x 20 captions")[1])
