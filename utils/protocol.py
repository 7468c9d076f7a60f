"""The evaluation protocols a run reports.

``select_on_val`` (this project's): ``checkpoint_best.pth`` is chosen on val and test is reported for it.
``mean_of_last_epochs_on_test`` adds SIRS's paper protocol (Zhu et al., TGRS 2024; ``last_num_epochs_val``):
test is evaluated in each of the last N epochs and the mean of those N evaluations is reported. It exists to
compare with the paper's numbers and is labelled so everywhere: it averages test scores of epochs chosen by
their position, it selects no model. Val is still evaluated every epoch and still picks the checkpoint.

Imports no torch: the launcher's summary of repeated runs reads the entry too.
"""
from __future__ import annotations

import re
import statistics
from typing import Any

from utils.config import ConfigError

PAPER_PROTOCOL = "mean_of_last_epochs_on_test"
_ENTRY = re.compile(r"test_mean_of_last_(\d+)_epochs")


def check_protocol(config: dict[str, Any], source: str) -> None:
    """Fail before any data or model is built on a last-epochs count the run cannot have."""
    if config["protocol"] != PAPER_PROTOCOL:
        return
    n, epochs = config["protocol_last_epochs"], config["schedular"]["epochs"]
    if not 1 <= n <= epochs:
        raise ConfigError(f"{source}: key 'protocol_last_epochs': protocol {PAPER_PROTOCOL} averages the test "
                          f"evaluations of the last N epochs, so N must lie in 1..{epochs} (schedular.epochs), "
                          f"got {n}")


def paper_epochs(config: dict[str, Any]) -> range:
    """The epochs the paper protocol evaluates on test and averages (none under ``select_on_val``)."""
    if config["protocol"] != PAPER_PROTOCOL:
        return range(0)
    epochs = config["schedular"]["epochs"]
    return range(epochs - config["protocol_last_epochs"], epochs)


def entry_name(n: int) -> str:
    """The closing line's (and ``summary.json``'s) key of the paper protocol's mean."""
    return f"test_mean_of_last_{n}_epochs"


def entry_names(record: dict[str, Any]) -> list[str]:
    """The paper-protocol entries a closing line or a run's results hold."""
    return [name for name in record if _ENTRY.fullmatch(name)]


def label(name: str) -> str:
    """How a printed table names an entry: never to be mistaken for a selected model's score."""
    n = _ENTRY.fullmatch(name).group(1)
    return f"paper protocol (SIRS): mean of the last {n} epochs on test — not a model selection"


def mean_of_last_epochs(history: list[dict[str, Any]], epochs: range) -> dict[str, float]:
    """The mean over ``epochs`` of every numeric ``test_*`` value their log records hold (the recalls and
    ``r_mean``, and whatever else an epoch logs on test), keyed without the ``test_`` prefix."""
    records = [record for record in history if record["epoch"] in epochs]
    tested = [record["epoch"] for record in records if "test_r_mean" in record]
    if tested != list(epochs):
        raise ValueError(f"protocol {PAPER_PROTOCOL} averages test over epochs {list(epochs)}, but only epochs "
                         f"{tested} of them were evaluated on test (was the run resumed from one made with "
                         f"another protocol and eval_test_every_epoch: false?)")
    keys = [key for key, value in records[0].items() if key.startswith("test_")
            and isinstance(value, (int, float)) and not isinstance(value, bool)
            and all(key in record for record in records)]
    return {key.removeprefix("test_"): statistics.fmean(record[key] for record in records) for key in keys}
