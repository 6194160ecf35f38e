"""The engines `vitcli benchmark` times: one runner per backend, float32 (B, 3, H, W) -> float32 logits.

``build_backends`` makes a runner for every backend this machine can run, and says why for the
rest (no native bf16, no CUDA device, no calibration images for OpenVINO int8, a missing extra).
The torch rows run timm's fused attention, as predict does; the exported engines start from the
exportable model (attention unfused) through export's own code: the ONNX file and its dynamic int8
(``export.formats``, ``export.quantize``), the OpenVINO IR and its NNCF int8 (``export.openvino``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcli.errors import MissingExtraError, UsageError

BACKENDS = ("torch-fp32", "torch-bf16", "torch-compile", "openvino-fp32", "openvino-bf16", "openvino-int8",
            "onnxruntime-fp32", "onnxruntime-int8")
CUDA_BACKENDS = ("cuda-fp32", "cuda-fp16", "cuda-bf16", "onnxruntime-cuda")
NEEDS_CALIBRATION = "needs --calibration DIR: the images NNCF calibrates on"
Runner = Callable[[np.ndarray], np.ndarray]


def torch_runner(model: torch.nn.Module, device: str, dtype: torch.dtype | None) -> Runner:
    model = model.to(device)

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device)
        ctx = torch.autocast(device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            y = model(x).float()
        return y.cpu().numpy()  # .cpu() waits for a GPU to finish

    return run


def openvino_runner(model: torch.nn.Module, loaded: Any, precision: str) -> Runner:
    """OpenVINO's CPU plugin on the model converted from torch (dynamic batch), ``precision`` as its
    inference-precision hint, compiled and run as predict runs it (``OpenVinoModel``: a stream per
    usable CPU, each batch cut into a part per stream)."""
    import warnings

    import openvino as ov

    from vitcli.inference.openvino_engine import OpenVinoModel, compile_model

    _, h, w = loaded.data_config["input_size"]
    with warnings.catch_warnings():  # the tracer's warnings about timm's shape checks
        warnings.simplefilter("ignore")
        converted = ov.convert_model(model, example_input=torch.zeros(1, 3, h, w), input=[(-1, 3, h, w)])
    return OpenVinoModel(compile_model(converted, precision), Path("<memory>"), {}, precision).logits


def openvino_int8_ir(loaded: Any, calibration: Sequence[str], target: float | None, workdir: Path,
                     say: Callable[[str], None]) -> Path:
    """``workdir/model.int8.xml``: NNCF's int8 of the model as ``vitcli export -f openvino --quantize int8
    [--int8-target]`` writes it (``export.openvino.quantize_ir``: the transformer scheme, accuracy
    control towards ``target``), calibrated on the ``calibration`` images (never verification ones)."""
    from vitcli.export.formats import data_config_of
    from vitcli.export.job import export_metadata
    from vitcli.export.openvino import calibration_batch, export_openvino, import_nncf, quantize_ir
    from vitcli.export.options import ExportOptions

    import_nncf()  # the missing extra is reported before the conversion
    meta = {**export_metadata(loaded, loaded.name, None, ExportOptions()), "format": "openvino",
            "precision": "fp32"}
    _, h, w = meta["input_size"]
    say("converting to OpenVINO IR for int8")
    fp32 = export_openvino(loaded.model.float().eval(), torch.zeros(1, 3, h, w), workdir / "model.xml", meta,
                           ExportOptions())
    batch = calibration_batch(calibration, data_config_of(meta))
    path, _, notes = quantize_ir(fp32, workdir / "model.int8.xml", meta, batch, target, say)
    for note in notes:
        say(f"openvino-int8: {note}")
    return path


def openvino_int8_runner(loaded: Any, calibration: Sequence[str], target: float | None, workdir: Path,
                         say: Callable[[str], None]) -> Runner:
    """The int8 IR (``openvino_int8_ir``) run as predict runs that file: float parts at fp32, a stream
    per usable CPU (``OpenVinoModel``)."""
    from vitcli.inference.openvino_engine import load_openvino

    return load_openvino(openvino_int8_ir(loaded, calibration, target, workdir, say), "fp32").logits


def _fused(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the exportable model (attention unfused, for the ONNX graph and the FLOP count) with
    timm's default fused attention back on: the torch rows time what `vitcli predict` runs."""
    fused = copy.deepcopy(model)
    for module in fused.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    return fused


def build_backends(loaded: Any, names: Sequence[str], workdir: Path, say: Callable[[str], None],
                   calibration: Sequence[str] = (), int8_target: float | None = None
                   ) -> tuple[dict[str, tuple[str, Runner]], dict[str, str]]:
    """name -> (matmul dtype, run) for each backend this machine can run; name -> reason for the rest.

    ``calibration``: image sources for OpenVINO int8 (never the verification images); without
    them that row is skipped. ``int8_target``: its accuracy-control target (None: plain NNCF).
    """
    from vitcli.cpuinfo import cpu_features as features
    from vitcli.inference.onnx_engine import onnx_has_cuda

    model = _fused(loaded.model.float().eval())
    runners: dict[str, tuple[str, Runner]] = {}
    skipped: dict[str, str] = {}
    cuda = torch.cuda.is_available()
    for name in names:
        if name == "torch-fp32":
            runners[name] = ("fp32", torch_runner(model, "cpu", None))
        elif name == "torch-bf16":
            if features()["BF16"]:
                runners[name] = ("bf16", torch_runner(model, "cpu", torch.bfloat16))
            else:
                skipped[name] = ("no native bf16 on this CPU (AVX512-BF16/AMX); emulated bf16 is orders of "
                                 "magnitude slower")
        elif name in ("openvino-fp32", "openvino-bf16"):
            if name == "openvino-bf16" and not features()["BF16"]:
                skipped[name] = "no native bf16 on this CPU (AVX512-BF16/AMX)"
                continue
            runners[name] = (name.removeprefix("openvino-"), openvino_runner(model, loaded, name[-4:]))
        elif name == "openvino-int8":
            if not calibration:
                skipped[name] = NEEDS_CALIBRATION
                continue
            try:
                runners[name] = ("int8", openvino_int8_runner(loaded, calibration, int8_target, workdir, say))
            except MissingExtraError as e:
                skipped[name] = str(e)
        elif name == "torch-compile":
            say("compiling with torch.compile (slow the first time)")
            runners[name] = ("fp32", torch_runner(torch.compile(model), "cpu", None))
        elif name in ("onnxruntime-fp32", "onnxruntime-int8", "onnxruntime-cuda"):
            if name == "onnxruntime-cuda" and not cuda:
                skipped[name] = "no CUDA device"
                continue
            if name == "onnxruntime-cuda" and not onnx_has_cuda():
                skipped[name] = ("this ONNX Runtime has no CUDA provider (the CPU-only onnxruntime package); "
                                 "install onnxruntime-gpu for this row")
                continue
            path = _onnx_file(loaded, workdir, int8=name.endswith("int8"), say=say)
            from vitcli.inference.onnx_engine import load_onnx

            onnx_model = load_onnx(path, device="cuda" if name.endswith("cuda") else "cpu", spin=False)
            runners[name] = ("int8" if name.endswith("int8") else "fp32", onnx_model.logits)
        elif name.startswith("cuda-"):
            if not cuda:
                skipped[name] = "no CUDA device"
                continue
            dtype = {"cuda-fp32": None, "cuda-fp16": torch.float16, "cuda-bf16": torch.bfloat16}[name]
            if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
                skipped[name] = "this GPU has no native bf16"
                continue
            # a copy: .to() moves a module in place, and the CPU rows keep using this one
            runners[name] = (name.removeprefix("cuda-"), torch_runner(copy.deepcopy(model), "cuda", dtype))
        else:
            raise UsageError(f"unknown backend '{name}'; choose from {', '.join(BACKENDS + CUDA_BACKENDS)}")
    return runners, skipped


def _onnx_file(loaded: Any, workdir: Path, int8: bool, say: Callable[[str], None]) -> Path:
    from vitcli.export.formats import export_onnx, quiet_exporters, write_onnx
    from vitcli.export.job import export_metadata
    from vitcli.export.options import ExportOptions

    fp32 = workdir / "model.onnx"
    if not fp32.exists():
        say("exporting to ONNX")
        meta = export_metadata(loaded, loaded.name, None, ExportOptions())
        _, h, w = meta["input_size"]
        with quiet_exporters():
            export_onnx(loaded.model, torch.randn(2, 3, h, w), fp32, meta, ExportOptions())
    if not int8:
        return fp32
    import onnx

    from vitcli.export.formats import read_metadata
    from vitcli.export.quantize import quantize_int8

    path = workdir / "model.int8.onnx"
    say("quantizing to int8")
    write_onnx(quantize_int8(onnx.load(str(fp32))), path, read_metadata("onnx", fp32))
    return path


