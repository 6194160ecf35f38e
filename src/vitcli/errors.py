"""Typed errors. The core raises these; the CLI turns them into one line and an exit code.

Every message says what was wrong and what to do about it.
"""

from __future__ import annotations

import re
from pathlib import Path


class VitcliError(Exception):
    """A job that could not be done (exit code 1)."""

    exit_code = 1


class UsageError(VitcliError):
    """The command was asked for something that cannot work as given (exit code 2)."""

    exit_code = 2


class UnknownModelError(UsageError):
    """A --model that is neither a timm name, a model folder nor an entry of the weights store."""


class ModelLoadError(VitcliError):
    """A model that exists but whose weights could not be had (hub unreachable, corrupt file)."""


class HubUnreachableError(ModelLoadError):
    """The Hugging Face Hub could not be reached and the weights are not cached."""


class WeightsMismatchError(ModelLoadError):
    """A weights file whose keys or shapes do not fit the architecture."""


class UnsafeCheckpointError(ModelLoadError):
    """A pickle that needs arbitrary Python objects: refused, never executed."""


class ImageLoadError(VitcliError):
    """One input image that could not be read or decoded."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class DatasetError(VitcliError):
    """A training or evaluation folder that cannot be used as given."""


class MissingExtraError(VitcliError):
    """An optional dependency that is not installed."""


class NotATransformerError(UsageError):
    """A model without patch tokens (a CNN) given to a command that explains tokens."""


class AttentionUnavailableError(UsageError):
    """A model whose attention is not one token-to-token map per head (Swin, XCiT, ...)."""


class TrainingInterrupted(VitcliError):
    """Ctrl-C (or SIGTERM) during fine-tuning: the state was saved and the run can be resumed."""

    exit_code = 130

    def __init__(self, message: str, run_dir: Path, exit_code: int = 130):
        super().__init__(message)
        self.run_dir = run_dir
        self.exit_code = exit_code


class NonFiniteLossError(VitcliError):
    """The training loss became NaN or infinite; the last good state is kept."""


class RankFailedError(VitcliError):
    """Another process of a torchrun job failed; this one stops with that process's error."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ExportError(VitcliError):
    """A model that could not be exported to the asked format."""


class VerificationError(VitcliError):
    """An exported file whose outputs differ from PyTorch's past the tolerance (exit code 1)."""


class VitcliNote(UserWarning):
    """Something worth knowing that is no error (the CLI prints it as one ``Note: ...`` line on stderr)."""


def note(message: str) -> None:
    """Tell the user something from the core, which never prints: a warning the CLI shows as ``Note:``."""
    import warnings

    warnings.warn(message, VitcliNote, stacklevel=2)


_SOURCE_LOCATION = re.compile(r"^(Exception from \S+:\d+:|Check '.*' failed at \S+:\d+:)$")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type's name): library errors can run to pages.

    OpenVINO's lines that only name a source location ("Exception from src/...cpp:217:") are skipped.
    """
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    said = [line for line in text if not _SOURCE_LOCATION.match(line.strip())]
    return (said or text or [type(e).__name__])[0]
