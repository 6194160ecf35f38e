"""What every command shares for showing things: markup escaping and progress bars (on stderr)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

PROGRESS_MIN_ITEMS = 64  # fewer images than this finish before a bar would tell anything


def escape(text: str) -> str:
    """``text`` with rich markup escaped: file names like ``[draft].jpg`` print as they are."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


@contextlib.contextmanager
def progress_bar(label: str, min_total: int = PROGRESS_MIN_ITEMS) -> Iterator[Callable[[int, int | None], None]]:
    """A callback ``update(done, total)`` drawing a transient bar on stderr: done/total, images per
    second and the time left. Nothing is drawn for a known total under ``min_total``; a total of None
    (not known yet) draws a bar without an end."""
    state: dict[str, Any] = {}

    def update(done: int, total: int | None) -> None:
        if not state:
            if total is not None and total < min_total:
                return
            state["progress"] = progress = _new_progress(label)
            progress.start()
            state["task"] = progress.add_task(label, total=total)
        state["progress"].update(state["task"], completed=done, total=total)

    try:
        yield update
    finally:
        if state:
            state["progress"].stop()


def _new_progress(label: str) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    from vitcli.console import err

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:  # rich's own speed estimate, in images
            return Text(f"{task.speed:.1f} img/s" if task.speed else "… img/s", style="progress.data.speed")

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
                    console=err, transient=True)
