"""Models: what ``--model``/``--weights`` name, and where the weights come from.

    resolve.py      load_model and LoadedModel: the lookup order every command shares
    names.py        timm names with tags, Hub repository ids
    hub.py          loading from the Hugging Face Hub, failing fast offline
    store.py        the local store (weights/ or $VITCLI_WEIGHTS): find, list, pull
    folders.py      model folders in timm's hub layout (save, detect) and the labels a model carries
    weightfiles.py  reading weight files safely and loading them strictly

The default model ships in ``vitcli.embedded`` (torch-free, so the CLI can name it in --help).
"""
