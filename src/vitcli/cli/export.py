"""`vitcli export`: ONNX / OpenVINO / TorchScript / torch.export / timm-folder files, verified against PyTorch."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from vitcli.cli.errors import handled_errors
from vitcli.cli.options import DEFAULT_MODEL, JsonOpt, ModelOpt, WeightsOpt
from vitcli.cli.render import escape


class Format(str, Enum):
    onnx = "onnx"
    openvino = "openvino"
    torchscript = "torchscript"
    pt2 = "pt2"
    timm = "timm"


class ExportPrecision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


class Quantize(str, Enum):
    int8 = "int8"


def export(
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    formats: Annotated[list[Format] | None, typer.Option(
        "--format", "-f", help="onnx (default), openvino (IR: .xml + .bin), torchscript, pt2 (torch.export) or timm "
                               "(hub-layout folder); "
                               "repeat for several.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Output stem: each format adds its suffix (.onnx, .int8.onnx, .xml, .int8.xml, "
                               ".torchscript.pt, .pt2, -timm/). Default: exported/MODEL_NAME.",
        show_default=False)] = None,
    precision: Annotated[ExportPrecision, typer.Option(
        "--precision", help="fp32, or fp16 weights and input (for GPU runtimes).")] = ExportPrecision.fp32,
    quantize: Annotated[Quantize | None, typer.Option(
        "--quantize", help="Also write an int8 file: for onnx, ONNX Runtime dynamic quantization (per-channel "
                           "weights); for openvino, NNCF static quantization calibrated on --calibration.",
        show_default=False)] = None,
    int8_target: Annotated[float | None, typer.Option(
        "--int8-target", min=0.0, max=1.0,
        help="Accuracy-aware int8: keep the MatMuls that hurt most in fp32 until top-1 agreement with fp32 on "
             "--calibration images reaches this fraction (e.g. 0.98); for openvino, NNCF's accuracy control.",
        show_default=False)] = None,
    calibration: Annotated[list[str] | None, typer.Option(
        "--calibration", help="Images (folder, files, glob) for --int8-target and OpenVINO int8; never the "
                              "verification images.",
        show_default=False)] = None,
    verify_images: Annotated[list[str] | None, typer.Option(
        "--verify-images",
        help="Images (folder, files, glob) to verify on (default: generated images and shipped photos).",
        show_default=False)] = None,
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help="Check every file against PyTorch (exit 1 past the tolerance).")] = True,
    dynamic_size: Annotated[bool, typer.Option(
        "--dynamic-size", help="Any input size (ViTs with dynamic_img_size: position embeddings resized in the "
                               "graph); verified at the native size and two others.")] = False,
    opset: Annotated[int, typer.Option("--opset", min=18, help="ONNX opset.")] = 18,
    max_logit_diff: Annotated[float | None, typer.Option(
        "--max-logit-diff", help="Override the max |Δlogit| tolerance (fp32 1e-3, fp16 0.25, int8 unchecked).",
        show_default=False)] = None,
    min_agreement: Annotated[float | None, typer.Option(
        "--min-agreement", min=0.0, max=1.0,
        help="Override the top-1 agreement tolerance (fp32 1.0, fp16 0.98, int8 0.95).", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Export a model and verify it against PyTorch.

    Example: vitcli export -m runs/finetune/exp -f onnx -f timm --quantize int8 --verify-images val/

    Labels, input size, mean/std, interpolation and crop settings travel inside each file (ONNX
    metadata_props and OpenVINO rt_info as JSON, an extra file vitcli.json inside .pt/.pt2) and in
    a .json beside it.
    Exit code 1 if a check fails (the files stay written).
    """
    with handled_errors():
        from vitcli.console import err, out
        from vitcli.export.job import default_output, export_model
        from vitcli.export.options import ExportOptions

        stem = output or default_output(model)
        options = ExportOptions(
            formats=tuple(dict.fromkeys(f.value for f in (formats or [Format.onnx]))), output=stem,
            precision=precision.value, quantize=quantize.value if quantize else None, int8_target=int8_target,
            calibration=tuple(calibration or ()), verify=verify, verify_images=tuple(verify_images or ()),
            dynamic_size=dynamic_size, opset=opset, max_logit_diff=max_logit_diff, min_agreement=min_agreement)
        with err.status("exporting") as status:
            def say(msg: str) -> None:
                status.update(escape(msg))
                err.print(escape(msg), style="dim", highlight=False)

            result = export_model(model, weights, options, say=say)
        if json_out:
            import json

            out.out(json.dumps(result.to_json()), highlight=False)
        else:
            out.print(_table(result))
        for f in result.files:
            for note in f.notes:
                err.print(escape(f"{f.path.name}: {note}"), highlight=False)
        result.raise_for_failures()


def _table(result):
    from rich import box
    from rich.table import Table


    folders = sorted({str(f.path.parent) for f in result.files})
    table = Table(header_style="bold", box=box.SIMPLE_HEAD,
                  title=f"{result.metadata['architecture']} ({len(result.metadata['labels'])} classes) in "
                        f"{escape(', '.join(folders))}")
    for name in ("file", "MB", "size", "max |Δlogit|", "top-1", "mean KL", "check"):
        table.add_column(name, justify="left" if name in ("file", "check") else "right",
                         no_wrap=name not in ("file", "check"), overflow="fold")
    for f in result.files:
        rows = f.verifications or [None]
        for i, v in enumerate(rows):
            first = i == 0
            cells = [escape(f.path.name) if first else "", f"{f.bytes / 1e6:.1f}" if first else ""]
            if v is None:
                cells += ["", "", "", "", "not verified"]
            else:
                cells += [f"{v.size[0]}x{v.size[1]}", f"{v.max_abs_logit:.2e}", f"{v.top1_agreement:.1%}",
                          f"{v.mean_kl:.2e}", "[green]ok[/]" if v.ok else f"[red]{escape('; '.join(v.failed))}[/]"]
            table.add_row(*cells, end_section=i == len(rows) - 1)
    return table
