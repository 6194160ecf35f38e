"""vitcli.finetune.sampling: the epoch sampler and the RNG state."""

from __future__ import annotations

import torch

from vitcli.distributed import Rank
from vitcli.finetune.sampling import EpochSampler, rng_state, set_rng_state


def test_weighted_sampler_draws_classes_equally():
    targets = [0] * 90 + [1] * 10
    weights = torch.tensor([1 / 90 if t == 0 else 1 / 10 for t in targets], dtype=torch.float64)
    sampler = EpochSampler(len(targets), shuffle=True, weights=weights, seed=0)
    drawn = [targets[i] for i in sampler]
    assert len(drawn) == 100 and 35 <= sum(drawn) <= 65


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_shards_ranks():
    a, b = EpochSampler(10, shuffle=True, seed=1), EpochSampler(10, shuffle=True, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    b.set_epoch(4)
    assert list(a) != list(b)
    b.set_epoch(3, start=4)
    assert list(b) == list(a)[4:]
    ranks = [EpochSampler(10, shuffle=True, seed=1, dist=Rank(r, r, 2)) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert sorted(list(ranks[0]) + list(ranks[1])) == list(range(10))
    val = [EpochSampler(5, shuffle=False, dist=Rank(r, r, 2), pad=False) for r in range(2)]
    assert sorted(list(val[0]) + list(val[1])) == list(range(5))  # no duplicates in evaluation


def test_rng_state_survives_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
