"""`vitcli calibrate`: fit a model's temperature on a labelled folder and store it in the model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitcli.cli.errors import fail, handled_errors
from vitcli.cli.options import BatchSizeOpt, DeviceOpt, JsonOpt, WorkersOpt
from vitcli.cli.render import escape, progress_bar


def calibrate(
    data: Annotated[Path, typer.Argument(
        help="A labelled folder of class sub-folders, or a dataset root: DATA/val (validation/, valid/) is "
             "used, else DATA/test, else DATA itself. Use images the model was not trained on.",
        metavar="DATA", show_default=False)],
    model: Annotated[str, typer.Option(
        "--model", "-m", help="The model folder (config.json + model.safetensors) or finetune run folder "
                              "(its best/) whose config.json gets the temperature.",
        metavar="FOLDER")],
    split: Annotated[str | None, typer.Option(
        "--split", "-s", help="Fit on DATA/NAME instead of the automatic choice.", metavar="NAME")] = None,
    json_out: JsonOpt = False,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Fit one temperature T (minimising the NLL of softmax(logits / T), LBFGS on log T) and store it
    as "temperature" in the model folder's config.json, which predict, evaluate and export then use.

    Example: vitcli calibrate ./data --model runs/finetune/exp

    T changes the probabilities, never the top-1; plain timm.create_model('local-dir:FOLDER') still
    loads the folder. The NLL and the expected calibration error (15 bins) before and after T are
    printed (in-sample: evaluate on other images to see how it holds). An empty, one-class or
    unreadable split stores nothing and exits 1 with the reason.
    """
    with handled_errors():
        import json

        from vitcli.console import err, out
        from vitcli.evaluate import calibrate_folder

        with progress_bar("calibrate") as on_batch:
            fitted = calibrate_folder(model, data, None, split, batch_size, workers, device, on_batch)
        if json_out:
            out.out(json.dumps(fitted.to_dict(), allow_nan=False), highlight=False)
        if fitted.temperature is None:
            raise fail(f"no temperature fitted: {escape(fitted.reason)}", 1)
        if not json_out:
            out.print(f"temperature {fitted.temperature:.4f} fitted on {fitted.n_images} images: "
                      f"NLL {fitted.nll_before:.4f} -> {fitted.nll_after:.4f}, "
                      f"ECE {fitted.ece_before:.4f} -> {fitted.ece_after:.4f}", highlight=False)
        for folder in fitted.folders or []:
            err.print(f"stored in {escape(str(Path(folder) / 'config.json'))}", highlight=False)
