"""What every command shares for showing things: markup escaping, progress bars (on stderr), and the
terminal record sinks of predict (error lines, the streamed table, progress), which take ``Prediction``
records one by one (``vitcli.inference.job.write_records``) like the file writers of ``vitcli.io.records``."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

PROGRESS_MIN_ITEMS = 64  # fewer images than this finish before a bar would tell anything


# Characters that must not reach a terminal as they are: C0/C1 controls and DEL (ESC starts escape
# sequences, CR and BS overwrite what was printed), bidi overrides and isolates (they reorder the text
# around them: "gpj.exe" can show as "exe.jpg"), and lone surrogates (the bytes of a file name that is
# not UTF-8, as Python's surrogateescape keeps them). Each is shown as a Python-style escape.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): the byte itself
        return f"\\x{code - 0xDC00:02x}"
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or (
        f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


def visible(text: object) -> str:
    """``text`` with control characters, bidi controls and non-UTF-8 bytes written as escapes
    (``\\x1b``, ``\\n``, ``\\u202e``, ``\\xff``): one line, shown as it is, whatever it holds."""
    return _UNPRINTABLE.sub(_visible, str(text))


def escape(text: object) -> str:
    """Data (file names, URLs, labels, messages that quote them) as rich text that prints as it is:
    markup escaped (``a[red]b.jpg``, ``[link=...]``) and unprintable characters made visible (``visible``).

    Everything that comes from data and reaches the terminal goes through here; JSON output does not.
    """
    from rich.markup import escape as rich_escape

    return rich_escape(visible(text))


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


class ErrorLines:
    """One ``Error: SOURCE: REASON`` line on stderr per failed record, as it comes."""

    def write(self, record) -> None:
        if not record.ok:
            from vitcli.console import err

            err.print(f"[bold red]Error:[/] {escape(f'{record.source}: {record.error}')}", highlight=False)


class TableSink:
    """The results table on stdout, printed image by image with fixed columns so the rows line up."""

    def __init__(self) -> None:
        self.header = True

    def write(self, record) -> None:
        if not record.ok:
            return
        from rich import box
        from rich.table import Table

        from vitcli.console import out

        table = Table(box=box.SIMPLE_HEAD, show_header=self.header, header_style="bold", show_edge=False,
                      pad_edge=False)
        table.add_column("image", overflow="fold", width=max(16, min(out.width, 160) - 40))
        table.add_column("#", justify="right", width=2)
        table.add_column("label", width=22, overflow="fold")
        table.add_column("prob", justify="right", width=6)
        for label in record.top:
            table.add_row(escape(record.source) if label.rank == 1 else "", str(label.rank), escape(label.label),
                          f"{label.prob:.4f}")
        out.print(table)
        self.header = False


class ProgressSink:
    """A progress bar on stderr (images/s, and the ETA once the inputs are counted) for larger jobs."""

    def __init__(self, job, min_images: int = PROGRESS_MIN_ITEMS, label: str = "predict") -> None:
        self.job = job
        self.label = label
        self.min_images = min_images
        self.progress = None
        self.task = None
        self.total: int | None = None
        if job.countable:  # counted beside the prediction: the first results need not wait for it
            threading.Thread(target=self._count, daemon=True, name="vitcli-count").start()

    def _count(self) -> None:
        try:
            self.total = self.job.count()
        except Exception:  # an unreadable input shows up in the job itself; the bar just has no total
            return
        progress = self.progress  # one read: stop() may clear it meanwhile, from the main thread
        if progress is not None:
            progress.update(self.task, total=self.total)

    def write(self, record) -> None:
        if self.progress is None:
            if max(self.total or 0, self.job.tally.written) < self.min_images:
                return
            self._start()
        self.progress.update(self.task, completed=self.job.tally.written + 1)

    def _start(self) -> None:
        self.progress = _new_progress(self.label)
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=self.total, completed=self.job.tally.written)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    close = stop  # the job closes every sink at its end

