"""Everything that touches ``timm.create_model``: one resolver that every command reuses.

``--model`` may be
  1. a timm name with an optional pretrained tag (``vit_base_patch16_224.augreg2_in21k_ft_in1k``),
     whose weights come from the Hugging Face Hub through timm and are cached;
  2. a model folder in timm's hub layout (``config.json`` + ``model.safetensors``), as
     ``timm.models.save_for_hf`` and ``vitcli finetune`` write it (``local-dir:`` prefix optional);
  3. any of those names plus ``--weights FILE`` (.safetensors, .pth/.pt/.bin state dicts, JAX .npz);
  4. a name found in the local model store (``weights/`` or ``$VITCLI_WEIGHTS``), loaded offline;
  5. the name of a model shipped inside the package (``vitcli.embedded``: the default, DeiT-Tiny),
     loaded offline; the store and explicit paths come first, the hub after;
  6. a Hugging Face Hub repository, ``hf-hub:org/name`` (or a plain ``org/name`` that is no local path).
A finetune run folder stands for its ``best/`` model (else ``last/``).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

from vitcli.embedded import DEFAULT_MODEL, embedded_model
from vitcli.errors import HubUnreachableError, ModelLoadError, UnknownModelError, UsageError, first_line
from vitcli.models.weightfiles import WEIGHT_SUFFIXES, load_weights

STORE_ENV = "VITCLI_WEIGHTS"
HUB_PROBE_TIMEOUT_S = 3.0
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name, as the Hugging Face Hub spells it
RUN_MODEL_NAMES = ("best", "last")  # model folders inside a `vitcli finetune` run, in order of preference


@dataclass
class LoadedModel:
    """A built model and everything needed to use it: labels, preprocessing, where it came from."""

    model: nn.Module
    name: str  # what the user asked for
    arch: str  # timm architecture name
    source: str  # "hub", "local-dir", "store", "embedded", "weights", "random"
    labels: list[str]
    data_config: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # the model folder it was loaded from (a run folder's best/, ...)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


# ----------------------------------------------------------------------------------------- names


def store_dir() -> Path:
    """The local model store: ``$VITCLI_WEIGHTS`` if set, else ``./weights``."""
    return Path(os.environ.get(STORE_ENV) or "weights").expanduser()


def split_name(name: str) -> tuple[str, str]:
    """``'vit_small_patch16_224.augreg_in21k'`` -> ``('vit_small_patch16_224', 'augreg_in21k')``."""
    arch, _, tag = name.partition(".")
    return arch, tag


def check_arch(name: str) -> str:
    """Return the architecture of a timm name, or raise with the closest valid names."""
    arch, tag = split_name(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models('vit_*')`"
        raise UnknownModelError(f"unknown model '{name}'; {hint}")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
        close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.3) or tags[:3]
        hint = f"; did you mean {', '.join(f'{arch}.{t}' for t in close)}?" if close else ""
        raise UnknownModelError(f"unknown pretrained tag '{tag}' for {arch}{hint}")
    return arch


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def find_in_store(name: str) -> Path | None:
    """A store entry for ``name``: a model folder ``weights/NAME/`` or a file ``weights/NAME.<ext>``."""
    store = store_dir()
    if not name or "/" in name or not store.is_dir():
        return None
    if is_model_folder(store / name):
        return store / name
    for suffix in WEIGHT_SUFFIXES:
        if (store / f"{name}{suffix}").is_file():
            return store / f"{name}{suffix}"
    return None


def list_store() -> list[dict[str, Any]]:
    """Entries of the local model store, for ``vitcli weights list``."""
    import json

    store = store_dir()
    entries: list[dict[str, Any]] = []
    if not store.is_dir():
        return entries
    for path in sorted(store.iterdir()):
        if is_model_folder(path):
            cfg = json.loads((path / "config.json").read_text())
            size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
            arch, classes = cfg.get("architecture", "?"), cfg.get("num_classes", "?")
        elif path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            size, arch, classes = path.stat().st_size, split_name(path.stem)[0], "?"
        else:
            continue
        entries.append({"name": path.stem if path.is_file() else path.name, "path": str(path),
                        "architecture": arch, "num_classes": classes, "bytes": size})
    return entries


# ------------------------------------------------------------------------------------ resolving


def load_model(
    name: str = DEFAULT_MODEL,
    weights: str | Path | None = None,
    *,
    pretrained: bool = True,
    num_classes: int | None = None,
    img_size: int | None = None,
    labels: list[str] | None = None,
    **model_kwargs: Any,
) -> LoadedModel:
    """Build a timm model from any form of ``--model`` (see module docstring).

    Args:
        name: timm name[.tag], a model folder, ``local-dir:PATH``, ``hf-hub:ID`` or a store entry.
        weights: a weights file applied to the architecture ``name``.
        pretrained: False builds the architecture with random weights (training from scratch).
        num_classes: a new classifier size; pretrained heads of another size are dropped.
        img_size: input resolution; ViT position embeddings are resampled by timm to fit.
        labels: class names for a new head (default: the model's own, ImageNet's, or class_N).
        model_kwargs: passed to ``timm.create_model`` (drop_path_rate, ...).
    """
    kwargs = {k: v for k, v in dict(model_kwargs, num_classes=num_classes, img_size=img_size).items()
              if v is not None}
    entry: Path | None = None
    hub_id = _as_hub_id(name) if weights is None else None
    folder = _as_model_folder(name) if hub_id is None else None
    if weights is not None:
        arch = check_arch(name)
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_weights(model, Path(weights), new_head=num_classes is not None)
        source = "weights"
    elif folder is not None:
        model = _create(f"local-dir:{folder.resolve()}", pretrained=pretrained, **kwargs)
        arch = model.pretrained_cfg.get("architecture", split_name(name)[0])
        source = "local-dir"
    elif (entry := find_in_store(name)) is not None:
        if entry.is_dir():
            model = _create(f"local-dir:{entry.resolve()}", pretrained=pretrained, **kwargs)
            arch = model.pretrained_cfg.get("architecture", split_name(name)[0])
        else:
            arch = check_arch(name)
            model = timm.create_model(name, pretrained=False, **kwargs)
            if pretrained:
                load_weights(model, entry, new_head=num_classes is not None)
        source = "store"
    elif (shipped := embedded_model(name)) is not None:
        model = _create(f"local-dir:{shipped}", pretrained=pretrained, **kwargs)
        arch, source = model.pretrained_cfg.get("architecture", name), "embedded"
    elif hub_id is not None:
        model = _create_from_hub(hub_id, pretrained, kwargs, implicit=hub_id != name)
        arch, source = model.pretrained_cfg.get("architecture", hub_id), "hub" if pretrained else "random"
    else:
        if Path(name).suffix in WEIGHT_SUFFIXES and Path(name).is_file():
            raise UsageError(f"'{name}' is a weights file; name its architecture too: "
                             f"--model ARCH --weights {name}")
        arch = check_arch(name)
        model = _create_from_hub(name, pretrained, kwargs)
        source = "hub" if pretrained else "random"
    model.eval()
    # pretrained_cfg keeps the source resolution: a ViT built at 288 must be fed 288, not its pretrained 224
    data_config = (timm.data.resolve_input_data_config(model, args={"img_size": img_size}) if img_size
                   else timm.data.resolve_model_data_config(model))
    return LoadedModel(
        model=model,
        name=name,
        arch=arch,
        source=source,
        labels=labels or model_labels(model),
        data_config=data_config,
        folder=folder if folder is not None else (entry if entry is not None and entry.is_dir() else None),
    )


def _as_hub_id(name: str) -> str | None:
    """``hf-hub:org/name``, or a plain ``org/name`` that names no local path, as timm's ``hf-hub:`` id."""
    if name.startswith("hf-hub:"):
        return name
    if HUB_REPO_ID.fullmatch(name) and not Path(name).expanduser().exists():
        return f"hf-hub:{name}"
    return None


def _as_model_folder(name: str) -> Path | None:
    """The folder meant by ``name`` if it is a path (or ``local-dir:`` path) to one.

    A `vitcli finetune` run folder stands for its ``best/`` model (else ``last/``).
    """
    raw = name.removeprefix("local-dir:")
    looks_like_path = raw != name or os.sep in raw or raw.startswith(".") or Path(raw).is_dir()
    if not looks_like_path:
        return None
    path = Path(raw).expanduser()
    if is_model_folder(path):
        return path
    if path.is_dir():
        for sub in RUN_MODEL_NAMES:
            if is_model_folder(path / sub):
                return path / sub
        raise UsageError(f"model folder '{path}' has no config.json; expected timm's hub layout "
                         "(config.json + model.safetensors) as `vitcli finetune` writes it, or a "
                         "finetune run folder with best/ or last/")
    if raw != name or not (path.suffix in WEIGHT_SUFFIXES and path.is_file()):
        raise UsageError(f"model folder '{path}' does not exist; give a timm name "
                         f"(e.g. {DEFAULT_MODEL}) or a folder with config.json + model.safetensors")
    return None


def _create(name: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load model '{name.removeprefix('local-dir:')}': "
                             f"{first_line(e)}") from e


def _create_from_hub(name: str, pretrained: bool, kwargs: dict[str, Any], implicit: bool = False) -> nn.Module:
    """timm.create_model for hub weights, failing fast with one line when the hub is unreachable.

    ``implicit``: ``name`` came from a plain ``org/name`` that is no local path either, so the
    message says that it was looked for in both places.
    """
    also = f" (and there is no local folder '{name.removeprefix('hf-hub:')}')" if implicit else ""
    if not pretrained and not name.startswith("hf-hub:"):
        return timm.create_model(name, pretrained=False, **kwargs)
    offline = not hub_reachable()
    try:
        # Offline, only the local Hugging Face cache is used (no retries for a minute). An hf-hub:
        # id needs its config.json from the hub even for --no-pretrained.
        with _hub_offline(offline):
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # huggingface_hub raises many types (OSError, HfHubHTTPError, ...)
        if offline or _is_network_error(e):
            raise HubUnreachableError(
                f"could not reach the Hugging Face Hub to download '{name}' and it is not cached{also}; "
                f"use --weights FILE, a local model folder, or run `vitcli weights pull {name}` "
                f"where there is internet and copy the folder into {store_dir()}/"
            ) from e
        raise ModelLoadError(f"could not load pretrained weights for '{name}'{also}: {first_line(e)}") from e


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub endpoint answers an HTTP HEAD within ``timeout`` seconds in all.

    The request goes through urllib's proxy handling (HTTPS_PROXY, HTTP_PROXY, NO_PROXY, as
    huggingface_hub's own client does), and it runs in a daemon thread so that the DNS lookup, which
    no socket timeout covers, counts against the deadline too. (huggingface_hub itself retries for
    ~45 s offline, hence a probe of our own.) Any HTTP answer, even an error status, means reachable.
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    answered: list[bool] = []

    def probe() -> None:
        request = urllib.request.Request(constants.ENDPOINT, method="HEAD", headers={"User-Agent": "vitcli"})
        try:
            with urllib.request.build_opener().open(request, timeout=timeout):
                answered.append(True)
        except urllib.error.HTTPError:  # the hub (or the proxy in front of it) answered
            answered.append(True)
        except Exception:  # URLError, timeouts, refused connections, DNS failures
            answered.append(False)

    thread = threading.Thread(target=probe, name="vitcli-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _is_network_error(e: BaseException) -> bool:
    names = {type(x).__name__ for x in _chain(e)}
    return bool(names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError",
                         "ConnectError", "ConnectTimeout", "gaierror"})


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


# --------------------------------------------------------------------------------------- labels


def model_labels(model: nn.Module) -> list[str]:
    """Labels stored with the model, else ImageNet names for ImageNet-sized heads, else class_N."""
    num_classes = getattr(model, "num_classes", 0) or 0
    stored = model.pretrained_cfg.get("label_names")
    if stored and len(stored) == num_classes:
        return [str(s) for s in (stored.values() if isinstance(stored, dict) else stored)]
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        return [info.index_to_description(i).split(",")[0] for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


# ------------------------------------------------------------------------------------- saving


def save_model_folder(model: nn.Module, folder: Path, labels: list[str],
                      data_config: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` in timm's hub layout (config.json + model.safetensors), atomically.

    ``timm.create_model('local-dir:FOLDER')`` and ``vitcli --model FOLDER`` load it back,
    labels and preprocessing included.
    """
    from timm.models import save_for_hf

    from vitcli.io.fileio import give_ordinary_permissions, replace_dir, temp_dir_beside

    folder = Path(folder)
    tmp = temp_dir_beside(folder)
    try:
        save_for_hf(model, tmp, model_config={"label_names": list(labels)},
                    safe_serialization=True, data_config=data_config)
        give_ordinary_permissions(tmp)  # not mkdtemp's private 0700, nor the 0600 of safetensors' writer
        replace_dir(tmp, folder)  # a complete folder at every instant, even on a second Ctrl-C
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pull_to_store(name: str, refresh: bool = False) -> Path:
    """Download a timm model's pretrained weights from the hub into the store, as a model folder.

    Only timm names are pulled (a local path or a store entry is never rewritten in place); a name
    already in the store is downloaded again only with ``refresh``.
    """
    raw = name.removeprefix("local-dir:")
    if raw != name or Path(raw).expanduser().exists() or os.sep in raw or raw.startswith("."):
        raise UsageError(f"'{name}' is a local path; `weights pull` downloads timm models from the Hugging Face "
                         f"Hub: give a timm name (e.g. {DEFAULT_MODEL}), or copy a model folder into {store_dir()}/")
    if _as_hub_id(name) is not None:
        raise UsageError(f"'{name}' is a Hub repository id; `weights pull` takes timm names (e.g. {DEFAULT_MODEL}); "
                         f"use --model {_as_hub_id(name)} directly (huggingface_hub caches it)")
    check_arch(name)
    existing = find_in_store(name)
    if existing is not None and not refresh:
        raise UsageError(f"'{name}' is already in the store ({existing}); add --refresh to download it again")
    model = _create_from_hub(name, True, {}).eval()
    folder = save_model_folder(model, store_dir() / name, model_labels(model),
                               timm.data.resolve_model_data_config(model))
    if existing is not None and existing.is_file():
        existing.unlink()  # the folder replaces a bare weights file of the same name
    return folder
