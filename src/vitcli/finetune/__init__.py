"""Fine-tuning: ``FinetuneConfig`` -> ``fit()`` -> a run folder. Never prints; progress leaves through a callback.

    config.py       FinetuneConfig, its choices, checks and --resume (no torch: the CLI imports it)
    parts.py        TrainParts (what one optimizer step touches) and build_parts, from timm's recipe pieces
    progress.py     Progress (where the run is, saved in state.pt) and RunResult
    loop.py         train_one_epoch, evaluate and fit, top to bottom
    model.py        the model with a new (zeroed) head for the classes, at the training size
    data.py         the layout, the image check (shared by the ranks), the DataLoaders
    sampling.py     the epoch sampler (a function of seed and epoch) and the RNG state
    rundir.py       the run folder: numbering, args.json, split.json, state.pt, metrics.csv, figures, best/ last/
    stop.py         Ctrl-C/SIGTERM at the next step boundary; the interrupted and NaN messages

torchrun lives in ``vitcli.distributed``. Import from the modules (``from vitcli.finetune.loop import fit``):
this package imports nothing, so ``vitcli.finetune.config`` loads without torch.
"""
