"""Checks on what a model file says about itself, once, on load: preprocessing and labels.

A model file is data from elsewhere. Its metadata decides how large every image is resized (a 400-byte
ONNX file saying ``input_size [3, 100000, 100000]`` or ``crop_pct 0.0001`` made predict grow to 24 GB),
what it is divided by (``std`` 0 gives NaN probabilities) and what is printed (labels). Each value is
checked against sane bounds and, where the graph declares it, against the graph's own input and output
shapes, before any image is touched; a bad one is a ``ModelLoadError`` naming the key. No torch here:
the ONNX engine uses it too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from vitcli.errors import ModelLoadError

MIN_SIDE, MAX_SIDE = 8, 1024  # input height/width in pixels (timm's largest classifiers take 448-600)
CROP_PCT_RANGE = (0.5, 1.0)  # timm's models use 0.765-1.0; below 0.5 the resize before the crop explodes
MEAN_RANGE = (-10.0, 10.0)  # pixel values are in 0..1 before normalization
STD_RANGE = (1e-3, 100.0)  # 0 divides by zero (NaN probabilities)
MAX_BORDER = 512
CROP_MODES = (None, "", "center", "squash", "border")
INTERPOLATIONS = (None, "", "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
MAX_LABEL_CHARS = 1000
MAX_DEPTH = 32  # of a JSON metadata value: deeper nesting is no label list or data config


def parse_json_value(key: str, text: str, where: str) -> Any:
    """A metadata value as JSON, with its nesting bounded (Python's parser recurses: 100,000 levels of
    ``[`` are a RecursionError). Text that is not JSON stays text."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:  # a cheap scan for brackets outside strings, before the recursive parser
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise ModelLoadError(f"{where}: metadata '{key}' is nested {deepest} levels deep (at most {MAX_DEPTH}); "
                             "the file is damaged or not a vitcli export: export the model again")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _bad(where: str, key: str, value: Any, want: str) -> ModelLoadError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ModelLoadError(f"{where}: '{key}' is {shown}, but must be {want}; the file is damaged or was not "
                          "written for vitcli: export or save the model again")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_data_config(config: dict[str, Any], where: str, graph_hw: Sequence[Any] | None = None) -> None:
    """Raise ModelLoadError unless ``config`` (a timm data config) is within bounds and fits the graph.

    ``graph_hw``: the (height, width) the model's input takes, where it is fixed (ints); other entries
    (symbolic ONNX dimensions, None) are not compared.
    """
    size = config.get("input_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                       for v in size)
            and size[0] in (1, 3) and all(MIN_SIDE <= v <= MAX_SIDE for v in size[1:])):
        raise _bad(where, "input_size", size, f"[channels (1 or 3), height, width] with sides of {MIN_SIDE} "
                   f"to {MAX_SIDE} pixels")
    if graph_hw is not None:
        for axis, declared, fixed in zip(("height", "width"), size[1:], graph_hw, strict=False):
            if isinstance(fixed, int) and fixed > 0 and fixed != declared:
                raise _bad(where, "input_size", size, f"the model's own input size ({axis} {fixed})")
    crop_pct = config.get("crop_pct")
    if crop_pct is not None and not (_number(crop_pct) and CROP_PCT_RANGE[0] <= crop_pct <= CROP_PCT_RANGE[1]):
        raise _bad(where, "crop_pct", crop_pct, f"a number from {CROP_PCT_RANGE[0]} to {CROP_PCT_RANGE[1]}")
    for key, (low, high) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
        value = config.get(key)
        if not (isinstance(value, (list, tuple)) and len(value) in (1, size[0])
                and all(_number(v) and low <= v <= high for v in value)):
            raise _bad(where, key, value, f"{size[0]} numbers from {low:g} to {high:g}")
    if config.get("crop_mode") not in CROP_MODES:
        raise _bad(where, "crop_mode", config.get("crop_mode"), "center, squash or border")
    if config.get("interpolation") not in INTERPOLATIONS:
        raise _bad(where, "interpolation", config.get("interpolation"), ", ".join(filter(None, INTERPOLATIONS)))
    border = config.get("crop_border_pixels")
    if border is not None and not (isinstance(border, int) and not isinstance(border, bool)
                                   and 0 <= border <= MAX_BORDER):
        raise _bad(where, "crop_border_pixels", border, f"a whole number from 0 to {MAX_BORDER}")


def check_labels(labels: Any, where: str, outputs: Any = None, key: str = "labels") -> list[str]:
    """``labels`` as a list of strings, one per model output (where ``outputs`` is a fixed number)."""
    if not (isinstance(labels, list) and labels and all(isinstance(v, str) for v in labels)):
        raise _bad(where, key, labels, "a JSON list of label strings")
    if isinstance(outputs, int) and outputs > 0 and len(labels) != outputs:
        raise _bad(where, key, f"{len(labels)} labels", f"one per output of the model ({outputs})")
    if too_long := next((v for v in labels if len(v) > MAX_LABEL_CHARS), None):
        raise _bad(where, key, too_long, f"labels of at most {MAX_LABEL_CHARS} characters")
    return labels
