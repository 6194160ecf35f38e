"""The local model store (``weights/`` or ``$VITCLI_WEIGHTS``): looking up, listing and pulling into it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm

from vitcli.embedded import DEFAULT_MODEL
from vitcli.errors import UsageError
from vitcli.models.folders import is_model_folder, model_labels, save_model_folder
from vitcli.models.hub import create_from_hub
from vitcli.models.names import as_hub_id, check_arch, split_name
from vitcli.models.weightfiles import WEIGHT_SUFFIXES

STORE_ENV = "VITCLI_WEIGHTS"


def store_dir() -> Path:
    """The local model store: ``$VITCLI_WEIGHTS`` if set, else ``./weights``."""
    return Path(os.environ.get(STORE_ENV) or "weights").expanduser()


def find_in_store(name: str) -> Path | None:
    """A store entry for ``name``: a model folder ``weights/NAME/`` or a file ``weights/NAME.<ext>``."""
    store = store_dir()
    if not name or "/" in name or not store.is_dir():
        return None
    if is_model_folder(store / name):
        return store / name
    for suffix in WEIGHT_SUFFIXES:
        if (store / f"{name}{suffix}").is_file():
            return store / f"{name}{suffix}"
    return None


def list_store() -> list[dict[str, Any]]:
    """Entries of the local model store, for ``vitcli weights list``."""
    store = store_dir()
    entries: list[dict[str, Any]] = []
    if not store.is_dir():
        return entries
    for path in sorted(store.iterdir()):
        if is_model_folder(path):
            try:
                cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
                cfg = cfg if isinstance(cfg, dict) else {}
            except (OSError, ValueError, RecursionError):  # listed as unknown; loading it names the problem
                cfg = {}
            size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
            arch, classes = cfg.get("architecture", "?"), cfg.get("num_classes", "?")
        elif path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            size, arch, classes = path.stat().st_size, split_name(path.stem)[0], "?"
        else:
            continue
        entries.append({"name": path.stem if path.is_file() else path.name, "path": str(path),
                        "architecture": arch, "num_classes": classes, "bytes": size})
    return entries


def pull_to_store(name: str, refresh: bool = False) -> Path:
    """Download a timm model's pretrained weights from the hub into the store, as a model folder.

    Only timm names are pulled (a local path or a store entry is never rewritten in place); a name
    already in the store is downloaded again only with ``refresh``.
    """
    raw = name.removeprefix("local-dir:")
    if raw != name or Path(raw).expanduser().exists() or os.sep in raw or raw.startswith("."):
        raise UsageError(f"'{name}' is a local path; `weights pull` downloads timm models from the Hugging Face "
                         f"Hub: give a timm name (e.g. {DEFAULT_MODEL}), or copy a model folder into {store_dir()}/")
    if (hub_id := as_hub_id(name)) is not None:
        raise UsageError(f"'{name}' is a Hub repository id; `weights pull` takes timm names (e.g. {DEFAULT_MODEL}); "
                         f"use --model {hub_id} directly (huggingface_hub caches it)")
    check_arch(name)
    existing = find_in_store(name)
    if existing is not None and not refresh:
        raise UsageError(f"'{name}' is already in the store ({existing}); add --refresh to download it again")
    model = create_from_hub(name, True, {}, store=store_dir()).eval()
    folder = save_model_folder(model, store_dir() / name, model_labels(model),
                               timm.data.resolve_model_data_config(model))
    if existing is not None and existing.is_file():
        existing.unlink()  # the folder replaces a bare weights file of the same name
    return folder
