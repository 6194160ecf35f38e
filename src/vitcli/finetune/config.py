"""The fine-tuning config: ``FinetuneConfig`` with its commented defaults, the choices, the checks and resume.

No torch here (timm is imported lazily by ``check_config``): the CLI imports this module for its
``--help`` defaults, and ``vitcli --help`` stays instant.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from vitcli.distributed import torchrun_rank
from vitcli.embedded import DEFAULT_MODEL
from vitcli.errors import UsageError

# timm schedulers that can be stepped per optimizer update (plateau needs a metric per epoch)
SCHEDULES = ("cosine", "tanh", "poly", "wsd", "constant")
BALANCE_MODES = ("none", "sampler", "loss")  # class imbalance: off, class-balanced sampling, class-weighted loss
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Options that may change when a run is resumed; anything else must match the saved args.json.
RESUMABLE_OPTIONS = ("epochs", "max_steps", "patience", "workers", "device", "leak_check")
STATE_FILE = "state.pt"  # training state for --resume, in the run folder
ARGS_FILE = "args.json"
RUN_OPTIONS = ("resume", "project", "name", "exist_ok")  # where a run goes, not how it trains


@dataclass
class FinetuneConfig:
    """One fine-tuning run. The defaults are a recipe for small datasets (hundreds to a few thousand
    images) starting from an ImageNet-pretrained ViT; they were chosen on deit_tiny + hymenoptera
    (245 train images), where they reach 95-97% val top-1 in 3 epochs on a CPU."""

    # data
    data: str = ""  # DATA/train/<class>/... (+ DATA/val/) or DATA/<class>/...
    val_split: float = 0.2  # held-out fraction per class when DATA has no val/ folder
    balance: str = "none"  # none | sampler (class-balanced sampling) | loss (class-weighted loss)
    strict: bool = False  # an unreadable image is fatal instead of skipped

    # model
    model: str = DEFAULT_MODEL  # timm name[.tag], a model folder or a store entry
    weights: str | None = None  # a weights file for the --model architecture
    pretrained: bool = True  # False: random init (training from scratch; needs far more data)
    img_size: int | None = None  # None: the pretrained size; else pos_embed is resampled (patch size kept)
    drop_path: float = 0.1  # stochastic depth rate (ignored by models without it)
    freeze: bool = False  # train the classifier head(s) only (a linear probe)
    zero_head: bool = True  # the new head starts at zero (ViT paper); False keeps timm's random init

    # optimization
    epochs: int = 10
    batch_size: int = 32  # per process
    accum_steps: int = 1  # gradient accumulation: optimizer step every N batches
    opt: str = "adamw"  # any timm.optim name
    lr: float = 1e-3  # peak LR of the head; lower layers get lr * layer_decay**depth
    min_lr: float = 1e-6  # LR at the end of the schedule
    weight_decay: float = 0.05
    layer_decay: float | None = 0.65  # layer-wise LR decay (None/1.0 off); timm's group_matcher decides layers
    warmup_epochs: float = 0.5  # linear warmup, in epochs (fractions allowed)
    sched: str = "cosine"  # any timm.scheduler name stepped per update: cosine, tanh, poly, wsd, constant
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0  # max gradient norm (None: off)

    # augmentation (timm's train transform: RandomResizedCrop + flip; small data wants it mild)
    scale_min: float = 0.35  # RandomResizedCrop area range (scale_min, 1.0)
    color_jitter: float = 0.0
    randaugment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1" (timm auto_augment string)
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)

    # weight averaging
    ema: bool = True  # evaluate and save an exponential moving average of the weights
    ema_decay: float = 0.998  # approached with a warmup (ModelEmaV3 use_warmup: ~0.87 at step 20, 0.99 at 1000)

    # run
    precision: str = "auto"  # auto (bf16 on native-bf16 GPUs and AMX CPUs, fp16 on other GPUs), fp32, bf16, fp16
    device: str = "auto"
    workers: int | None = None  # DataLoader processes per training process (None: CPU cores, at most 4)
    seed: int = 0
    patience: int | None = None  # stop after N epochs without improvement (see progress.MIN_DELTA; None: off)
    max_steps: int | None = None  # smoke runs: stop after N optimizer steps in total
    project: str = "runs/finetune"
    name: str | None = None  # run folder name (default exp, exp2, exp3, ...)
    exist_ok: bool = False  # reuse runs/finetune/NAME (the previous run's files in it are removed)
    resume: str | None = None  # a run folder to continue (see resume_config)
    leak_check: bool = True  # warn about train/val near-duplicates (cosine >= 0.95) before training


def default(name: str) -> Any:
    """The default of one FinetuneConfig field (the CLI shows these in --help)."""
    return next(f.default for f in fields(FinetuneConfig) if f.name == name)


def from_cli(given: dict[str, Any]) -> FinetuneConfig:
    """The config for the options given on a command line (absent ones are left out of ``given``).

    Enums and paths become plain values, ``--clip-grad 0`` turns clipping off, and ``--resume``
    continues the saved run (see ``resume_config``).
    """
    given = {k: v.value if isinstance(v, Enum) else str(v) if isinstance(v, os.PathLike) else v
             for k, v in given.items() if v is not None}
    if "clip_grad" in given and not given["clip_grad"]:
        given["clip_grad"] = None  # --clip-grad 0
    resume = given.pop("resume", None)
    if resume is not None:
        return resume_config(resume, **given)
    if "data" not in given:
        raise UsageError("missing DATA: give a folder of class folders (or --resume runs/finetune/NAME)")
    return FinetuneConfig(**given)


def absolute_paths(config: FinetuneConfig) -> FinetuneConfig:
    """``config`` with its data folder, and a model folder or weights file, made absolute: what args.json
    keeps, so --resume works from any directory. Names (timm, store) are left as they are."""
    from dataclasses import replace

    def absolute(value: str | None, must_exist: bool) -> str | None:
        if not value:
            return value
        path = Path(value).expanduser()
        return os.path.abspath(path) if path.exists() or not must_exist else value

    return replace(config, data=absolute(config.data, must_exist=False) or "",
                   model=absolute(config.model, must_exist=True) or config.model,
                   weights=absolute(config.weights, must_exist=True))


def resume_config(run_dir: str | Path, **given: Any) -> FinetuneConfig:
    """The saved config of ``run_dir``, with the options given again on the command line.

    Only RESUMABLE_OPTIONS may change; another option that differs from the saved run is refused.
    ``max_steps`` is not carried over: a resumed smoke run continues to the end unless given again.
    """
    from vitcli.io.fileio import recover_dir

    run_dir = Path(run_dir).expanduser()
    args_file = run_dir / ARGS_FILE
    if not args_file.is_file():
        raise UsageError(f"--resume '{run_dir}' is not a finetune run folder (no {ARGS_FILE}); "
                         "give runs/finetune/NAME")
    if torchrun_rank().main:  # under torchrun one process renames, not every rank at once
        for folder in ("best", "last"):
            recover_dir(run_dir / folder)  # a swap cut short by a hard kill
    if not (run_dir / STATE_FILE).is_file():
        removed = ""
        if torchrun_rank().main:  # a kill during the first save leaves only its partial copy: gone now, named
            from vitcli.io.fileio import remove_partial_copies

            if leftovers := remove_partial_copies(run_dir, (STATE_FILE, ARGS_FILE), ("best", "last")):
                removed = f"; removed what a kill during its first save left: {', '.join(leftovers)}"
        raise UsageError(f"nothing to resume in '{run_dir}': it has no {STATE_FILE} (the run stopped "
                         f"before its first save{removed}); start a new run")
    try:
        saved = json.loads(args_file.read_text(encoding="utf-8"))["config"]
        if not isinstance(saved, dict):
            raise TypeError("config is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        from vitcli.errors import VitcliError, first_line

        raise VitcliError(f"cannot resume: '{args_file}' is damaged ({first_line(e)}); start a new run, "
                          f"with --model '{run_dir / 'last'}' to keep the weights trained so far") from e
    known = {f.name for f in fields(FinetuneConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    saved["max_steps"] = None  # a smoke-run limit holds for the invocation that gives it
    for key, value in given.items():
        if value is None or key in RUN_OPTIONS:
            continue
        if key == "data":
            if Path(value).expanduser().resolve() != Path(saved["data"]).expanduser().resolve():
                raise UsageError(f"--resume '{run_dir}' trained on '{saved['data']}', not '{value}'")
        elif key in ("model", "weights") and _same_path(value, saved.get(key)):
            continue  # the same folder or file, given relative to here (args.json keeps it absolute)
        elif key in RESUMABLE_OPTIONS:
            saved[key] = value
        elif saved.get(key) != value:
            raise UsageError(f"--{key.replace('_', '-')} cannot change when resuming (the run used "
                             f"{saved.get(key)!r}); leave it out, or start a new run")
    saved["resume"] = os.path.abspath(run_dir)
    return FinetuneConfig(**saved)


def _same_path(given: str, saved: str | None) -> bool:
    """Whether ``given`` names an existing file or folder that is ``saved`` (an absolute path)."""
    if saved is None:
        return False
    path = Path(given).expanduser()
    return path.exists() and path.resolve() == Path(saved).expanduser().resolve()


def check_config(config: FinetuneConfig) -> None:
    """Refuse option values that cannot work, before anything is loaded (UsageError, exit 2)."""
    if not config.data and config.resume is None:
        raise UsageError("no data folder given; expected DATA/train/<class>/... or DATA/<class>/...")
    if config.balance not in BALANCE_MODES:
        raise UsageError(f"unknown --balance '{config.balance}'; use none, sampler or loss")
    if config.precision not in PRECISIONS:
        raise UsageError(f"unknown --precision '{config.precision}'; use auto, fp32, bf16 or fp16")
    for name in ("epochs", "batch_size", "accum_steps"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if config.lr <= 0:
        raise UsageError(f"--lr must be positive (got {config.lr})")
    if config.layer_decay is not None and not 0 < config.layer_decay <= 1:
        raise UsageError(f"--layer-decay must be in (0, 1] (got {config.layer_decay})")
    if not 0 < config.scale_min <= 1:
        raise UsageError(f"--scale-min must be in (0, 1] (got {config.scale_min})")
    if not 0 <= config.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1) (got {config.label_smoothing})")
    if config.balance == "loss" and (config.mixup > 0 or config.cutmix > 0):
        raise UsageError("--balance loss cannot be combined with --mixup/--cutmix (soft targets); "
                         "use --balance sampler")
    if config.max_steps is not None and config.max_steps < 1:
        raise UsageError("--max-steps must be at least 1")
    if config.img_size is not None and config.img_size < 16:
        raise UsageError(f"--img-size {config.img_size} is too small")
    from timm.optim import list_optimizers

    if config.opt.lower() not in list_optimizers():
        close = difflib.get_close_matches(config.opt.lower(), list_optimizers(), n=3)
        raise UsageError(f"unknown --opt '{config.opt}'" + (f"; did you mean {', '.join(close)}?" if close else
                                                             "; see timm.optim.list_optimizers()"))
    if config.sched not in SCHEDULES:
        raise UsageError(f"unknown --sched '{config.sched}'; use {', '.join(SCHEDULES)}")
