"""The layers import only downwards: utils <- dataset <- models <- optim, scheduler <- Retrieval <- run (so
no import cycle between them), and the model library imports without the trainer (open_clip's library /
trainer split)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINER = {"optim", "scheduler", "Retrieval", "run"}
FORBIDDEN = {"utils": {"dataset", "models", *TRAINER}, "dataset": {"models", *TRAINER}, "models": TRAINER,
             "optim": {"Retrieval", "run"}, "scheduler": {"Retrieval", "run"}}


def top_level_imports(path: Path) -> set[str]:
    """The project packages and modules a file imports (relative imports stay inside their package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def layer_files(layer: str) -> list[Path]:
    folder = ROOT / layer
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [ROOT / f"{layer}.py"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_upwards(layer: str) -> None:
    wrong = {str(path.relative_to(ROOT)): sorted(top_level_imports(path) & FORBIDDEN[layer])
             for path in layer_files(layer)}
    assert not {path: names for path, names in wrong.items() if names}


def test_the_model_library_imports_without_the_trainer() -> None:
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import models; "
              "loaded = sorted(set(sys.modules) & {'optim', 'scheduler', 'Retrieval', 'run'}); "
              "assert not loaded, loaded; print(models.list_models())")
    result = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fisvl" in result.stdout and "swin_bert_cl" in result.stdout
