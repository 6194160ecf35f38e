"""The root ``vitcli`` app: --version and the command table. Imports no torch/timm."""

from __future__ import annotations

import warnings
from typing import Annotated

import typer

from vitcli import __version__
from vitcli.cli import benchmark, calibrate, embed, evaluate, export, finetune, patches, predict, weights

app = typer.Typer(
    name="vitcli",
    help="Classify images, fine-tune, inspect and export Vision Transformers (built on timm).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"vitcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """vitcli: image classification with Vision Transformers."""


app.command("predict")(predict.predict)
app.command("evaluate")(evaluate.evaluate)
app.command("calibrate")(calibrate.calibrate)
app.command("embed")(embed.embed)
app.command("finetune")(finetune.finetune)
app.command("patches")(patches.patches)
app.command("export")(export.export)
app.command("benchmark")(benchmark.benchmark)
app.add_typer(weights.app, name="weights")


def main() -> None:
    # an image over Pillow's pixel limit gets vitcli's own one-line error; Pillow's warning would repeat it
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    app()
