"""The int8 files of ``vitcli export --quantize int8``: ONNX Runtime's dynamic quantization of the
ONNX file (``export.quantize``), NNCF's static quantization of the OpenVINO IR (``export.openvino``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcli.export.formats import data_config_of, write_onnx

if TYPE_CHECKING:
    from vitcli.export.options import ExportOptions

RUN_BATCH = 16


def int8_onnx(source: Path, path: Path, meta: dict, options: ExportOptions, calibration: Sequence[str],
              say: Callable[[str], None]) -> list[str]:
    """Quantize the fp32 ONNX file ``source`` into ``path``; the notes for the user."""
    import onnx

    from vitcli.cpuinfo import has_vnni
    from vitcli.export.openvino import calibration_batch
    from vitcli.export.quantize import accuracy_aware_int8, quantize_int8, weight_matmuls

    fp32 = onnx.load(str(source))
    say(f"quantizing to int8 ({'VNNI' if has_vnni() else 'no VNNI: 7-bit weights (reduce_range)'})")
    notes = []
    if options.int8_target is None:
        proto = quantize_int8(fp32)
        quant = {"scheme": "dynamic", "weights": "int8 per-channel", "reduce_range": not has_vnni(),
                 "matmuls_int8": len(weight_matmuls(fp32)), "matmuls_fp32": []}
    else:
        batch = calibration_batch(calibration, data_config_of(meta))
        result = accuracy_aware_int8(fp32, run_proto, batch, options.int8_target, say)
        proto = result.model
        quant = {"scheme": "dynamic, accuracy-aware", "weights": "int8 per-channel",
                 "reduce_range": not has_vnni(), "matmuls_int8": result.quantized, "matmuls_fp32": result.kept_fp32,
                 "calibration_images": len(batch), "calibration_agreement": result.calibration_agreement,
                 "target": options.int8_target}
        notes.append(f"{len(result.kept_fp32)} MatMuls kept fp32; {result.calibration_agreement:.1%} top-1 "
                     f"agreement on {len(batch)} calibration images (target {options.int8_target:.1%})")
        if result.calibration_agreement < options.int8_target:
            notes.append("the target was not reached even with every MatMul in fp32")
    # the quantizer rebuilds the graph and drops metadata_props: write them again
    write_onnx(proto, path, {**meta, "precision": "int8", "opset": options.opset, "quantization": quant})
    return notes


def int8_openvino(source: Path, path: Path, meta: dict, options: ExportOptions, calibration: Sequence[str],
                  say: Callable[[str], None]) -> list[str]:
    """NNCF int8 of the fp32 IR ``source`` into ``path``, calibrated on ``calibration``; the notes."""
    from vitcli.export.openvino import calibration_batch, quantize_ir

    batch = calibration_batch(calibration, data_config_of(meta))
    return quantize_ir(source, path, meta, batch, options.int8_target, say)[2]


def run_proto(proto: Any, batch: np.ndarray) -> np.ndarray:
    """Logits of an in-memory ``onnx.ModelProto`` on the CPU, in batches."""
    from vitcli.inference.onnx_engine import import_onnxruntime, session_options

    session = import_onnxruntime().InferenceSession(proto.SerializeToString(), session_options(),
                                                    providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: batch[i:i + RUN_BATCH]})[0]
                           for i in range(0, len(batch), RUN_BATCH)])
