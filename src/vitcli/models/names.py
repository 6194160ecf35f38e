"""Model names: timm names with pretrained tags, and Hugging Face Hub repository ids."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import timm

from vitcli.errors import UnknownModelError

HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name, as the Hugging Face Hub spells it


def split_name(name: str) -> tuple[str, str]:
    """``'vit_small_patch16_224.augreg_in21k'`` -> ``('vit_small_patch16_224', 'augreg_in21k')``."""
    arch, _, tag = name.partition(".")
    return arch, tag


def check_arch(name: str) -> str:
    """Return the architecture of a timm name, or raise with the closest valid names."""
    arch, tag = split_name(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models('vit_*')`"
        raise UnknownModelError(f"unknown model '{name}'; {hint}")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
        close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.3) or tags[:3]
        hint = f"; did you mean {', '.join(f'{arch}.{t}' for t in close)}?" if close else ""
        raise UnknownModelError(f"unknown pretrained tag '{tag}' for {arch}{hint}")
    return arch


def as_hub_id(name: str) -> str | None:
    """``hf-hub:org/name``, or a plain ``org/name`` that names no local path, as timm's ``hf-hub:`` id."""
    if name.startswith("hf-hub:"):
        return name
    if HUB_REPO_ID.fullmatch(name) and not Path(name).expanduser().exists():
        return f"hf-hub:{name}"
    return None
