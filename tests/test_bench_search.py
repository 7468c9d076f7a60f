"""benchmarks/bench_search.py runs end to end on small sizes: exact search is its own reference (recall 1), the
approximate indexes find most of the exact top 10 on clustered data, and the indexing row counts every demo image
(the timings are not checked)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from conftest import ROOT


def test_the_table_rows_and_the_indexing_throughput(demo_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "benchmarks" / "bench_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--sizes", "3000", "--centres", "30", "--queries", "200", "--single", "5", "--batches", "2",
                 "--workers", "0", "--demo_root", str(demo_root)])
    out = capsys.readouterr().out
    rows = {m[0]: m for m in re.findall(r"^\| 3,000 \| (\w+) \(.*\) \| [\d.]+ s \| .* \| ([\d.]+)x \| .* \| ([\d.]+) \|$",
                                         out, flags=re.M)}
    assert rows.keys() == {"flat", "hnsw", "ivf"}, out
    assert rows["flat"][1:] == ("1.0", "1.000")
    assert float(rows["hnsw"][2]) > 0.9 and float(rows["ivf"][2]) > 0.9
    assert re.search(r"^\| `tools/search.py index` \(120 demo images, .*\) \| [\d.]+ s \| \d+ images/s \|$", out,
                     flags=re.M), out
