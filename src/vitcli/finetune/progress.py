"""Where a fine-tuning run is and how it has gone (``Progress``, saved in state.pt), and what it produced."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

MIN_DELTA = 1e-4  # a val loss lower by less than this is no improvement (patience, best/)


@dataclass
class Progress:
    """What state.pt remembers besides the modules: where the run is and how it has gone."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches of that epoch already trained on
    global_step: int = 0
    loss_sum: float = 0.0  # running train loss of the epoch in progress
    images: int = 0
    train_time: float = 0.0
    best_top1: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best (patience)
    best_confusion: list[list[int]] = field(default_factory=list)  # the best model's, on val
    rows: list[dict[str, float]] = field(default_factory=list)
    # the best-so-far fields as they were before a --max-steps stop's partial evaluation: when that epoch
    # is evaluated again (finished, or stopped later), the partial one is undone, so it never counts twice
    before_partial: dict[str, Any] = field(default_factory=dict)

    def record(self, row: dict[str, float], metrics: dict[str, Any], finished: bool) -> bool:
        """Add an epoch's row (replacing the partial one of a --max-steps stop); whether it is the best so far.

        Better is a higher top-1, or the same top-1 at a clearly lower loss (small val sets tie often).
        ``finished``: the epoch ran to its end, so the next one starts from its beginning. A partial
        evaluation does not count for patience, and becomes the best only where there is none yet (a
        first epoch cut short: best/ then exists); the epoch's final evaluation replaces it either way.
        """
        if self.rows and self.rows[-1]["epoch"] == row["epoch"]:
            self.rows.pop()
            self._undo_partial()
        self.rows.append(row)
        better = metrics["val_top1"] > self.best_top1 or (
            metrics["val_top1"] == self.best_top1 and metrics["val_loss"] < self.best_loss - MIN_DELTA)
        if not finished:
            self.before_partial = {k: getattr(self, k) for k in BEST_FIELDS}
            better = better and self.best_epoch == 0
        if better:
            self.best_top1, self.best_loss = metrics["val_top1"], metrics["val_loss"]
            self.best_epoch, self.bad_epochs = int(row["epoch"]), 0
            self.best_confusion = metrics["confusion"].tolist()
        elif finished:
            self.bad_epochs += 1
        if finished:
            self.epoch, self.batch = int(row["epoch"]), 0
            self.loss_sum, self.images, self.train_time = 0.0, 0, 0.0
        else:  # max_steps: the row covers the part of the epoch that was trained
            self.rows[-1]["partial"] = 1.0
        return better

    def _undo_partial(self) -> None:
        """Put back the best-so-far fields as they were before this epoch's partial evaluation."""
        for k, v in self.before_partial.items():
            setattr(self, k, v)
        self.before_partial = {}


BEST_FIELDS = ("best_top1", "best_loss", "best_epoch", "bad_epochs", "best_confusion")


@dataclass
class RunResult:
    """What a finished (or early-stopped) run produced."""

    run_dir: Path
    best_top1: float
    best_epoch: int  # 1-based; 0 if no epoch was evaluated
    epochs_done: int
    global_step: int
    stopped: str  # "done", "patience" or "max_steps"
    rows: list[dict[str, float]] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)  # the final model, as saved in last/

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "best"
