"""Sample order and randomness: the epoch sampler (a function of seed and epoch) and the RNG state for --resume."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vitcli.distributed import Rank


class EpochSampler(torch.utils.data.Sampler[int]):
    """This rank's share of one epoch's sample order, a function of (seed, epoch) alone.

    Shuffled, or drawn with replacement in proportion to ``weights`` (class balancing); in training
    the order is padded so every rank gets as many samples. ``set_epoch(epoch, start)`` skips the
    first ``start`` samples of this rank's share (a resumed, interrupted epoch).
    """

    def __init__(self, size: int, *, shuffle: bool, weights: torch.Tensor | None = None, seed: int = 0,
                 dist: Rank = Rank(), pad: bool = True):
        self.size, self.shuffle, self.weights, self.seed = size, shuffle, weights, seed
        self.dist, self.pad = dist, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def share(self) -> int:
        """Samples this rank sees in a whole epoch."""
        if self.pad:
            return math.ceil(self.size / self.dist.world)
        return len(range(self.dist.rank, self.size, self.dist.world))

    def __len__(self) -> int:
        return max(self.share() - self.start, 0)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = self.share() * self.dist.world if self.pad else self.size
        if self.weights is not None:
            order = torch.multinomial(self.weights, total, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        if len(order) < total:  # pad by repeating the start of the order
            order = torch.cat([order, order[: total - len(order)]])
        mine = order[self.dist.rank :: self.dist.world]
        return iter(mine[self.start :].tolist())


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy and random follow the torch seed the loader gave this worker."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def seed_everything(seed: int) -> None:
    """python, numpy and torch seeded alike."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch: distinct per (seed, epoch, rank), the same on every resume."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**63


def rng_state() -> dict[str, Any]:
    """python, numpy, torch and CUDA RNG states as tensors and plain containers (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (CUDA only when the device count still matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
