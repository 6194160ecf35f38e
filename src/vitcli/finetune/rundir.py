"""The run folder (``runs/finetune/<name>``) and what is written to it. Only rank 0 writes::

    args.json          the resolved FinetuneConfig (absolute paths) and what it resolved to: device, precision, ...
    split.json         the train/val samples (vitcli.io.datasets.FolderData, absolute paths), reused by --resume
    metrics.csv        one row per epoch, rewritten atomically
    state.pt           training state for --resume (tensors and plain containers: weights_only=True)
    best/  last/       timm hub-layout model folders (config.json + model.safetensors), replaced safely
    curves.png  confusion_matrix.png   (the confusion matrix is the best model's, on val)

``state.pt`` is written at the end of every epoch and when the run stops early (Ctrl-C or SIGTERM at an
optimizer-step boundary, --max-steps). It records the position *within* the epoch, so --resume continues
mid-epoch rather than redoing it; with DataLoader workers, a resume from an epoch boundary is still exact,
the augmentations of the rest of an interrupted epoch differ. A NaN/inf loss stops the run and leaves the
last good ``state.pt`` alone.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vitcli.errors import UsageError, VitcliError
from vitcli.finetune.config import ARGS_FILE, STATE_FILE, FinetuneConfig
from vitcli.finetune.progress import Progress
from vitcli.finetune.sampling import rng_state

if TYPE_CHECKING:
    from vitcli.finetune.parts import TrainParts
    from vitcli.models.resolve import LoadedModel

STATE_VERSION = 1
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.csv"
MODEL_FOLDERS = ("best", "last")
# everything a run writes: what --exist-ok clears before a new run reuses the folder
RUN_FILES = (ARGS_FILE, SPLIT_FILE, METRICS_FILE, STATE_FILE, "curves.png", "confusion_matrix.png")


def new_run_dir(config: FinetuneConfig) -> Path:
    """project/name, numbered name2, name3, ... when it exists; created here.

    With ``exist_ok`` the folder is reused, and the files of a previous run in it are removed first
    (state.pt before anything else), so a later --resume cannot mix that run's state with this one's split.
    Only a folder that a vitcli run made (it holds its args.json) or an empty one is reused: anything
    else is refused, and nothing in it is touched.
    """
    project = Path(config.project).expanduser()
    try:
        project.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--project '{project}' is a file, not a folder; give another --project") from None
    base = config.name or "exp"
    if config.exist_ok:
        folder = project / base
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--exist-ok: '{folder}' is a file, not a run folder; give another --name")
        folder.mkdir(exist_ok=True)
        if not is_run_folder(folder) and any(folder.iterdir()):
            raise UsageError(f"--exist-ok reuses only folders a vitcli run made, and '{folder}' has no vitcli "
                             f"{ARGS_FILE}; nothing in it was removed: give another --name, or empty it yourself")
        clear_run(folder)
        return folder
    for n in range(1, 100_000):
        candidate = project / (base if n == 1 else f"{base}{n}")
        try:
            candidate.mkdir()  # atomic: two runs started at once get different folders
            return candidate
        except FileExistsError:
            continue
    raise UsageError(f"too many runs named '{base}' in '{project}'; use --name")


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds the args.json of a vitcli finetune run."""
    try:
        saved = json.loads((folder / ARGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and isinstance(saved.get("config"), dict) and "resolved" in saved


def clear_run(run_dir: Path) -> list[str]:
    """Remove what a previous run wrote to ``run_dir`` (other files are left alone); the names removed."""
    removed = []
    for name in (STATE_FILE, *RUN_FILES):  # state.pt first: without it nothing can be resumed
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed.append(name)
    for name in MODEL_FOLDERS:
        for folder in (run_dir / name, run_dir / f".{name}.old"):
            if folder.is_dir():
                shutil.rmtree(folder)
                removed.append(folder.name)
    return list(dict.fromkeys(removed))


def remove_leftovers(run_dir: Path) -> list[str]:
    """Remove the partial copies a run killed while saving left in ``run_dir`` (a 40 MB ``.state.pt.XXXX``,
    a whole ``.best.XXXX`` folder); ``name (size)`` of each. A ``.best.old`` whose ``best/`` is missing is
    kept: ``fileio.recover_dir`` puts it back (call that first)."""
    from vitcli.io.fileio import remove_partial_copies

    return remove_partial_copies(run_dir, RUN_FILES, MODEL_FOLDERS)


def write_args(run_dir: Path, config: FinetuneConfig, loaded: LoadedModel, data_config: dict[str, Any],
               resolved: dict[str, Any]) -> None:
    """args.json: the config (paths absolute, so --resume works from anywhere) and what it resolved to."""
    import timm

    from vitcli import __version__
    from vitcli.io.fileio import atomic_open

    resolved = {"arch": loaded.arch, "source": loaded.source, **resolved,
                "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
                "versions": {"vitcli": __version__, "timm": timm.__version__, "torch": torch.__version__}}
    with atomic_open(run_dir / ARGS_FILE) as f:
        json.dump({"config": asdict(config), "resolved": resolved}, f, indent=1)


def save_model(folder: Path, model: nn.Module, classes: list[str], data_config: dict[str, Any]) -> None:
    """``model`` as a timm model folder (best/ or last/), replaced so that one exists at every instant."""
    from vitcli.models.folders import save_model_folder

    save_model_folder(model, folder, classes, data_config)


def save_state(run_dir: Path, parts: TrainParts, progress: Progress) -> None:
    """state.pt: model, optimizer, schedule, scaler, EMA, progress and RNG states (weights_only-loadable)."""
    from vitcli.io.fileio import atomic_save_torch

    state = {
        "version": STATE_VERSION,
        "model": parts.raw_model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "progress": asdict(progress),
        "rng": rng_state(),
    }
    atomic_save_torch(state, run_dir / STATE_FILE)


def read_state(path: Path) -> dict[str, Any]:
    """The training state, loaded as plain tensors and containers only (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # written atomically, so only damage from outside gets here
        raise VitcliError(f"cannot resume: '{path}' is corrupt or truncated ({type(e).__name__}); its weights "
                          f"are in '{path.parent / 'last'}': start a new run with --model on that folder") from e


def load_state(state: dict[str, Any], parts: TrainParts) -> Progress:
    """Put a saved state back into ``parts``; where the run was."""
    if state.get("version") != STATE_VERSION:
        raise UsageError(f"{STATE_FILE} has version {state.get('version')}; this vitcli writes {STATE_VERSION}")
    parts.raw_model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    saved_schedule = state["scheduler"] or {}
    if parts.scheduler is not None and saved_schedule.get("t_initial") == getattr(parts.scheduler, "t_initial", None):
        parts.scheduler.load_state_dict(saved_schedule)  # else --epochs changed: the new schedule takes over
    if parts.scaler is not None and state["scaler"] is not None:
        parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None and state["ema"] is not None:
        parts.ema.load_state_dict(state["ema"])
    progress = Progress(**state["progress"])
    if parts.scheduler is not None:
        parts.scheduler.step_update(num_updates=progress.global_step)
    return progress


def metric_columns(rows: list[dict[str, float]]) -> list[str]:
    """metrics.csv's columns: val_top5 only where the rows have it (more than 5 classes)."""
    columns = ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "epoch_time", "img_s"]
    return [c for c in columns if c != "val_top5" or any(c in row for row in rows)]


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    from vitcli.io.fileio import atomic_open

    columns = metric_columns(rows)
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row["epoch"]] + [f"{row[c]:.6g}" for c in columns[1:]])


def write_figures(run_dir: Path, progress: Progress, classes: list[str]) -> None:
    """curves.png (loss and accuracy by epoch) and the best model's confusion matrix on val."""
    from vitcli.charts import save_confusion_matrix, save_curves

    if progress.rows:
        save_curves(progress.rows, run_dir / "curves.png")
    if progress.best_confusion:
        save_confusion_matrix(progress.best_confusion, classes, run_dir / "confusion_matrix.png",
                              title=f"{run_dir.name}: best model (epoch {progress.best_epoch}) on val")
