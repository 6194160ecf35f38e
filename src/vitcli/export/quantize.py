"""int8 ONNX models through ONNX Runtime's dynamic quantization, plain or accuracy-aware.

Weights are quantized per output channel; activations are quantized on the fly. On CPUs without
VNNI, x86's u8 x s8 multiply-add saturates at 16 bits, so weights use 7 bits (``reduce_range``).
Only MatMuls with a constant weight are quantized (``MatMulConstBOnly``): the attention products
q @ k^T and attn @ v stay fp32.

The accuracy-aware mode ranks those MatMuls by how much keeping each one alone in fp32 brings the
int8 model's output distribution closer to fp32's (mean KL divergence on calibration images) and
keeps the top ones in fp32, more at each step, until top-1 agreement with fp32 on the calibration
images reaches the target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from vitcli.cpuinfo import has_vnni

RANK_IMAGES = 32  # calibration images used to rank the MatMuls (agreement is measured on all of them)


@dataclass
class Int8Result:
    """A quantized model, what stayed fp32, and its agreement on the calibration images."""

    model: Any  # onnx.ModelProto
    kept_fp32: list[str] = field(default_factory=list)
    quantized: int = 0
    calibration_agreement: float | None = None
    steps: list[tuple[int, float]] = field(default_factory=list)  # (MatMuls kept fp32, agreement)


def weight_matmuls(model: Any) -> list[str]:
    """Names of the MatMul nodes whose second input is a constant (weights), in graph order."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in constants]


def quantize_int8(model: Any, *, exclude: Sequence[str] = (), only: Sequence[str] | None = None,
                  reduce_range: bool | None = None) -> Any:
    """Dynamic int8 quantization of an fp32 ``onnx.ModelProto`` -> a new ModelProto.

    ``reduce_range`` defaults to True where the CPU has no VNNI (see module docstring).
    """
    import tempfile
    from pathlib import Path

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for i, node in enumerate(model.graph.node):  # the quantizer needs every node named
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    logging.disable(logging.WARNING)  # the quantizer logs advice on the root logger: not for vitcli's users
    with tempfile.TemporaryDirectory(prefix="vitcli-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_dynamic(
                model, out, op_types_to_quantize=["MatMul"], per_channel=True,
                reduce_range=not has_vnni() if reduce_range is None else reduce_range,
                weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                nodes_to_quantize=list(only) if only is not None else None,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load(out)


def top1_agreement(reference: np.ndarray, logits: np.ndarray) -> float:
    return float((reference.argmax(1) == logits.argmax(1)).mean())


def mean_kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean over images of KL(softmax(reference) || softmax(logits)), in float64."""
    p = _log_softmax(reference.astype(np.float64))
    q = _log_softmax(logits.astype(np.float64))
    return float((np.exp(p) * (p - q)).sum(axis=1).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def accuracy_aware_int8(model: Any, run: Callable[[Any, np.ndarray], np.ndarray], calibration: np.ndarray,
                        target: float, on_step: Callable[[str], None] | None = None) -> Int8Result:
    """Quantize ``model`` keeping the most harmful MatMuls in fp32 until calibration agreement >= target.

    Args:
        model: the fp32 ``onnx.ModelProto``.
        run: ``run(model_proto, batch) -> logits`` (an ONNX Runtime session per call).
        calibration: float32 (N, 3, H, W) calibration images, never the verification images.
        target: the top-1 agreement with fp32 to reach, in [0, 1].
        on_step: progress messages.
    """
    say = on_step or (lambda _: None)
    reference = run(model, calibration)
    full = quantize_int8(model)
    nodes = weight_matmuls(model)
    agreement = top1_agreement(reference, run(full, calibration))
    result = Int8Result(full, [], len(nodes), agreement, [(0, agreement)])
    say(f"int8: all {len(nodes)} weight MatMuls quantized: {agreement:.1%} top-1 agreement on calibration images")
    if agreement >= target:
        return result
    harm = {}
    # ranking needs each MatMul's harm relative to the others, not every image: an evenly spread sample
    pick = np.linspace(0, len(calibration) - 1, min(RANK_IMAGES, len(calibration))).round().astype(int)
    full_kl = mean_kl(reference[pick], run(full, calibration[pick]))
    for i, name in enumerate(nodes):  # how much closer to fp32 does the int8 model get with this one MatMul fp32?
        harm[name] = full_kl - mean_kl(reference[pick], run(quantize_int8(model, exclude=[name]), calibration[pick]))
        if (i + 1) % 10 == 0:
            say(f"int8: ranked {i + 1}/{len(nodes)} MatMuls by what keeping each in fp32 gains")
    ranked = sorted(nodes, key=harm.__getitem__, reverse=True)
    best = result
    keep = 1
    while ranked:
        candidate = quantize_int8(model, exclude=ranked[:keep])
        agreement = top1_agreement(reference, run(candidate, calibration))
        steps = [*best.steps, (keep, agreement)]
        say(f"int8: {keep} MatMuls kept fp32: {agreement:.1%} top-1 agreement on calibration images")
        # agreement need not grow with every MatMul kept (flips of near-ties): keep the best so far
        best = (Int8Result(candidate, ranked[:keep], len(nodes) - keep, agreement, steps)
                if agreement > best.calibration_agreement else replace(best, steps=steps))
        if agreement >= target or keep == len(ranked):
            break
        keep = min(len(ranked), keep + 1 if keep < 4 else int(keep * 1.5))  # fine steps first: a few usually do
    return best  # the target reached, or the best found (the caller reports a shortfall)
