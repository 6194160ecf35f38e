"""Stopping a run: Ctrl-C/SIGTERM at the next optimizer step, and the messages of an interrupted or NaN stop."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitcli.errors import NonFiniteLossError, TrainingInterrupted
from vitcli.finetune.config import STATE_FILE, FinetuneConfig
from vitcli.finetune.progress import Progress


def non_finite(e: NonFiniteLossError, run_dir: Path, epoch: int) -> NonFiniteLossError:
    """The NaN/inf error with where the last good state is and what to try."""
    kept = (f"the last good state is kept in {run_dir / STATE_FILE} ({run_dir / 'last'} has its weights)"
            if (run_dir / STATE_FILE).is_file() else "no state was saved yet")
    return NonFiniteLossError(f"{e} (epoch {epoch + 1}); the run stopped and {kept}. Try a lower --lr, "
                              "--precision fp32 or a smaller --clip-grad")


def interrupted(config: FinetuneConfig, run_dir: Path, progress: Progress, signum: int) -> TrainingInterrupted:
    """The Ctrl-C/SIGTERM error: where the run stopped and the command that resumes it."""
    where = (f"in epoch {progress.epoch + 1} after batch {progress.batch}" if progress.batch
             else f"after epoch {progress.epoch}")
    data = f"{config.data} " if config.data else ""
    return TrainingInterrupted(
        f"interrupted {where} (step {progress.global_step}); the state is saved in {run_dir}. "
        f"Resume with: vitcli finetune {data}--resume {run_dir}",
        run_dir, exit_code=128 + (signum or signal.SIGINT))


class StopFlag:
    """The signal that asked the run to stop (0: none yet)."""

    def __init__(self) -> None:
        self.signal = 0

    def requested(self) -> bool:
        return self.signal != 0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """SIGINT/SIGTERM ask the loop to stop at the next optimizer step; a second Ctrl-C aborts at once.

    DataLoader workers forked meanwhile inherit the handler, so they keep serving until the loop stops.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
