"""Fine-tuning: ``FinetuneConfig`` -> ``fit()`` -> a run folder. Never prints; progress leaves through a callback.

    config.py       FinetuneConfig, its choices, checks and --resume (no torch: the CLI imports it)
    loop.py         build_parts, train_one_epoch, evaluate and fit, top to bottom
    model.py        the model with a new (zeroed) head for the classes, at the training size
    data.py         the layout, the image check (shared by the ranks), the DataLoaders
    sampling.py     the epoch sampler (a function of seed and epoch) and the RNG state
    rundir.py       the run folder: numbering, args.json, split.json, state.pt, metrics.csv, figures, best/ last/
    distributed.py  torchrun: this process's rank, collectives, errors shared by every rank
    stop.py         Ctrl-C/SIGTERM at the next step boundary; the interrupted and NaN messages

Import from the modules (``from vitcli.finetune.loop import fit``): this package imports nothing,
so ``vitcli.finetune.config`` loads without torch.
"""
