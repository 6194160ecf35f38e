"""Record sinks for the terminal, shared by the predict paths: error lines, the streamed table, progress.

Each takes ``Prediction`` records one by one (``vitcli.streaming.write_records``), like the file
writers of ``vitcli.records``.
"""

from __future__ import annotations

import threading


class ErrorLines:
    """One ``Error: SOURCE: REASON`` line on stderr per failed record, as it comes."""

    def write(self, record) -> None:
        if not record.ok:
            from rich.markup import escape

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
            table.add_row(record.source if label.rank == 1 else "", str(label.rank), label.label, f"{label.prob:.4f}")
        out.print(table)
        self.header = False


class ProgressSink:
    """A progress bar on stderr (images/s, and the ETA once the inputs are counted) for larger jobs."""

    def __init__(self, job, min_images: int = 64) -> None:
        self.job = job
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
        if self.progress is not None:
            self.progress.update(self.task, total=self.total)

    def write(self, record) -> None:
        if self.progress is None:
            if max(self.total or 0, self.job.tally.written) < self.min_images:
                return
            self._start()
        speed = self.progress.tasks[0].speed  # rich's own estimate over the last 30 s
        self.progress.update(self.task, completed=self.job.tally.written + 1,
                             rate=f"{speed:.1f} img/s" if speed else "")

    def _start(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from vitcli.console import err

        columns = [TextColumn("predict"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
        self.progress = Progress(*columns, console=err, transient=True)
        self.progress.start()
        self.task = self.progress.add_task("predict", total=self.total, completed=self.job.tally.written, rate="")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

