"""Inputs in: input expansion (files, folders, globs, URLs, lists) into image sources. Loading one
image is ``io.images`` (Pillow only); the model's transforms are ``io.transforms``."""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vitcli.errors import UsageError
from vitcli.io.images import is_url

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".jfif"})


# ------------------------------------------------------------------------------ input expansion


@dataclass(frozen=True)
class InputProblem:
    """An input argument that named no image (a missing path, an empty folder, a glob with no match)."""

    source: str
    reason: str
    before: int = 0  # how many image sources the inputs before it expanded to: its place among them


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def iter_path_list(list_file: str) -> Iterator[str]:
    """Paths from a text file, one per line (``-`` reads stdin); blank lines and # comments skipped.

    Read one line at a time: a list of millions of paths is never held whole.

    A missing list file is reported here, at once, not when the first line is read.
    """
    if list_file == "-":
        return _paths_in(_stdin_lines())
    path = Path(list_file)
    if not path.exists() or path.is_dir():  # a named pipe is fine: it is read as the lines arrive
        raise UsageError(f"--files-from '{list_file}' does not exist; give a text file with one image path "
                         "or URL per line ('-' reads them from stdin)")
    return _paths_in_file(path)


def _paths_in_file(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="surrogateescape") as lines:
        yield from _paths_in(lines)


def _stdin_lines() -> Iterable[str]:
    """stdin as UTF-8 text in which bytes that are not UTF-8 stay themselves (surrogate escapes, as
    ``os.fsdecode`` gives file names): a list of names in any encoding names the same files."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text-only stdin (tests, embedding): its own decoding
        return sys.stdin
    import io

    return io.TextIOWrapper(buffer, encoding="utf-8", errors="surrogateescape")


def _paths_in(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def expand_inputs(inputs: Iterable[str]) -> tuple[list[str], list[InputProblem]]:
    """Files, folders (recursive, by extension), glob patterns and URLs -> image sources, in order.

    Explicit files are kept whatever their extension (a non-image then fails when read, by name).
    """
    sources: list[str] = []
    problems: list[InputProblem] = []
    for item in iter_inputs(inputs):
        if isinstance(item, InputProblem):
            problems.append(InputProblem(item.source, item.reason, len(sources)))
        else:
            sources.append(item)
    return sources, problems


def iter_inputs(inputs: Iterable[str]) -> Iterator[str | InputProblem]:
    """``expand_inputs`` as a stream: each image source, or an InputProblem in its place, in order.

    Folders are walked lazily, one directory listing at a time, in the order of their sorted paths.
    """
    for raw in inputs:
        if is_url(raw):
            yield raw
            continue
        path = Path(raw).expanduser()
        try:
            kind = "dir" if path.is_dir() else "file" if path.exists() else None
        except (OSError, ValueError) as e:  # a name too long, a NUL byte: one failed input, not the job
            yield InputProblem(raw, f"not a usable path ({e.strerror if isinstance(e, OSError) else e})")
            continue
        if kind == "dir":
            found = False
            for source in _walk_images(str(path)):
                found = True
                yield source
            if not found:
                yield InputProblem(raw, f"folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...)")
        elif kind == "file":
            yield str(path)
        elif glob.has_magic(raw):
            found = False
            for match in _glob_images(str(path)):
                found = True
                yield match
            if not found:
                yield InputProblem(raw, "no image matches this pattern")
        else:
            yield InputProblem(raw, "no such file or directory")


def _walk_images(folder: str) -> Iterator[str]:
    """Image files under ``folder``, recursively, in the order ``sorted(str(path))`` gives them.

    Sorting each listing by name, with "/" after directory names, and descending in that order,
    yields exactly the sorted full paths (a directory's paths all start with "name/") while holding
    one listing per level only. Symlinked directories are not followed (as ``Path.rglob``).
    """
    try:
        with os.scandir(folder) as listing:
            entries = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in listing]
    except OSError:
        return
    for key, entry in sorted(entries, key=lambda pair: pair[0]):
        if key.endswith("/"):
            yield from _walk_images(entry.path)
        elif entry.is_file() and is_image_path(Path(entry.name)):
            yield entry.path




def _glob_images(pattern: str) -> Iterator[str]:
    """Image files matching a glob pattern, in sorted order.

    A pattern without ``**`` is Python's glob. One with ``**`` is a folder walk (``_walk_images``: one
    listing per level, never into a symlinked folder) from the pattern's fixed leading folders, each
    path matched against the pattern: Python's glob follows symlinked folders under ``**``, so two
    links to their own folder made it list about 2^40 paths before the first result.
    """
    if "**" not in pattern:
        yield from sorted(p for p in glob.iglob(pattern) if Path(p).is_file() and is_image_path(Path(p)))
        return
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else "")
    regex = _glob_regex(parts)
    for path in _walk_images(base or "."):
        name = path if base else path.removeprefix("./")
        if regex.fullmatch(name):
            yield name


def _glob_regex(parts: list[str]) -> re.Pattern[str]:
    """The regular expression of a glob pattern split at "/": ``**`` is any number of folders, ``*`` and
    ``?`` stay within one name, and neither matches a leading dot (as Python's glob)."""
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(r"(?!\.)[^/]*(?:/(?!\.)[^/]*)*" if last else r"(?:(?!\.)[^/]+/)*")
            continue
        out.append(("" if part.startswith(".") or not glob.has_magic(part) else r"(?!\.)") + _name_regex(part)
                   + ("" if last else "/"))
    return re.compile("".join(out), re.DOTALL)


def _name_regex(part: str) -> str:
    out, i = [], 0
    while i < len(part):
        char = part[i]
        end = part.find("]", i + 2) if char == "[" else -1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif end > 0:
            body = part[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)
