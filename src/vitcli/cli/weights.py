"""`vitcli weights`: the local model store (pull a hub model into it, list what is there)."""

from __future__ import annotations

from typing import Annotated

import typer

from vitcli.cli.errors import handled_errors
from vitcli.cli.options import JsonOpt
from vitcli.cli.render import escape

app = typer.Typer(help="The local model store (weights/, or $VITCLI_WEIGHTS): load models offline.",
                  rich_markup_mode="markdown",
                  no_args_is_help=True)


@app.command("pull")
def pull(
    names: Annotated[list[str], typer.Argument(help="timm names[.tag] to download, e.g. deit_tiny_patch16_224.")],
    refresh: Annotated[bool, typer.Option(
        "--refresh", help="Download again a name that is already in the store (replacing it).")] = False,
) -> None:
    """Download hub models into the store as model folders, for offline use.

    Example: vitcli weights pull vit_base_patch16_224.augreg2_in21k_ft_in1k

    Only timm names are pulled; a name already in the store is kept unless --refresh is given.
    """
    with handled_errors():
        from vitcli.console import err, out
        from vitcli.models.store import pull_to_store

        for name in names:
            with err.status(f"pulling {escape(name)}"):
                folder = pull_to_store(name, refresh=refresh)
            out.print(f"{escape(name)} -> {escape(folder)}", highlight=False)


@app.command("list")
def list_(json_out: JsonOpt = False) -> None:
    """List the models in the store.

    Example: vitcli weights list
    """
    with handled_errors():
        import json

        from rich.table import Table

        from vitcli.console import err, out
        from vitcli.models.store import list_store, store_dir

        entries = list_store()
        if json_out:
            out.out(json.dumps(entries, indent=2), highlight=False)
            return
        if not entries:
            err.print(f"the store {escape(store_dir())}/ is empty; add one with `vitcli weights pull NAME`",
                      highlight=False)
            return
        table = Table(title=f"{escape(store_dir())}/")
        for column in ("name", "architecture", "classes", "MB"):
            table.add_column(column)
        for e in entries:
            table.add_row(escape(e["name"]), escape(e["architecture"]), escape(e["num_classes"]),
                          f"{e['bytes'] / 1e6:.1f}")
        out.print(table)
