"""vitcli.cli.render: markup escaping and the progress bar, rendered on a real (forced) terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import vitcli.console
from vitcli.cli.render import escape, progress_bar


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    """stderr as a 100-column colour terminal writing into a buffer (CliRunner's streams are no terminal)."""
    buffer = io.StringIO()
    monkeypatch.setattr(vitcli.console, "err", Console(file=buffer, force_terminal=True, width=100))
    return buffer


def test_escape_keeps_brackets_in_file_names():
    assert Console().render_str(escape("photos/[draft] cat.jpg")).plain == "photos/[draft] cat.jpg"


def test_the_bar_shows_progress_and_rate_for_a_large_job(terminal):
    with progress_bar("predict", min_total=64) as update:
        for done in (32, 64, 96, 128):
            update(done, 128)

    text = terminal.getvalue()
    assert "predict" in text and "128/128" in text and "img/s" in text
    assert "\x1b[" in text  # drawn with terminal control codes, as on a real terminal


def test_no_bar_for_a_small_job_and_an_open_ended_bar_for_an_unknown_total(terminal):
    with progress_bar("predict", min_total=64) as update:
        update(10, 20)
    assert terminal.getvalue() == ""

    with progress_bar("predict", min_total=64) as update:
        update(40, None)
    assert "40/?" in terminal.getvalue()
