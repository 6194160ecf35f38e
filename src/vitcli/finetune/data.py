"""The run's data: the layout found once, every image checked once (shared by the ranks), the DataLoaders."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

import torch

from vitcli.distributed import Rank, on_every_rank, on_rank0
from vitcli.errors import DatasetError
from vitcli.finetune.config import FinetuneConfig
from vitcli.finetune.sampling import EpochSampler, seed_worker
from vitcli.inference.batching import default_workers
from vitcli.io.datasets import FolderData, LabeledImages, discover, drop_unreadable

IMBALANCE_HINT_RATIO = 3.0  # max/min images per class above which a --balance hint is given


def prepare_data(config: FinetuneConfig, dist: Rank) -> FolderData:
    """discover() the layout (rank 0; absolute paths), then decode every image once, each rank a slice:
    unreadable ones are skipped (or fatal with --strict). Every rank gets the same FolderData."""
    data = on_rank0(lambda: discover(os.path.abspath(Path(config.data).expanduser()), val_split=config.val_split,
                                     seed=config.seed), dist)
    samples = data.train + data.val
    mine = samples[dist.rank :: dist.world]
    skipped_by_rank = on_every_rank(lambda: drop_unreadable(mine, strict=config.strict)[1], dist)
    reasons = {path: reason for skipped in skipped_by_rank for path, reason in skipped}
    data.train = [s for s in data.train if s[0] not in reasons]
    data.val = [s for s in data.val if s[0] not in reasons]
    data.skipped = [(path, reasons[path]) for path, _ in samples if path in reasons]
    empty = [c for c, n in zip(data.classes, data.counts("train"), strict=True) if n == 0]
    if empty:
        raise DatasetError(f"class(es) with no readable training images: {', '.join(empty)}")
    if not data.val:
        raise DatasetError(f"no readable validation images in '{config.data}'")
    return data


def check_files_exist(data: FolderData) -> None:
    """A resumed run needs every image of its saved split."""
    missing = [p for p, _ in data.train + data.val if not Path(p).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) of the saved split are gone (first: {missing[0]}); "
                           "the run cannot be resumed on changed data")


def data_warnings(data: FolderData, config: FinetuneConfig) -> list[str]:
    warnings = list(data.warnings)
    counts = data.counts("train")
    if config.balance == "none" and min(counts) and max(counts) / min(counts) > IMBALANCE_HINT_RATIO:
        warnings.append(f"classes are imbalanced (largest/smallest = {max(counts) / min(counts):.1f}); "
                        "consider --balance sampler or --balance loss")
    return warnings


def make_loaders(config: FinetuneConfig, data: FolderData, data_config: dict[str, Any], device: torch.device,
                 dist: Rank) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader, EpochSampler]:
    """Train (augmented, seeded, this rank's share) and val loaders, and the train sampler."""
    from vitcli.io.transforms import eval_transform, train_transform

    train_tf = train_transform(data_config, scale=(config.scale_min, 1.0), color_jitter=config.color_jitter,
                               auto_augment=config.randaugment or None)
    weights = None
    if config.balance == "sampler":
        counts = data.counts("train")
        weights = torch.tensor([1.0 / counts[t] for _, t in data.train], dtype=torch.float64)
    sampler = EpochSampler(len(data.train), shuffle=True, weights=weights, seed=config.seed, dist=dist)
    workers = config.workers if config.workers is not None else default_workers()
    # full batches only (BatchNorm needs more than one sample), unless the data is smaller than a batch
    drop_last = sampler.share() >= config.batch_size
    # forked workers inherit the stop-on-signal handler, so Ctrl-C doesn't kill them mid-epoch
    fork = workers > 0 and sys.platform == "linux"
    common = {"num_workers": workers, "pin_memory": device.type == "cuda", "worker_init_fn": seed_worker,
              "multiprocessing_context": "fork" if fork else None}
    train = torch.utils.data.DataLoader(LabeledImages(data.train, train_tf), batch_size=config.batch_size,
                                        sampler=sampler, drop_last=drop_last, generator=torch.Generator(),
                                        **common)
    val_sampler = EpochSampler(len(data.val), shuffle=False, dist=dist, pad=False)
    val = torch.utils.data.DataLoader(LabeledImages(data.val, eval_transform(data_config)),
                                      batch_size=config.batch_size, sampler=val_sampler,
                                      generator=torch.Generator(), **common)
    return train, val, sampler


LEAK_THRESHOLD = 0.95  # cosine of the pre-logits features above which two photos are taken for one


def leak_warnings(config: FinetuneConfig, data: FolderData, loaded: Any, data_config: dict[str, Any],
                  device: torch.device, dist: Rank) -> list[str]:
    """One warning if a validation image nearly duplicates a training one (``vitcli embed TRAIN VAL
    --near-duplicates 0.95``), embedded with the model about to be fine-tuned, before training.

    Every rank embeds its slice of the images in batches (``inference.embed``); the vectors are gathered
    (``on_every_rank``: a failure on one rank stops all) and every rank finds the pairs in tiles.
    """
    import dataclasses

    import numpy as np

    from vitcli.inference.embed import embed, near_duplicates
    from vitcli.inference.predict import PredictOptions

    if not config.leak_check or not data.train or not data.val:
        return []
    samples = [path for path, _ in data.train + data.val]
    options = PredictOptions(batch_size=config.batch_size, workers=config.workers, device=str(device),
                             precision="auto" if config.precision == "auto" else "fp32", fast_decode=False)
    model = dataclasses.replace(loaded, data_config=data_config)  # the size the model was built at
    mine = list(range(dist.rank, len(samples), dist.world))

    def vectors() -> list[tuple[int, np.ndarray]]:
        return [(i, r.vector) for i, r in zip(mine, embed(model, (samples[i] for i in mine), options), strict=True)
                if r.ok]

    rows = [row for part in on_every_rank(vectors, dist) for row in part]
    if not rows:
        return []
    index = np.array([i for i, _ in rows])
    matrix = np.stack([v for _, v in rows])
    groups = (index >= len(data.train)).astype(np.int8)  # 0: train, 1: val
    pairs = list(itertools.islice(near_duplicates(matrix, LEAK_THRESHOLD, groups), 1000))
    if not pairs:
        return []
    a, b = samples[index[pairs[0].a]], samples[index[pairs[0].b]]
    more = "at least 1000" if len(pairs) == 1000 else str(len(pairs))
    return [f"{more} train/val pair(s) look like the same photo (cosine >= {LEAK_THRESHOLD} with {config.model}), "
            f"e.g. {a} and {b} (cosine {pairs[0].cosine:.3f}); validation scores will flatter the model. "
            f"List them with `vitcli embed TRAIN VAL --near-duplicates {LEAK_THRESHOLD}` and remove them from "
            "one split (--no-leak-check: no check)"]
