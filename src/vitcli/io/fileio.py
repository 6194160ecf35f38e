"""Atomic file writes: a reader never sees half a file, a crash never leaves one.

Files and folders written here get the permissions the user's umask gives ordinary ones (not the
private 0600/0700 of ``tempfile``), so a shared run folder or model store stays readable to the team.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored under a lock)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; it replaces ``path`` only if the block succeeds.

    The result has the mode ``open(path, "w")`` would give it: an existing file's, else 0666 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        permissions = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        permissions = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, permissions) if hasattr(os, "fchmod") else os.chmod(tmp, permissions)
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")  # the same bytes on every locale
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_torch(obj: object, path: str | Path) -> None:
    """torch.save through a temporary file (training state for --resume)."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def temp_dir_beside(path: str | Path) -> Path:
    """A new, empty folder next to ``path`` (same file system, so it can be renamed onto it), with the
    permissions ``mkdir`` would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def give_ordinary_permissions(folder: str | Path) -> None:
    """Files and folders under ``folder`` get the modes the umask gives new ones (safetensors writes 0600)."""
    mask = current_umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _old(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def recover_dir(folder: str | Path) -> bool:
    """Undo a ``replace_dir`` cut short between its two renames (a hard kill): the old folder comes back.

    Returns whether anything was recovered.
    """
    folder = Path(folder)
    if not folder.exists() and _old(folder).is_dir():
        _old(folder).rename(folder)
        return True
    return False


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block is done (a second Ctrl-C cannot land inside it)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def replace_dir(new: str | Path, folder: str | Path) -> Path:
    """Put the complete folder ``new`` at ``folder``, so that a complete ``folder`` exists at every instant
    that matters: the old one is moved aside, the new one moved in, and only then is the old one deleted.

    Signals are held between the two renames; if anything else stops the second, the old folder is put
    back, and a hard kill between them is undone by ``recover_dir`` (called here and on --resume).
    """
    new, folder = Path(new), Path(folder)
    old = _old(folder)
    recover_dir(folder)
    with _signals_held():
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            try:
                new.rename(folder)
            except BaseException:
                old.rename(folder)
                raise
        else:
            new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def lock_for_writing(stream: IO, path: str | Path) -> None:
    """Take an exclusive lock on an open output file, or fail at once if another process holds one.

    Two jobs appending to one ``--output`` would interleave their records and garble lines; the lock
    (``flock``, released when the file is closed or the process dies) makes the second one stop before
    it writes anything. File systems without locks (some network mounts) are written unlocked.
    """
    from vitcli.errors import VitcliError

    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return
    try:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise VitcliError(f"'{path}' is being written by another vitcli job (it holds a lock on the file); "
                          "wait until that job ends, or give another file name") from None
    except OSError:
        return


def describe_os_error(e: OSError, path: str | Path | None = None) -> str:
    """One line for an error of the machine, not of vitcli: the file, what happened, what to do."""
    import errno

    where = f"'{path or e.filename}': " if (path or e.filename) else ""
    reason = e.strerror or type(e).__name__
    fix = {errno.ENOSPC: "free some space and rerun the same command",
           errno.EDQUOT: "free some space (the disk quota is full) and rerun the same command",
           errno.EROFS: "the file system is read-only: write somewhere else (another --output, --project or folder)",
           errno.EACCES: "write somewhere you may, or change the permissions",
           errno.EPERM: "write somewhere you may, or change the permissions",
           errno.EISDIR: "give a file name, not a folder",
           errno.ENOTDIR: "a part of the path is a file, not a folder: give another path"}.get(e.errno or 0)
    return f"{where}{reason}" + (f"; {fix}" if fix else "")


def remove_partial_copies(folder: str | Path, names: tuple[str, ...], folders: tuple[str, ...] = ()) -> list[str]:
    """Remove what a hard kill in the middle of a save left in ``folder``: the temporary files of
    ``atomic_open`` beside ``names`` (``.state.pt.k3j9x_2a``), the temporary folders of ``temp_dir_beside``
    beside ``folders`` (``.best.x8w2q1ab``) and ``replace_dir``'s ``.best.old`` once ``best/`` is back
    (``recover_dir`` first). Returns ``name (size)`` of each, for the user."""
    import re

    files = re.compile(r"\.(?:" + "|".join(re.escape(n) for n in names) + r")\.\w+")
    dirs = re.compile(r"\.(" + "|".join(re.escape(n) for n in folders) + r")\.(\w+)") if folders else None
    folder = Path(folder)
    removed = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
        if entry.is_file() and files.fullmatch(entry.name):
            size = entry.stat().st_size
            entry.unlink()
        elif entry.is_dir() and dirs is not None and (match := dirs.fullmatch(entry.name)):
            if match.group(2) == "old" and not (folder / match.group(1)).is_dir():
                continue  # recover_dir's to put back
            size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
            shutil.rmtree(entry)
        else:
            continue
        removed.append(f"{entry.name} ({size / 1e6:.1f} MB)")
    return removed
