"""The model shipped inside the package: the default ``--model`` of every command, loaded offline.

Torch-free, so the CLI can show the default in ``--help`` without importing torch. The folder is
package data (``pyproject.toml``), so it survives a regular ``pip install .`` as well as ``-e``.
Provenance and licence: ``weights/README.md`` at the repository root.
"""

from __future__ import annotations

from pathlib import Path

# DeiT-Tiny (ViT-Ti/16, 5.7M parameters, 72.2% ImageNet top-1), Apache-2.0: small and quick on a CPU.
DEFAULT_MODEL = "deit_tiny_patch16_224"
EMBEDDED_DIR = Path(__file__).resolve().parent


def embedded_model(name: str) -> Path | None:
    """The shipped model folder (timm hub layout) for ``name``, or None."""
    if not name or "/" in name or name.startswith("."):
        return None
    folder = EMBEDDED_DIR / name
    return folder if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() else None
