"""vitcli.io.fileio: atomic files with ordinary permissions; folders replaced safely."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vitcli.io.fileio import atomic_open, recover_dir, replace_dir, temp_dir_beside


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                       (0o077, 0o600, 0o700)])
def test_written_files_and_folders_get_the_umasks_permissions(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    with atomic_open(tmp_path / "a.json") as f:
        f.write("{}")
    assert mode(tmp_path / "a.json") == file_mode
    assert mode(temp_dir_beside(tmp_path / "folder")) == dir_mode


def test_rewriting_a_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "metrics.csv"
    path.write_text("old")
    path.chmod(0o640)
    with atomic_open(path) as f:
        f.write("new")
    assert path.read_text() == "new" and mode(path) == 0o640


def folder_with(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "model.safetensors").write_text(text)
    return path


def test_replace_dir_interrupted_between_its_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    best = folder_with(tmp_path / "best", "old")
    new = folder_with(tmp_path / ".best.new", "new")
    real, calls = Path.rename, []

    def rename(self, target):
        calls.append((self.name, Path(target).name))
        if len(calls) == 2:  # best -> .best.old done; the new folder's move is cut short
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, best)
    assert calls[:2] == [("best", ".best.old"), (".best.new", "best")]
    assert (best / "model.safetensors").read_text() == "old"
    monkeypatch.setattr(Path, "rename", real)
    replace_dir(new, best)
    assert (best / "model.safetensors").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_hard_kill_between_the_renames_is_recovered(tmp_path):
    folder_with(tmp_path / ".last.old", "old")  # what a kill -9 between the two renames leaves
    assert recover_dir(tmp_path / "last")
    assert (tmp_path / "last" / "model.safetensors").read_text() == "old"
    assert not recover_dir(tmp_path / "last")  # nothing left to recover
    folder_with(tmp_path / ".best.old", "old")
    replace_dir(folder_with(tmp_path / "new", "new"), tmp_path / "best")  # the next save recovers, then replaces
    assert (tmp_path / "best" / "model.safetensors").read_text() == "new"
    assert not (tmp_path / ".best.old").exists()
