"""Helpers shared by the fine-tuning tests: image folders, a small config, a callback recorder."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import make_image
from vitcli.finetune.config import FinetuneConfig

SMALL = 64  # train test_vit at 64x64 (pos_embed resampled from its 160): fast on two cores


def class_folders(root: Path, counts: dict[str, int], ext: str = "png", seed: int = 0) -> Path:
    """root/<class>/<i>.<ext> random-noise images."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            make_image(root / name / f"{i}.{ext}", size=(40, 32), seed=seed + 100 * c + i)
    return root


def config(tmp_path: Path, data: Path | str, model: Path | str, **overrides) -> FinetuneConfig:
    base = {"data": str(data), "model": str(model), "img_size": SMALL, "epochs": 1, "batch_size": 4,
            "workers": 0, "precision": "fp32", "project": str(tmp_path / "runs"), "warmup_epochs": 0.5}
    return FinetuneConfig(**(base | overrides))


class Recorder:
    """A fit() callback that keeps the events (and can raise a signal at a chosen one)."""

    def __init__(self, signal_at: tuple[str, int] | None = None):
        self.events: list[tuple[str, dict]] = []
        self.signal_at = signal_at

    def __call__(self, event: str, info: dict) -> None:
        self.events.append((event, info))
        if self.signal_at is None:
            return
        kind, n = self.signal_at
        if event == kind and (info.get("global_step") == n or info.get("row", {}).get("epoch") == n):
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: fit() stops at the next step boundary

    def first(self, event: str) -> dict:
        return next(info for e, info in self.events if e == event)
