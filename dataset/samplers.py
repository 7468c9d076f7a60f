"""A shuffling sampler whose randomness is a pure function of (seed, epoch, position).

It yields ``(index, sample_seed)`` pairs; the dataset seeds its augmentation from ``sample_seed``.
So the same sample gets the same crop whether it is loaded by 0 or 8 workers, on 1 or 4 processes,
and after a resume, which makes a resumed epoch equal to the uninterrupted one.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class SeededShardSampler(Sampler[tuple[int, int]]):
    """Per-epoch permutation of ``range(n)``, truncated to a multiple of the world size, strided by rank."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.per_rank = n // world_size
        if self.per_rank == 0:
            raise ValueError(f"{n} samples cannot be split over {world_size} processes")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator)[: self.per_rank * self.world_size]
        seeds = torch.randint(0, 2**62, (len(order),), generator=generator)
        mine = slice(self.rank, None, self.world_size)
        return iter(zip(order[mine].tolist(), seeds[mine].tolist()))
