"""OpenVINO IR from a timm model, and its int8 form through NNCF.

The IR is converted straight from the PyTorch model (``openvino.convert_model``): converting the
exported ONNX file verifies equally (max |Δlogit| 4e-6 for DeiT-Tiny both ways) but needs the ONNX
export first (22 s + 2.8 s against 5.2 s; docs/engines.md). vitcli's metadata goes into the IR's ``rt_info``
(``inference.openvino_engine.set_metadata``), so ``vitcli predict model.xml`` needs nothing else.

int8 is NNCF's post-training quantization with the transformer model type (SmoothQuant off, as NNCF
advises for ViTs on CPUs), calibrated on ``--calibration`` images only. With ``--int8-target``,
NNCF's accuracy control reverts the most harmful layers to floating point until top-1 agreement
with the fp32 model on those images is within ``1 - target`` of 100%.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcli.errors import MissingExtraError, UsageError
from vitcli.inference.openvino_engine import compile_model, import_openvino, save_ir, signal_stack_kept

if TYPE_CHECKING:
    import torch

    from vitcli.export.options import ExportOptions

NNCF_HINT = 'int8 for OpenVINO needs NNCF: pip install -e ".[export]"'


def convert(model: torch.nn.Module, example: torch.Tensor, dynamic_size: bool = False) -> Any:
    """A PyTorch model -> ``openvino.Model`` with a dynamic batch axis (and dynamic H, W if asked)."""
    ov = import_openvino()
    _, channels, height, width = example.shape
    shape = [-1, channels, -1, -1] if dynamic_size else [-1, channels, height, width]
    with _quiet():
        return ov.convert_model(model, example_input=example, input=[ov.PartialShape(shape)])


def export_openvino(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict,
                    options: ExportOptions) -> Path:
    """The exporter of ``-f openvino``: ``path`` (.xml) and its .bin, fp32 weights, metadata in rt_info."""
    return save_ir(convert(model.float(), example.float(), options.dynamic_size), path, meta)


# -------------------------------------------------------------------------------------- int8


def import_nncf() -> Any:
    try:
        import nncf
    except ImportError as e:
        raise MissingExtraError(NNCF_HINT) from e
    return nncf


def quantize_ir(fp32_xml: Path, path: Path, meta: dict, calibration: np.ndarray, target: float | None,
                say: Callable[[str], None]) -> tuple[Path, dict[str, Any], list[str]]:
    """An int8 IR of ``fp32_xml`` -> (path, the quantization record for the metadata, notes for the user).

    ``calibration``: float32 (N, 3, H, W), never the verification images. ``target``: the top-1
    agreement with fp32 to keep (accuracy control), or None for plain post-training quantization.
    """
    ov = import_openvino()
    nncf = import_nncf()
    fp32 = ov.Core().read_model(str(fp32_xml))
    items = [calibration[i:i + 1] for i in range(len(calibration))]  # NNCF feeds one item per inference
    dataset = nncf.Dataset(items)
    advanced = nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1)
    common = {"model_type": nncf.ModelType.TRANSFORMER, "subset_size": len(items)}
    notes: list[str] = []
    with _quiet(), signal_stack_kept():  # NNCF compiles models to collect its statistics
        if target is None:
            say(f"int8: NNCF post-training quantization on {len(items)} calibration images")
            quantized = nncf.quantize(fp32, dataset, advanced_parameters=advanced, **common)
        else:
            reference = compile_model(fp32)
            labels = [int(np.argmax(reference(x)[0])) for x in items]  # fp32's top-1: agreement is the metric
            validation = nncf.Dataset(list(zip(items, labels, strict=True)), lambda item: item[0])

            def agreement(compiled: Any, data: Any) -> float:
                hits = [int(np.argmax(compiled(x)[0])) == y for x, y in data]
                return float(np.mean(hits))

            say(f"int8: NNCF accuracy control on {len(items)} calibration images (target {target:.1%} agreement)")
            quantized = nncf.quantize_with_accuracy_control(
                fp32, dataset, validation, validation_fn=agreement, max_drop=max(0.0, 1.0 - target),
                drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced, **common)
    kept = float_matmuls(quantized)
    matmuls = [op.get_friendly_name() for op in quantized.get_ordered_ops() if op.get_type_name() == "MatMul"]
    record: dict[str, Any] = {"scheme": "nncf static" + (", accuracy control" if target is not None else ""),
                              "model_type": "transformer", "calibration_images": len(items),
                              "matmuls_int8": len(matmuls) - len(kept), "matmuls_float": kept}
    if target is not None:
        compiled = compile_model(quantized)
        got = float(np.mean([int(np.argmax(compiled(x)[0])) == y for x, y in zip(items, labels, strict=True)]))
        record.update(target=target, calibration_agreement=got)
        notes.append(f"{len(kept)} of {len(matmuls)} MatMuls kept in floating point; {got:.1%} top-1 agreement "
                     f"on {len(items)} calibration images (target {target:.1%})")
        if got < target:
            notes.append("the target was not reached")
    else:
        notes.append(f"{len(kept)} of {len(matmuls)} MatMuls kept in floating point (NNCF's transformer scheme)")
    save_ir(quantized, path, {**meta, "precision": "int8", "quantization": record})
    return path, record, notes


def float_matmuls(model: Any) -> list[str]:
    """Names of the MatMuls of a quantized model that none of whose inputs passes a FakeQuantize."""
    kept = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        if not any(_quantized(op.input_value(i).get_node()) for i in range(op.get_input_size())):
            kept.append(op.get_friendly_name())
    return kept


def _quantized(node: Any, depth: int = 0) -> bool:
    """Whether ``node`` is (or, through converts and reshapes, comes from) a FakeQuantize/FakeConvert."""
    kind = node.get_type_name()
    if kind in ("FakeQuantize", "FakeConvert"):
        return True
    if depth < 4 and kind in ("Convert", "Reshape", "Transpose", "Multiply", "Subtract"):
        return any(_quantized(node.input_value(i).get_node(), depth + 1) for i in range(node.get_input_size()))
    return False


def check_int8_options(options: ExportOptions) -> None:
    """int8 IR needs calibration images (NNCF's quantization is static)."""
    if "openvino" in options.formats and options.quantize == "int8":
        if not options.calibration:
            raise UsageError("--quantize int8 with --format openvino needs --calibration DIR: NNCF calibrates "
                             "activations on images (not the verification images)")
        import_nncf()


def calibration_batch(sources: Sequence[str], config: dict[str, Any]) -> np.ndarray:
    """float32 (N, 3, H, W) of the calibration images, timm's eval transform."""
    from vitcli.export.verify import batch_of
    from vitcli.io.images import load_image

    images = []
    for source in sources:
        with contextlib.suppress(Exception):
            images.append(load_image(source))
    if not images:
        raise UsageError("no readable image among --calibration")
    return batch_of(images, config)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """NNCF and the converter log progress and warnings on their loggers: not for vitcli's users."""
    import sys
    import warnings

    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
