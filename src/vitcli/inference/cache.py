"""The compiled-model cache: one verified OpenVINO model per (weights, precision, OpenVINO, CPU), on disk.

``$XDG_CACHE_HOME/vitcli/openvino/KEY/`` (else ``~/.cache/vitcli/...``) holds ``model.blob`` (the
model compiled for this CPU and precision, ``CompiledModel.export_model``; imported without the
0.5-1 s compile) and ``manifest.json``: the key, the verdict of the verification against torch
(``ok``, or why not: a refusal is remembered too), vitcli's metadata (labels, preprocessing,
provenance) and every file's size and SHA-256.

The key is computed from the model's files without torch (``model_files``): a lookup that hits
never imports torch or timm. An entry whose files do not match its manifest (truncated, corrupt,
another key's) is moved aside and rebuilt. Entries are built in a temporary folder and renamed
into place, under a file lock per key, so concurrent processes (``--shard`` jobs, torchrun ranks)
build each entry once and never see half of one. Torch-free at import.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitcli.cpuinfo import cpu_flags

CACHE_FORMAT = 1  # bump when the entry layout or the verification rule changes
MANIFEST = "manifest.json"
BLOB_NAME = "model.blob"
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
LOCK_TIMEOUT_S = 600.0
RUN_FOLDERS = ("best", "last")  # as vitcli.models.resolve: a finetune run folder stands for best/, else last/


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/vitcli`` (an absolute XDG_CACHE_HOME only, as the spec says), else ``~/.cache/vitcli``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "vitcli"


# -------------------------------------------------------------------------------------- the key


def model_files(name: str, weights: str | Path | None = None) -> list[Path] | None:
    """The files that define ``--model name [--weights FILE]``, found as ``models.resolve`` finds them, or
    None where only loading the model can tell (a hub name: timm resolves and downloads it)."""
    from vitcli.embedded import embedded_model

    if weights is not None:
        return [Path(weights)] if Path(weights).is_file() else None
    if name.startswith("hf-hub:"):
        return None
    raw = name.removeprefix("local-dir:")
    path = Path(raw).expanduser()
    if raw != name or os.sep in raw or raw.startswith(".") or path.is_dir():
        for folder in (path, *(path / sub for sub in RUN_FOLDERS)):
            if (folder / "config.json").is_file():
                return _folder_files(folder)
        return None
    store = Path(os.environ.get("VITCLI_WEIGHTS") or "weights").expanduser()
    if name and "/" not in name and store.is_dir():
        if (store / name / "config.json").is_file():
            return _folder_files(store / name)
        for suffix in (".safetensors", ".pth", ".pt", ".bin", ".npz"):
            if (store / f"{name}{suffix}").is_file():
                return [store / f"{name}{suffix}"]
    shipped = embedded_model(name)
    return _folder_files(shipped) if shipped is not None else None


def _folder_files(folder: Path) -> list[Path] | None:
    weights = [folder / n for n in WEIGHT_FILE_NAMES if (folder / n).is_file()]
    return [folder / "config.json", weights[0]] if weights else None


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 8 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def files_digest(files: list[Path]) -> str:
    """One digest of a model's files (their names inside the model and their bytes)."""
    return hashlib.sha256(json.dumps([[p.name, file_digest(p)] for p in files]).encode()).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What an entry depends on; ``id`` names its folder."""

    fields: dict[str, Any]

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()[:32]


def cache_key(weights_digest: str, arch: str | None, precision: str, openvino: str) -> CacheKey:
    """The key: weights (and the architecture they were given for), precision, OpenVINO, the CPU's flags."""
    return CacheKey({"format": CACHE_FORMAT, "weights": weights_digest, "arch": arch, "precision": precision,
                     "openvino": openvino,
                     "cpu": hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]})


# ------------------------------------------------------------------------------------ entries


@dataclass
class Entry:
    """A cache entry that matched its manifest."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.manifest.get("status") == "ok"

    @property
    def has_model(self) -> bool:
        return (self.folder / BLOB_NAME).is_file()

    @property
    def reason(self) -> str:
        return str(self.manifest.get("reason") or "")


class EntryDamaged(Exception):
    """An entry whose files do not match its manifest."""


def read_entry(root: Path, key: CacheKey) -> Entry | None:
    """The entry of ``key`` if it is whole; None if there is none. Raises EntryDamaged for a bad one."""
    folder = root / "openvino" / key.id
    if not folder.exists():
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise EntryDamaged(f"unreadable manifest ({type(e).__name__})") from e
    if not isinstance(manifest, dict) or manifest.get("key") != key.fields:
        raise EntryDamaged("the manifest is for another key")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise EntryDamaged("the manifest lists no files")
    for rel, (size, digest) in files.items():
        path = folder / rel
        try:
            if path.stat().st_size != size or file_digest(path) != digest:
                raise EntryDamaged(f"{rel} differs from the manifest")
        except OSError as e:
            raise EntryDamaged(f"{rel} is missing") from e
    return Entry(folder, manifest)


def discard(root: Path, key: CacheKey) -> None:
    """Move a damaged entry aside (one rename, so readers never see half of it) and delete it."""
    folder = root / "openvino" / key.id
    aside = folder.with_name(f".{key.id}.damaged.{os.getpid()}.{time.monotonic_ns()}")
    with contextlib.suppress(OSError):
        os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def new_entry_dir(root: Path, key: CacheKey) -> Path:
    """A fresh temporary folder beside where the entry goes (same filesystem: the rename is atomic)."""
    parent = root / "openvino"
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{key.id}.building.", dir=parent))


def commit_entry(root: Path, key: CacheKey, tmp: Path, manifest: dict[str, Any]) -> Entry:
    """Checksum ``tmp``'s files into its manifest and rename it into place; if another process got there
    first, keep theirs (an equal entry) and drop ours."""
    files = {str(p.relative_to(tmp)): [p.stat().st_size, file_digest(p)]
             for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {**manifest, "key": key.fields, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the entry from the other users of a shared cache
    folder = root / "openvino" / key.id
    try:
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process committed the same key meanwhile
        try:
            return read_entry(root, key) or Entry(folder, manifest)
        except EntryDamaged as e:  # a damaged entry that could not be moved aside: build in memory
            raise OSError(f"the cache entry {folder} is damaged and cannot be replaced ({e})") from e
    return Entry(folder, manifest)


@contextlib.contextmanager
def build_lock(root: Path, key: CacheKey, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive lock on ``key`` across processes (fcntl), so one builds while the others wait.

    Raises OSError where the cache cannot hold a lock file (read-only, full): build in memory then.
    Without fcntl (Windows), or past ``timeout``, it goes on unlocked: the rename keeps entries whole.
    """
    locks = root / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{key.id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock
