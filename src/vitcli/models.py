"""Everything that touches ``timm.create_model``: one resolver that every command reuses.

``--model`` may be
  1. a timm name with an optional pretrained tag (``vit_base_patch16_224.augreg2_in21k_ft_in1k``),
     whose weights come from the Hugging Face Hub through timm and are cached;
  2. a model folder in timm's hub layout (``config.json`` + ``model.safetensors``), as
     ``timm.models.save_for_hf`` and ``vitcli finetune`` write it (``local-dir:`` prefix optional);
  3. any of those names plus ``--weights FILE`` (.safetensors, .pth/.pt/.bin state dicts, JAX .npz);
  4. a name found in the local model store (``weights/`` or ``$VITCLI_WEIGHTS``), loaded offline;
  5. the name of a model shipped inside the package (``vitcli.embedded``: the default, DeiT-Tiny),
     loaded offline; the store and explicit paths come first, the hub after.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
from torch import nn

from vitcli.embedded import DEFAULT_MODEL, embedded_model
from vitcli.errors import HubUnreachableError, ModelLoadError, UnknownModelError, UsageError, first_line
from vitcli.weightfiles import WEIGHT_SUFFIXES, load_weights

STORE_ENV = "VITCLI_WEIGHTS"
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass
class LoadedModel:
    """A built model and everything needed to use it: labels, preprocessing, where it came from."""

    model: nn.Module
    name: str  # what the user asked for
    arch: str  # timm architecture name
    source: str  # "hub", "local-dir", "store", "embedded", "weights", "random"
    labels: list[str]
    data_config: dict[str, Any] = field(default_factory=dict)

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
    folder = _as_model_folder(name)
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
    elif name.startswith("hf-hub:"):
        model = _create_from_hub(name, pretrained, kwargs)
        arch, source = model.pretrained_cfg.get("architecture", name), "hub"
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
    )


def _as_model_folder(name: str) -> Path | None:
    """The folder meant by ``name`` if it is a path (or ``local-dir:`` path) to one."""
    raw = name.removeprefix("local-dir:")
    looks_like_path = raw != name or os.sep in raw or raw.startswith(".") or Path(raw).is_dir()
    if not looks_like_path:
        return None
    path = Path(raw).expanduser()
    if is_model_folder(path):
        return path
    if path.is_dir():
        raise UsageError(f"model folder '{path}' has no config.json; expected timm's hub layout "
                         "(config.json + model.safetensors) as `vitcli finetune` writes it")
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


def _create_from_hub(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model for hub weights, failing fast with one line when the hub is unreachable."""
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    offline = not hub_reachable()
    try:
        # Offline, only the local Hugging Face cache is used (no retries for a minute).
        with _hub_offline(offline):
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # huggingface_hub raises many types (OSError, HfHubHTTPError, ...)
        if offline or _is_network_error(e):
            raise HubUnreachableError(
                f"could not reach the Hugging Face Hub to download '{name}' and it is not cached; "
                f"use --weights FILE, a local model folder, or run `vitcli weights pull {name}` "
                f"where there is internet and copy the folder into {store_dir()}/"
            ) from e
        raise ModelLoadError(f"could not load pretrained weights for '{name}': {first_line(e)}") from e


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub endpoint (huggingface_hub itself retries for ~45 s offline)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


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

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_for_hf(model, tmp, model_config={"label_names": list(labels)},
                    safe_serialization=True, data_config=data_config)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pull_to_store(name: str) -> Path:
    """Download a hub model through timm and keep it in the store as a model folder."""
    loaded = load_model(name)
    return save_model_folder(loaded.model, store_dir() / name, loaded.labels)
