"""The temperature of a finished run: fitted on its validation split for best/ and last/, stored in
their config.json (``vitcli.calibration``). Runs at the end of ``fit``, of a resumed run too."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from vitcli.calibration import Calibration, calibrate_logits, store_temperature
from vitcli.devices import autocast
from vitcli.distributed import Rank, on_every_rank, on_rank0
from vitcli.errors import first_line
from vitcli.models.folders import RUN_MODEL_NAMES


@torch.inference_mode()
def val_logits(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
               precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's fp32 logits (N, C) and targets (N,) on the CPU. No collective: a failure here is
    shared by ``on_every_rank``, not left in an all_reduce."""
    model.eval()
    logits, targets = [], []
    for images, target in batches:
        with autocast(device, precision):
            out = model(images.to(device, non_blocking=True))  # (B, C)
        logits.append(out.float().cpu())
        targets.append(target.cpu())
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(targets)


def calibrate_run(run_dir: Path, model: nn.Module, classes: list[str],
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, precision: str,
                  dist: Rank) -> dict[str, Calibration]:
    """Fit and store the temperature of best/ and last/ on the validation ``batches``.

    ``model`` holds the last weights (what last/ has); best/'s are loaded into a copy. Every rank
    scores its share, rank 0 fits and writes. An empty or one-class split, or one that cannot be
    scored, stores nothing and gives the reason (``Calibration.reason``).
    """
    from safetensors.torch import load_file

    fitted: dict[str, Calibration] = {}
    for name in RUN_MODEL_NAMES:
        folder = run_dir / name
        weights = folder / "model.safetensors"
        if not weights.is_file():
            continue

        def mine(folder: Path = folder, weights: Path = weights) -> tuple[torch.Tensor, torch.Tensor]:
            scored = model
            if folder.name != "last":
                scored = copy.deepcopy(model)
                scored.load_state_dict(load_file(weights, device=str(device)))
            return val_logits(scored, batches, device, precision)

        try:
            shares = on_every_rank(mine, dist)
        except Exception as e:  # the same on every rank: each skips the same way
            fitted[name] = Calibration(None, f"the validation split could not be scored ({first_line(e)})")
            continue
        logits = torch.cat([x for x, _ in shares if len(x)]) if any(len(x) for x, _ in shares) else torch.zeros(0, 0)
        targets = torch.cat([t for _, t in shares])
        result = calibrate_logits(logits, targets, classes)
        if result.temperature is not None:
            on_rank0(lambda folder=folder, t=result.temperature: store_temperature(folder, t), dist)
            result.folders = [str(folder)]
        fitted[name] = result
    return fitted
