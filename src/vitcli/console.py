"""The two consoles: results go to stdout, logs and progress to stderr (so `--json | jq` works)."""

from __future__ import annotations

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # one error = one line, whatever the width
