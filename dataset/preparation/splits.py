"""A val split carved from train when the source has none: seeded, deterministic, stratified by scene."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .sources import SourceImage


def carve_val(images: list[SourceImage], strata: list[str], fraction: float, seed: int) -> None:
    """Give every image without a split ``train`` or ``val`` in place.

    Each stratum (scene) sends its share of ``fraction`` to val, rounded so that the total is
    ``round(fraction * n)`` (largest remainders get the extra images, earlier strata win ties); inside a
    stratum the val images are a seeded random choice. Singleton scenes should share one stratum.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val fraction must be between 0 and 1, got {fraction}")
    members: dict[str, list[int]] = defaultdict(list)
    for i, (image, stratum) in enumerate(zip(images, strata)):
        if image.split is None:
            members[stratum].append(i)
    if not members:
        return
    sizes = np.array([len(m) for m in members.values()])
    exact = fraction * sizes
    quota = np.floor(exact).astype(int)
    extra = int(round(fraction * sizes.sum())) - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:extra]] += 1
    rng = np.random.default_rng(seed)
    for indices, take in zip(members.values(), quota):
        chosen = set(rng.permutation(len(indices))[:take].tolist())
        for k, i in enumerate(indices):
            images[i].split = "val" if k in chosen else "train"
