"""A model's temperature: fitted on labelled images, stored with the model, read back. Never prints.

The temperature T is kept as ``"temperature": T`` at the top level of a model folder's
``config.json`` (timm ignores keys it does not know, so ``timm.create_model('local-dir:...')`` still
loads the folder) and in the metadata of every exported file. predict and evaluate show
``softmax(logits / T)``; a model without one shows the plain softmax.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcli.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

    from vitcli.models.resolve import LoadedModel

TEMPERATURE_KEY = "temperature"


def checked_temperature(value: Any, where: str) -> float | None:
    """A stored temperature as a float (None when absent), or a ModelLoadError naming ``where``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ModelLoadError(f"{where} has \"{TEMPERATURE_KEY}\": {value!r}; it must be a positive number "
                             f"(remove it to use the plain softmax, or refit it with `vitcli calibrate`)")
    return float(value)


def read_temperature(folder: str | Path) -> float | None:
    """The temperature stored in a model folder's config.json, None if it has none."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read '{path}' ({type(e).__name__}: {e})") from e
    return checked_temperature(config.get(TEMPERATURE_KEY) if isinstance(config, dict) else None, str(path))


def model_temperature(loaded: LoadedModel) -> float | None:
    """The temperature of a loaded model: its folder's, None for timm names and the shipped model."""
    return read_temperature(loaded.folder) if loaded.folder is not None else None


def store_temperature(folder: str | Path, temperature: float | None) -> Path:
    """Write (or with None, remove) the temperature in a model folder's config.json, atomically."""
    from vitcli.io.fileio import atomic_open

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if temperature is None:
        config.pop(TEMPERATURE_KEY, None)
    else:
        config[TEMPERATURE_KEY] = float(checked_temperature(temperature, "the fitted temperature"))  # type: ignore[arg-type]
    with atomic_open(path, encoding="utf-8") as f:
        json.dump(config, f, indent=2, allow_nan=False)
    return path


@dataclass
class Calibration:
    """A fitted temperature and the scores before and after it, or why none was fitted."""

    temperature: float | None  # None: not fitted (see ``reason``)
    reason: str = ""  # why it was not fitted
    n_images: int = 0
    nll_before: float = math.nan
    nll_after: float = math.nan
    ece_before: float = math.nan
    ece_after: float = math.nan
    folders: list[str] | None = None  # the model folders it was stored in

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {"temperature": self.temperature, "reason": self.reason or None, "n_images": self.n_images,
                "nll": {"before": num(self.nll_before), "after": num(self.nll_after)},
                "ece": {"before": num(self.ece_before), "after": num(self.ece_after)},
                "stored_in": list(self.folders or [])}


def skip_reason(targets: torch.Tensor, labels: list[str], what: str = "the validation split") -> str:
    """Why no temperature can be fitted on these targets ("" if one can)."""
    if len(targets) == 0:
        return f"{what} has no readable images"
    present = sorted(set(targets.tolist()))
    if len(present) < 2:
        return (f"{what} holds images of one class only ({labels[present[0]]}); a temperature needs at "
                "least two classes")
    return ""


def calibrate_logits(logits: torch.Tensor, targets: torch.Tensor, labels: list[str],
                     what: str = "the validation split") -> Calibration:
    """Fit a temperature on held-out logits (N, C) and score NLL and ECE before and after it."""
    from vitcli.metrics import ece, fit_temperature, nll

    if reason := skip_reason(targets, labels, what):
        return Calibration(None, reason, n_images=len(targets))
    t = fit_temperature(logits, targets)
    return Calibration(t, n_images=len(targets), nll_before=nll(logits, targets), nll_after=nll(logits, targets, t),
                       ece_before=ece(logits, targets), ece_after=ece(logits, targets, t))

