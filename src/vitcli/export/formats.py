"""The exporters (a format name -> function table) and the loaders that read their files back.

Every exporter takes the model, an example batch, the output path, the metadata and the options,
and writes one file (or, for ``timm``, one folder) atomically with the metadata inside.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcli import __version__
from vitcli.calibration import TEMPERATURE_KEY, store_temperature
from vitcli.export.options import ExportOptions
from vitcli.io.preprocess import DATA_KEYS
from vitcli.models.folders import save_model_folder

SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".torchscript.pt", "pt2": ".pt2", "timm": "-timm"}
METADATA_FILE = "vitcli.json"  # inside .pt/.pt2 archives, and the name of the timm folder's copy
MAX_BATCH = 4096


def patch_size(model: torch.nn.Module) -> int | None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return int(patch[0]) if isinstance(patch, (tuple, list)) else patch


def data_config_of(meta: dict[str, Any], size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The timm data config recorded in the metadata, optionally at another input size."""
    cfg = {k: meta[k] for k in DATA_KEYS if k in meta}
    if size is not None:
        cfg["input_size"] = [cfg["input_size"][0], *size]
    return cfg



@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """The exporters warn and print progress; vitcli's stdout is for results only."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------- exporters


def _dynamic_shapes(model: torch.nn.Module, dynamic_size: bool) -> tuple[dict[int, Any]]:
    dim = torch.export.Dim
    shapes: dict[int, Any] = {0: dim("batch", min=1, max=MAX_BATCH)}
    if dynamic_size:
        patch = patch_size(model) or 1
        shapes[2] = patch * dim("patches_h", min=1, max=256)
        shapes[3] = patch * dim("patches_w", min=1, max=256)
    return (shapes,)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict, options: ExportOptions) -> Path:
    """torch's dynamo exporter (onnxscript), one self-contained file, a dynamic batch axis."""
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=options.opset,
                                dynamic_shapes=_dynamic_shapes(model, options.dynamic_size),
                                input_names=["input"], output_names=["logits"], verbose=False, optimize=True)
    write_onnx(program.model_proto, path, meta)
    return path


def write_onnx(proto: Any, path: Path, meta: dict) -> None:
    """Save with ``meta`` as ``metadata_props`` (JSON values), in one file when under protobuf's 2 GB."""
    import onnx

    from vitcli.io.fileio import atomic_open

    set_onnx_metadata(proto, meta)
    if proto.ByteSize() < 2**31 - 2**20:
        with atomic_open(path, "wb") as f:
            f.write(proto.SerializeToString())
    else:  # too large for one protobuf: weights go beside it
        onnx.save_model(proto, str(path), save_as_external_data=True, location=f"{path.name}.data")


def set_onnx_metadata(proto: Any, meta: dict) -> None:
    """Replace vitcli's ``metadata_props`` (each value a JSON document) on a ModelProto."""
    keep = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    proto.producer_name = "vitcli"
    proto.doc_string = f"{meta.get('architecture')} exported by vitcli {__version__}"


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict,
                       options: ExportOptions) -> Path:
    from vitcli.io.fileio import atomic_open

    traced = torch.jit.trace(model, example, check_trace=False)
    with atomic_open(path, "wb") as f:
        torch.jit.save(traced, f, _extra_files={METADATA_FILE: json.dumps(meta)})
    return path


def export_pt2(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict, options: ExportOptions) -> Path:
    from vitcli.io.fileio import atomic_open

    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(model, options.dynamic_size))
    with atomic_open(path, "wb") as f:
        torch.export.save(program, f, extra_files={METADATA_FILE: json.dumps(meta)})
    return path


def export_timm(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict, options: ExportOptions) -> Path:
    data_config = data_config_of(meta)
    data_config["input_size"] = tuple(data_config["input_size"])
    save_model_folder(model, path, meta["labels"], data_config)
    if meta.get(TEMPERATURE_KEY) is not None:  # in the folder's config.json too, where predict reads it
        store_temperature(path, meta[TEMPERATURE_KEY])
    return path


def export_openvino(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict,
                    options: ExportOptions) -> Path:
    from vitcli.export.openvino import export_openvino

    return export_openvino(model, example, path, meta, options)


EXPORTERS: dict[str, Callable[[torch.nn.Module, torch.Tensor, Path, dict, ExportOptions], Path]] = {
    "onnx": export_onnx, "openvino": export_openvino, "torchscript": export_torchscript, "pt2": export_pt2,
    "timm": export_timm,
}


def load_exported(fmt: str, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A file as written above -> ``run(float32 batch) -> float32 logits``."""
    if fmt == "onnx":
        from vitcli.inference.onnx_engine import load_onnx

        return load_onnx(path, device="cpu").logits
    if fmt == "openvino":  # fp32 inference precision: the file is verified, not the CPU's bf16 units
        from vitcli.inference.openvino_engine import load_openvino

        return load_openvino(path, "fp32").logits
    if fmt == "torchscript":
        with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    elif fmt == "pt2":
        module = torch.export.load(str(path)).module()
    else:
        import timm

        module = timm.create_model(f"local-dir:{Path(path).resolve()}", pretrained=True).eval()
    dtype = next(iter(module.parameters()), torch.empty(0)).dtype if fmt != "pt2" else _pt2_dtype(module)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch).to(dtype)).float().numpy()

    return run


def _pt2_dtype(module: torch.nn.Module) -> torch.dtype:
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def read_metadata(fmt: str, path: Path) -> dict[str, Any]:
    """The metadata written into (or, for a timm folder, beside) an exported file."""
    if fmt == "onnx":
        import onnx

        from vitcli.inference.onnx_engine import parse_metadata

        proto = onnx.load(str(path), load_external_data=False)
        return parse_metadata({p.key: p.value for p in proto.metadata_props})
    if fmt == "openvino":
        from vitcli.inference.openvino_engine import import_openvino
        from vitcli.inference.openvino_engine import read_metadata as read_rt_info

        return read_rt_info(import_openvino().Core().read_model(str(path)))
    if fmt == "torchscript":
        extra = {METADATA_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return json.loads(extra[METADATA_FILE])
    if fmt == "pt2":
        extra = {METADATA_FILE: ""}
        torch.export.load(str(path), extra_files=extra)
        return json.loads(extra[METADATA_FILE])
    return json.loads((Path(path) / METADATA_FILE).read_text())


