"""The command-line layer: the only place that imports typer. Heavy imports stay inside commands."""
