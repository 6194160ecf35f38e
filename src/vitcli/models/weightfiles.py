"""Weight files: reading .safetensors, .pth/.pt/.bin state dicts (never unpickling code) and JAX .npz,
and loading them into a timm model strictly, with a readable report of what does not fit."""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vitcli.errors import ModelLoadError, UnsafeCheckpointError, UsageError, WeightsMismatchError, first_line

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a .pth/.pt/.bin state dict (never unpickling code)."""
    if not path.is_file():
        raise UsageError(f"weights file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:
            raise ModelLoadError(f"'{path}' is not a readable .safetensors file ({first_line(e)})") from e
    if suffix not in (".pth", ".pt", ".bin", ".ckpt"):
        raise UsageError(f"unsupported weights file '{path.name}'; use .safetensors, .pth/.pt/.bin or .npz")
    try:
        # timm's own training checkpoints carry an argparse.Namespace of their arguments
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage bytes raise anything: UnpicklingError, RuntimeError, EOFError, KeyError, ...
        if isinstance(e, pickle.UnpicklingError) and (name := _refused_global(e)):
            raise UnsafeCheckpointError(
                f"refused to load '{path}': it needs arbitrary Python objects to unpickle ({name}), which "
                "could run code; vitcli loads plain tensors only (weights_only=True): save a state_dict "
                "or .safetensors"
            ) from e
        reason = "the file is empty (0 bytes)" if path.stat().st_size == 0 else (
            f"the file is corrupt or truncated ({_unpickle_reason(e)})")
        raise ModelLoadError(f"'{path}' is not a readable PyTorch checkpoint; {reason}; "
                             "download or save it again") from e
    return unwrap_state_dict(checkpoint, path)


def _unpickle_reason(e: BaseException) -> str:
    """The first sentence of torch.load's own reason (its UnpicklingError wraps it in advice for pickles)."""
    if isinstance(e, pickle.UnpicklingError) and e.__context__ is not None:
        e = e.__context__  # torch re-raises the weights-only unpickler's error `from None`
    text = str(e).strip()
    if not text or isinstance(e, KeyError):  # EOFError(), KeyError('101') say nothing readable
        return type(e).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")


def _refused_global(e: pickle.UnpicklingError) -> str | None:
    """The Python object a weights-only load refused to import, or None when the bytes are just corrupt.

    torch raises UnpicklingError for both: "Unsupported global: GLOBAL os.system ..." or "unsupported
    GLOBAL posix.system whose module posix is blocked" for a pickle that imports code, "Unsupported
    operand 73" and the like for bytes that are no pickle at all.
    """
    match = re.search(r"GLOBAL (\S*) (?:was not an allowed global|whose module \S+ is blocked)", str(e))
    if match is None:
        return None
    # a file cut inside a GLOBAL opcode reads an empty name ("torch._utils."): truncated, not malicious
    name = match.group(1)
    return name if name and not name.endswith(".") else None


def unwrap_state_dict(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (``model``/``state_dict`` wrappers, DDP prefixes removed)."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelLoadError(f"'{path}' holds no state dict of tensors (keys: {list(checkpoint)[:5]})")
    return timm.models.clean_state_dict(checkpoint)


def load_weights(model: nn.Module, path: Path, *, new_head: bool = False) -> None:
    """Load a weights file into ``model`` strictly, naming the first mismatches if it doesn't fit.

    The architecture's own ``checkpoint_filter_fn`` adapts original releases (DeiT, JAX-converted
    keys) and resamples position embeddings to the model's resolution. With ``new_head`` a
    classifier of another size is left freshly initialised (fine-tuning to new classes); a headless
    model (``num_classes=0``) ignores the file's classifier.
    """
    path = Path(path)
    if path.suffix.lower() == ".npz":
        _load_npz(model, path)
        return
    state_dict = read_state_dict(path)
    filter_fn = _checkpoint_filter_fn(model)
    if filter_fn is not None:
        with contextlib.suppress(Exception):  # a filter that can't handle these keys: check them as they are
            state_dict = filter_fn(state_dict, model)
    expected = model.state_dict()
    head = _classifier_prefixes(model)
    if new_head:
        state_dict = {k: v for k, v in state_dict.items()
                      if not (k.startswith(head) and k in expected and v.shape != expected[k].shape)}
    if getattr(model, "num_classes", None) == 0:
        # a headless model (num_classes=0, features only) has nowhere to put the file's classifier,
        # so it is dropped, as timm's load_pretrained does
        state_dict = {k: v for k, v in state_dict.items() if not (k.startswith(head) and k not in expected)}
    problems = weight_mismatches(state_dict, expected, allow_missing=head if new_head else ())
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise WeightsMismatchError(f"'{path}' does not fit {arch}: {'; '.join(problems[:3])}{more}; "
                                   "check that --model names the architecture these weights were trained for")
    model.load_state_dict(state_dict, strict=not new_head)


def weight_mismatches(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                      allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between a state dict and a model's, in the model's key order."""
    problems = []
    for key, ref in expected.items():
        if key not in state_dict:
            if not (allow_missing and key.startswith(allow_missing)):
                problems.append(f"missing {key} {tuple(ref.shape)}")
        elif state_dict[key].shape != ref.shape:
            problems.append(f"{key} has shape {tuple(state_dict[key].shape)}, model expects {tuple(ref.shape)}")
    problems += [f"unexpected {key} {tuple(state_dict[key].shape)}" for key in state_dict if key not in expected]
    return problems


def _load_npz(model: nn.Module, path: Path) -> None:
    """The original ViT release's JAX/Flax .npz files, through timm's own converter."""
    if not path.is_file():
        raise UsageError(f"weights file '{path}' does not exist")
    if not hasattr(model, "load_pretrained"):
        raise UsageError(f"'{path.name}' is a JAX .npz checkpoint, which timm reads for ViT models only; "
                         "convert it to .safetensors or use a vit_* --model")
    try:
        model.load_pretrained(str(path))
    except Exception as e:  # KeyError for a missing array, RuntimeError for a shape, ValueError for no npz
        raise WeightsMismatchError(f"'{path}' does not fit {model.pretrained_cfg.get('architecture')}: "
                                   f"{first_line(e)}; check that --model names the right ViT") from e


def _checkpoint_filter_fn(model: nn.Module) -> Any:
    arch = model.pretrained_cfg.get("architecture")
    if not arch or not timm.is_model(arch):
        return None
    module = sys.modules.get(timm.models.model_entrypoint(arch).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier") or "head"
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return tuple(f"{n}." for n in names)
