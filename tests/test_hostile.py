"""Hostile and unlucky inputs (issue 14): nothing lost, nothing injected, bounded work per input.

Each test here failed on the code before its fix. The memory tests measure the peak RSS of a real
child process (``resource.getrusage(RUSAGE_CHILDREN)``), not a mock.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_LABELS, make_image
from vitcli.cli.app import app

runner = CliRunner()


def invoke(*args: object, input: str | bytes | None = None):
    return runner.invoke(app, [a if isinstance(a, str) else os.fsdecode(a) for a in args], input=input)


def predict_tiny(model: Path, *args: object, input: str | bytes | None = None):
    return invoke("predict", *args, "--model", str(model), "--workers", "0", input=input)


@pytest.fixture(scope="module")
def markup_model_dir(tmp_path_factory) -> Path:
    """test_vit whose label names are rich markup and terminal controls (as a hostile model file carries)."""
    import timm
    import torch

    from vitcli.models.resolve import save_model_folder

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)
    labels = ["[link=http://evil.example]click[/link]", "a[/]b", "esc\x1b[31mred"]
    return save_model_folder(model.eval(), tmp_path_factory.mktemp("models") / "markup", labels)


# ------------------------------------------------------------------- item 8: data printed as text


def test_escape_shows_markup_controls_bidi_and_foreign_bytes_as_text():
    from rich.console import Console

    from vitcli.cli._render import escape

    def shown(text: str) -> str:
        return Console().render_str(escape(text)).plain

    assert shown("a[red]b.jpg") == "a[red]b.jpg"
    assert shown("x[/b]y.jpg") == "x[/b]y.jpg"
    assert shown("[link=http://evil]c[/link]") == "[link=http://evil]c[/link]"
    assert shown("e\x1b[31mred\r\n") == "e\\x1b[31mred\\r\\n"
    assert shown("\u202egpj.exe") == "\\u202egpj.exe"  # a bidi override would show "exe.jpg"
    assert shown(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"


def test_names_and_labels_from_data_print_as_text(markup_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["a[red]b.png", "x[/b]y.png", "[link=http:]c.png", "e\x1b[31mr.png"]
    for i, name in enumerate(names):
        make_image(Path(name), seed=i)

    result = predict_tiny(markup_model_dir, *names, "--top-k", "3")

    assert result.exit_code == 0, result.output
    stdout = result.stdout
    assert "\x1b" not in stdout  # neither the name's nor the label's ESC reaches the terminal
    for shown in ("a[red]b.png", "x[/b]y.png", "[link=http:]c.png", "e\\x1b[31mr.png",
                  "[link=http://evil.exam", "a[/]b", "esc\\x1b[31mred"):
        assert shown in stdout, (shown, stdout)


def test_error_lines_stay_one_line_and_show_what_the_name_holds(tiny_model_dir, tmp_path):
    bad = tmp_path / "no\nsuch\x1b(/).jpg"

    result = predict_tiny(tiny_model_dir, bad)

    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "no\\nsuch\\x1b(/).jpg: no such file or directory" in result.stderr


def test_the_resume_notice_the_finetune_report_and_weights_list_print_names_as_text(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from vitcli.cli import finetune as finetune_cli
    from vitcli.finetune.rundir import RunResult

    monkeypatch.chdir(tmp_path)
    make_image(Path("a.png"))
    assert predict_tiny(tiny_model_dir, "a.png", "-o", "o[/]ut.jsonl").exit_code == 0
    rerun = predict_tiny(tiny_model_dir, "a.png", "-o", "o[/]ut.jsonl")
    assert rerun.exit_code == 0, rerun.output
    assert "o[/]ut.jsonl: 1 sources already done" in rerun.stderr

    shutil.copytree(tiny_model_dir, tmp_path / "store" / "w[red]x")
    listed = invoke("weights", "list")
    assert listed.exit_code == 0, listed.output
    assert "w[red]x" in listed.stdout, listed.stderr

    finetune_cli._report(RunResult(Path("runs/p[/]"), 0.5, 1, 1, 10, "done"))  # --project 'runs/p[/]'
    assert "run folder: runs/p[/]" in capsys.readouterr().out


# ------------------------------------------------------ item 10: names that are not UTF-8


@pytest.mark.skipif(os.name != "posix", reason="file names as bytes")
def test_names_that_are_not_utf8_round_trip_in_every_format(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = Path("imgs")
    make_image(folder / "plain.png")
    raw = b"imgs/caf\xe9.png"
    make_image(Path(os.fsdecode(raw)), seed=1)
    Path("list.txt").write_bytes(raw + b"\n" + b"imgs/gone\xff.png\n")

    first = predict_tiny(tiny_model_dir, folder, "-o", "out.csv", "--csv", "also.csv")
    again = predict_tiny(tiny_model_dir, folder, "-o", "out.csv")
    listed = predict_tiny(tiny_model_dir, "--files-from", "list.txt", "--json")

    assert first.exit_code == 0, first.output
    assert raw in Path("out.csv").read_bytes() and raw in Path("also.csv").read_bytes()
    assert again.exit_code == 0, again.output
    assert "2 sources already done" in again.stderr
    assert Path("out.csv").read_bytes().count(raw) == len(TINY_LABELS)  # its 3 rows, written once
    assert listed.exit_code == 1  # the second line names no file: a per-input error, not a crash
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [os.fsencode(r["source"]) for r in records] == [raw, b"imgs/gone\xff.png"]
    assert records[0]["error"] is None and records[1]["error"] == "no such file or directory"
    assert "imgs/gone\\xff.png: no such file or directory" in listed.stderr
