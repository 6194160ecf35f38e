"""Fine-tuning: ``FinetuneConfig`` -> ``fit()`` -> a run folder. Never prints; progress leaves through a callback.

    config.py       FinetuneConfig, its choices, checks and --resume (no torch: the CLI imports it)
    distributed.py  torchrun: this process's rank, collectives, errors shared by every rank
    sampling.py     the epoch sampler (a function of seed and epoch) and the RNG state
    rundir.py       the run folder: numbering, args.json, split.json, state.pt, metrics.csv, figures, best/ last/
    loop.py         build_parts, train_one_epoch, evaluate and fit, top to bottom

Import from the modules (``from vitcli.finetune.loop import fit``): this package imports nothing,
so ``vitcli.finetune.config`` loads without torch.
"""
