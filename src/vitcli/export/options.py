"""What ``vitcli export`` is asked for: formats, precision, verification, and the tolerances per precision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

OPSET = 18  # the first opset with LayerNormalization-era ops everywhere we need; ONNX Runtime >= 1.14 runs it
FORMATS = ("onnx", "openvino", "torchscript", "pt2", "timm")


@dataclass(frozen=True)
class Tolerance:
    max_abs_logit: float | None  # None: reported, not checked
    min_top1: float
    max_kl: float


TOLERANCES = {
    "fp32": Tolerance(1e-3, 1.0, 1e-5),
    "fp16": Tolerance(0.25, 0.98, 1e-3),
    "int8": Tolerance(None, 0.95, 0.05),
}


@dataclass
class ExportOptions:
    formats: Sequence[str] = ("onnx",)
    output: Path = Path("exported/model")  # a stem: each format adds its suffix
    precision: str = "fp32"  # fp32 or fp16 (for GPU runtimes)
    quantize: str | None = None  # "int8": also an int8 ONNX file
    int8_target: float | None = None  # accuracy-aware int8: top-1 agreement to reach on calibration images
    calibration: Sequence[str] = ()  # image sources for the accuracy-aware mode
    verify: bool = True
    verify_images: Sequence[str] = ()  # image sources; empty: generated images
    dynamic_size: bool = False
    opset: int = OPSET
    max_logit_diff: float | None = None  # overrides TOLERANCES
    min_agreement: float | None = None
