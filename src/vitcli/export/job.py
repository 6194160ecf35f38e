"""Deployable files from any ``--model``: a name -> exporter table, metadata, and verification.

Every file is checked against the PyTorch model it came from: both run on the same preprocessed
images and the maximum |logit difference|, top-1 agreement and mean KL divergence must fall within
the tolerance for its precision (``TOLERANCES``). The model is built with timm's ``exportable=True``
and fused attention off, so the graphs hold plain ops (no scaled_dot_product_attention).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcli import __version__
from vitcli.calibration import TEMPERATURE_KEY, model_temperature
from vitcli.errors import ExportError, UsageError, VerificationError, first_line
from vitcli.export.formats import (
    EXPORTERS,
    METADATA_FILE,
    SUFFIXES,
    data_config_of,
    load_exported,
    patch_size,
    quiet_exporters,
)
from vitcli.export.options import FORMATS, OPSET, TOLERANCES, ExportOptions
from vitcli.inference.onnx_engine import import_onnxruntime
from vitcli.models.resolve import LoadedModel, load_model

VERIFY_BATCH = 16


@dataclass
class Verification:
    """One exported file against PyTorch on the verification images at one input size."""

    size: tuple[int, int]
    images: int
    max_abs_logit: float
    top1_agreement: float
    mean_kl: float
    failed: list[str] = field(default_factory=list)  # the checks past tolerance, in words

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class ExportedFile:
    format: str
    precision: str
    path: Path
    bytes: int
    verifications: list[Verification] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verifications)


@dataclass
class ExportResult:
    files: list[ExportedFile]
    metadata: dict[str, Any]

    def raise_for_failures(self) -> None:
        """VerificationError naming every failed check, if any."""
        failed = [f"{f.path.name}: {msg}" for f in self.files for v in f.verifications for msg in v.failed]
        if failed:
            raise VerificationError("verification failed: " + "; ".join(failed) + " (the files were written; "
                                    "pass --no-verify to skip the checks or loosen them with --max-logit-diff/"
                                    "--min-agreement)")

    def to_json(self) -> dict[str, Any]:
        return {"metadata": self.metadata, "files": [
            {**{k: v for k, v in asdict(f).items() if k != "verifications"}, "path": str(f.path), "ok": f.ok,
             "verifications": [{**asdict(v), "ok": v.ok} for v in f.verifications]} for f in self.files]}


# ----------------------------------------------------------------------------------- the model


def load_exportable(name: str, weights: str | Path | None = None, dynamic_size: bool = False) -> LoadedModel:
    """The model built for export: ``exportable=True`` and every attention module unfused."""
    kwargs: dict[str, Any] = {"exportable": True}
    if dynamic_size:
        kwargs["dynamic_img_size"] = True
    try:
        loaded = load_model(name, weights, **kwargs)
    except TypeError as e:
        if dynamic_size and "dynamic_img_size" in str(e):
            raise UsageError(f"--dynamic-size needs a ViT that timm builds with dynamic_img_size=True; "
                             f"'{name}' has no such option") from e
        raise
    for module in loaded.model.modules():
        if hasattr(module, "fused_attn"):  # F.scaled_dot_product_attention exports as one opaque op
            module.fused_attn = False
    return loaded


def shown_name(model: str) -> str:
    """What a file's metadata and default name keep of ``--model``/``--weights``: a timm or store name as
    given, a local folder or file by its own name (``.`` too), never the user's directory layout."""
    raw = model.removeprefix("local-dir:")
    path = Path(raw).expanduser()
    if raw != model or path.exists():
        return path.resolve().name or "model"
    return model


def default_output(model: str) -> Path:
    """``exported/<name>``: the stem each format adds its suffix to when --output is not given."""
    return Path("exported") / (Path(shown_name(model).rstrip("/")).name or "model")


def export_metadata(loaded: LoadedModel, name: str, weights: str | Path | None, options: ExportOptions) -> dict:
    """What a deployed file needs to be used alone: labels, preprocessing, provenance."""
    cfg = loaded.data_config
    return {
        "vitcli_version": __version__,
        "architecture": loaded.arch,
        "model": shown_name(name),
        "weights_source": {"kind": loaded.source, "model": shown_name(name),
                           "weights": shown_name(str(weights)) if weights else None},
        "labels": list(loaded.labels),
        "input_size": list(cfg["input_size"]),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": cfg.get("crop_pct"),
        "crop_mode": cfg.get("crop_mode", "center"),
        "dynamic_size": options.dynamic_size,
        "patch_size": patch_size(loaded.model),
        TEMPERATURE_KEY: model_temperature(loaded),  # predict divides the logits by it; None: plain softmax
    }


# -------------------------------------------------------------------------------- the whole job


def output_path(stem: Path, fmt: str, tag: str = "") -> Path:
    """``exported/deit`` -> ``exported/deit.onnx``, ``exported/deit.int8.onnx``, ``exported/deit-timm``."""
    stem = Path(stem)
    for suffix in (*SUFFIXES.values(), ".pt"):
        if stem.name.endswith(suffix) and suffix != "-timm":
            stem = stem.with_name(stem.name[: -len(suffix)])
    return stem.with_name(f"{stem.name}{tag}{SUFFIXES[fmt]}")


def check_options(options: ExportOptions) -> None:
    unknown = [f for f in options.formats if f not in EXPORTERS]
    if unknown:
        raise UsageError(f"unknown --format '{unknown[0]}'; choose from {', '.join(FORMATS)}")
    if options.precision not in ("fp32", "fp16"):
        raise UsageError(f"unknown --precision '{options.precision}' for export; use fp32 or fp16")
    if options.quantize not in (None, "int8"):
        raise UsageError(f"unknown --quantize '{options.quantize}'; use int8")
    if options.quantize and not {"onnx", "openvino"} & set(options.formats):
        raise UsageError("--quantize int8 quantizes the ONNX or OpenVINO file; add --format onnx or openvino")
    if options.quantize and options.precision != "fp32":
        raise UsageError("--quantize int8 starts from the fp32 model; drop --precision fp16")
    if options.int8_target is not None:
        if not options.quantize:
            raise UsageError("--int8-target is for --quantize int8")
        if not 0 < options.int8_target <= 1:
            raise UsageError(f"--int8-target {options.int8_target} must be a fraction in (0, 1], e.g. 0.98")
        if not options.calibration:
            raise UsageError("--int8-target needs --calibration DIR: images to measure agreement on "
                             "(not the verification images)")
    if options.dynamic_size and "torchscript" in options.formats:
        raise UsageError("--dynamic-size: a TorchScript trace fixes the input size; use --format onnx or pt2")
    if options.opset < OPSET:
        raise UsageError(f"--opset {options.opset}: vitcli exports opset {OPSET} or later")


def export_model(name: str, weights: str | Path | None = None, options: ExportOptions | None = None,
                 say: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``name`` to every format asked, verifying each file against PyTorch.

    Verification failures do not raise here: the result lists them (``raise_for_failures``), so the
    caller can show the figures first.
    """
    options = options or ExportOptions()
    say = say or (lambda _: None)
    check_options(options)
    if "onnx" in options.formats:
        import_onnxruntime()  # the missing extra is reported before minutes of work
        _import_onnx_exporter()
    if options.quantize:
        from vitcli.export.openvino import check_int8_options

        check_int8_options(options)
    verify_sources: list[str] = []
    if options.verify_images:
        from vitcli.export.verify import image_sources

        verify_sources = image_sources(options.verify_images, "--verify-images")
    calibration: list[str] = []
    if options.calibration and options.quantize:
        calibration = calibration_sources(options.calibration, verify_sources)
    say(f"loading {name}")
    loaded = load_exportable(name, weights, options.dynamic_size)
    meta = export_metadata(loaded, name, weights, options)
    model = loaded.model.eval()
    dtype = torch.float16 if options.precision == "fp16" else torch.float32
    _, height, width = meta["input_size"]
    example = torch.randn(2, 3, height, width)

    files: list[ExportedFile] = []
    for fmt in options.formats:
        path = output_path(options.output, fmt, ".fp16" if dtype == torch.float16 else "")
        say(f"exporting {fmt} to {path}")
        file_meta = {**meta, "format": fmt, "precision": options.precision}
        if fmt == "onnx":
            file_meta["opset"] = options.opset
        with quiet_exporters():
            try:
                EXPORTERS[fmt](_cast(model, dtype), example.to(dtype), path, file_meta, options)
            except (UsageError, ExportError):
                raise
            except Exception as e:
                raise ExportError(f"{fmt} export of {loaded.arch} failed: {first_line(e)}; rerun with "
                                  "VITCLI_DEBUG=1 for the traceback") from e
        if fmt != "onnx":
            _write_json_beside(path, fmt, file_meta)
        files.append(ExportedFile(fmt, options.precision, path, _size_of(path)))
    model.float()
    for fmt in ("onnx", "openvino"):
        if options.quantize == "int8" and fmt in options.formats:
            files.append(_export_int8(files, meta, options, calibration, say, fmt))

    if options.verify:
        _verify_all(files, loaded, meta, options, verify_sources, say)
    return ExportResult(files, meta)


def calibration_sources(calibration: Sequence[str], verify_sources: Sequence[str]) -> list[str]:
    """The images of ``--calibration``; a usage error where any of them is also a verification image."""
    from vitcli.export.verify import image_sources

    sources = image_sources(calibration, "--calibration")
    overlap = {Path(s).resolve() for s in sources} & {Path(s).resolve() for s in verify_sources}
    if overlap:
        raise UsageError(f"--calibration and --verify-images share {len(overlap)} images (e.g. "
                         f"{sorted(overlap)[0]}); calibrate on other images, or agreement is measured on "
                         "what was tuned for")
    return sources


def _export_int8(files: list[ExportedFile], meta: dict, options: ExportOptions, calibration: list[str],
                 say: Callable[[str], None], fmt: str) -> ExportedFile:
    """The int8 file of ``fmt`` (ONNX Runtime dynamic, or NNCF for OpenVINO) beside its fp32 file."""
    from vitcli.export import int8

    source = next(f for f in files if f.format == fmt)
    path = output_path(options.output, fmt, ".int8")
    quantize = int8.int8_onnx if fmt == "onnx" else int8.int8_openvino
    notes = quantize(source.path, path, {**meta, "format": fmt}, options, calibration, say)
    return ExportedFile(fmt, "int8", path, _size_of(path), notes=notes)


def verification_sizes(meta: dict, dynamic_size: bool) -> list[tuple[int, int]]:
    """The native size, and with --dynamic-size a smaller square and a larger non-square one."""
    _, h, w = meta["input_size"]
    if not dynamic_size:
        return [(h, w)]
    p = meta.get("patch_size") or 1
    return [(h, w), (max(p, round(h * 0.75 / p) * p), max(p, round(w * 0.75 / p) * p)),
            (round(h * 1.25 / p) * p, w)]


def _verify_all(files: list[ExportedFile], loaded: LoadedModel, meta: dict, options: ExportOptions,
                sources: list[str], say: Callable[[str], None]) -> None:
    from vitcli.export.verify import batch_of, compare, load_readable, run_batched, verification_images

    images, what = (load_readable(sources), f"{len(sources)} --verify-images") if sources else verification_images(())
    if not images:
        raise UsageError("no readable image among --verify-images")
    say(f"verifying on {what}")
    model = loaded.model.float().eval()

    def reference(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).float().numpy()

    for size in verification_sizes(meta, options.dynamic_size):
        batch = batch_of(images, data_config_of(meta, size))
        ref = run_batched(reference, batch, VERIFY_BATCH)
        for f in files:
            tolerance = TOLERANCES[f.precision]
            tolerance = replace(tolerance, **{k: v for k, v in (("max_abs_logit", options.max_logit_diff),
                                                                 ("min_top1", options.min_agreement)) if v is not None})
            run = load_exported(f.format, f.path)
            try:
                got = run_batched(run, batch, VERIFY_BATCH)
            except Exception as e:
                f.verifications.append(Verification(size, len(images), math.inf, 0.0, math.inf,
                                                    [f"does not run at {size[0]}x{size[1]}: {first_line(e)}"]))
                continue
            result = compare(ref, got, tolerance)
            if options.dynamic_size and size != verification_sizes(meta, False)[0] and result["failed"]:
                result["failed"] = [f"at {size[0]}x{size[1]} {msg} (the exported position-embedding resize "
                                    "differs from PyTorch's; export without --dynamic-size)"
                                    for msg in result["failed"]]
            f.verifications.append(Verification(size, len(images), **result))
        say(f"verified at {size[0]}x{size[1]}")


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return model.to(dtype)


def _write_json_beside(path: Path, fmt: str, meta: dict) -> None:
    from vitcli.io.fileio import atomic_open

    target = path / METADATA_FILE if fmt == "timm" else path.with_name(f"{path.name}.json")
    with atomic_open(target, "w") as f:
        json.dump(meta, f, indent=2)


def _size_of(path: Path) -> int:
    if path.suffix == ".xml":  # an IR: the graph and its weights
        return path.stat().st_size + path.with_suffix(".bin").stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _import_onnx_exporter() -> None:
    from vitcli.errors import MissingExtraError
    from vitcli.inference.onnx_engine import INSTALL_HINT

    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(INSTALL_HINT) from e
