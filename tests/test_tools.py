"""Command-line tools run as a user runs them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_make_demo_data_writes_dataset_and_montage(tmp_path: Path) -> None:
    montage = tmp_path / "sheet.png"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_data.py"), "--root", str(tmp_path / "demo"),
                    "--train-per-class", "1", "--val-per-class", "1", "--test-per-class", "1", "--image-size", "32",
                    "--montage", str(montage)], check=True, cwd=tmp_path, timeout=120)
    assert (tmp_path / "demo" / "demo_test.json").is_file() and (tmp_path / "demo" / "tokenizer" / "vocab.txt").is_file()
    with Image.open(montage) as sheet:
        assert sheet.size == (5 * 128, 2 * 128)
