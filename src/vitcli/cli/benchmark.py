"""`vitcli benchmark`: img/s and latency per backend, precision and batch size on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from vitcli.cli.errors import handled_errors
from vitcli.cli.options import DEFAULT_MODEL, JsonOpt, ModelOpt, WeightsOpt
from vitcli.cli.render import escape


def benchmark(
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    batch_sizes: Annotated[str, typer.Option(
        "--batch-sizes", "-b", help="Comma-separated batch sizes.")] = "1,8,32",
    backends: Annotated[str | None, typer.Option(
        "--backends", help="Comma-separated subset of torch-fp32, torch-bf16, torch-compile, openvino-fp32, "
                           "openvino-bf16, openvino-int8, onnxruntime-fp32, onnxruntime-int8, cuda-fp32, cuda-fp16, "
                           "cuda-bf16, onnxruntime-cuda (default: all this machine can run).",
        show_default=False)] = None,
    repeats: Annotated[int, typer.Option("--repeats", "-r", min=3, help="Timed runs per batch size and backend.")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 2,
    verify_images: Annotated[list[str] | None, typer.Option(
        "--verify-images", help="Images (folder, files, glob) to check each backend on (default: generated "
                                "images, on which int8 agrees less than on photos).", show_default=False)] = None,
    calibration: Annotated[list[str] | None, typer.Option(
        "--calibration", help="Images (folder, files, glob) NNCF calibrates the openvino-int8 row on, as for "
                              "`vitcli export --quantize int8`; never the verification images. Without them "
                              "that row is skipped.", show_default=False)] = None,
    int8_target: Annotated[float, typer.Option(
        "--int8-target", min=0.0, max=1.0,
        help="The openvino-int8 row's top-1 agreement with fp32 on --calibration images (NNCF's accuracy "
             "control keeps the layers that hurt most in floating point).")] = 0.98,
    json_out: JsonOpt = False,
) -> None:
    """Time a model on every backend this machine can run and name the fastest verified one.

    Example: vitcli benchmark -m deit_tiny_patch16_224 --weights deit.safetensors -b 1,32

    With --calibration DIR it also times OpenVINO int8 (NNCF, accuracy-controlled) calibrated on DIR.

    Backends take turns within each repeat, so a busy machine slows them alike. Each backend's
    outputs are checked against torch eager fp32 on generated images; only verified ones can win.
    """
    with handled_errors():
        from vitcli.benchmark import run_benchmark
        from vitcli.console import err, out
        from vitcli.errors import UsageError

        try:
            sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"--batch-sizes '{batch_sizes}': give integers separated by commas, e.g. 1,8,32") from None
        names = [b.strip() for b in backends.split(",") if b.strip()] if backends else None
        with err.status("benchmarking") as status:
            result = run_benchmark(model, weights, sizes, repeats, warmup, names, verify_images or (),
                                   say=lambda msg: (status.update(escape(msg)),
                                                    err.print(escape(msg), style="dim", highlight=False)),
                                   calibration=calibration or (), int8_target=int8_target)
        if json_out:
            import dataclasses
            import json

            bound = result.bound()
            out.out(json.dumps({**dataclasses.asdict(result), "fastest": _fastest_dict(result),
                                "decode_once_bound": bound[0] if bound else None}), highlight=False)
            return
        _render(result, out)


def _fastest_dict(result):
    import dataclasses

    best = result.fastest()
    return dataclasses.asdict(best) if best else None


def _render(result, out) -> None:
    from rich import box
    from rich.table import Table

    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result.cpu.items())
    rates = ", ".join(f"{k} {v:.0f}" for k, v in result.matmul_gflops.items())
    out.print(f"{escape(result.model)}: {result.parameters / 1e6:.2f}M parameters, "
              f"{result.gflops_per_image:.2f} GFLOPs/image; "
              f"CPU: {flags}; {result.threads} threads; matmul GFLOP/s: {rates}", highlight=False)
    table = Table(header_style="bold", box=box.SIMPLE_HEAD)
    for name in ("backend", "batch", "img/s", "p50 ms", "p90 ms", "vs eager", "of peak", "top-1", "ok"):
        table.add_column(name, justify="left" if name == "backend" else "right", no_wrap=True)
    for r in result.rows:
        speedup = result.speedup(r.backend, r.batch_size)
        table.add_row(r.backend, str(r.batch_size), f"{r.images_per_s:.1f}", f"{r.p50_ms:.1f}", f"{r.p90_ms:.1f}",
                      f"{speedup:.2f}x" if speedup else "",
                      f"{r.fraction_of_peak:.0%} {r.dtype}" if r.fraction_of_peak is not None else "",
                      f"{r.top1_agreement:.1%}", "[green]yes[/]" if r.verified else "[red]no[/]")
    if out.is_terminal:
        out.print(table)
    else:  # piped or redirected: rich would fold the figures into 80 columns
        from rich.console import Console

        Console(file=out.file, width=130, soft_wrap=True).print(table)
    for backend, reason in result.skipped.items():
        out.print(escape(f"skipped {backend}: {reason}"), highlight=False)
    for bs in sorted({r.batch_size for r in result.rows}):
        int8, fp32 = result.speedup("onnxruntime-int8", bs), result.speedup("onnxruntime-fp32", bs)
        if int8 is not None and fp32 is not None and int8 <= fp32:
            out.print(f"int8 is not faster than ONNX Runtime fp32 at batch {bs} on this CPU "
                      f"({int8 / fp32:.2f}x): prefer fp32 here", highlight=False)
        for ov_float in ("openvino-bf16", "openvino-fp32"):  # int8 against the float OpenVINO row it would replace
            ratio = result.speedup("openvino-int8", bs, baseline=ov_float)
            if ratio is not None:
                if ratio <= 1:
                    out.print(f"OpenVINO int8 is not faster than {ov_float} at batch {bs} on this CPU "
                              f"({ratio:.2f}x): prefer {ov_float} here", highlight=False)
                break
    _render_bound(result, out)
    best = result.fastest()
    if best is None:
        out.print("no backend passed verification", highlight=False)
    else:
        out.print(f"fastest verified: {best.backend} at batch {best.batch_size}, {best.images_per_s:.1f} img/s "
                  f"({result.speedup(best.backend, best.batch_size) or 1:.2f}x torch eager fp32)", highlight=False)


def _render_bound(result, out) -> None:
    """The row predict runs by default and the most it can reach end to end here (decode-once bound)."""
    line = f"vitcli predict runs {result.default_backend} by default here (--backend auto, --precision auto)"
    bound = result.bound()
    if bound is not None:
        rate, row = bound
        line += (f"; decode-once bound {rate:.1f} img/s: decoding {result.decode_images_per_s:.1f} img/s and the "
                 f"model {row.images_per_s:.1f} img/s (batch {row.batch_size}) on the same {result.threads} cores")
    elif not result.decode_images_per_s:
        line += "; pass --verify-images PHOTOS to time decoding and print the decode-once bound"
    out.print(line, highlight=False, markup=False)
