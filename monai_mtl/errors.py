"""The project's errors, and how a run that fails on one of them ends: one clear line, not a traceback.

Every error here is about the user's input, files or settings (a bad cohort, a checkpoint that does
not fit, a contradicting or misspelt setting, a folder in use or not writable). Their messages
name the file, row, key or value and say what was expected, so the traceback adds nothing for the
user. MONAI's bundle runner wraps them in ``RuntimeError: Failed to evaluate ConfigExpression``
60-90 lines below the message; :func:`install_error_hook` makes such a run end with
``monai-mtl: error: <message>`` as its last line (exit status 1). ``MONAI_MTL_DEBUG=1`` keeps the
full traceback.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType


class MonaiMtlError(Exception):
    """A problem with the user's input, files or settings, stated in one line."""


class CohortError(MonaiMtlError, ValueError):
    """A cohort that cannot be used as given; the message names the file, row and column."""


class LeakageError(MonaiMtlError, ValueError):
    """Subjects being tested were used to train or select the checkpoint."""


class CheckpointError(MonaiMtlError, ValueError):
    """A checkpoint that cannot be used as given: missing, unreadable, of another kind, or contradicted by a setting."""


class ConfigError(MonaiMtlError, ValueError):
    """A setting that is unknown, invalid, or contradicts the run folder it is used with."""


class RunLockError(MonaiMtlError, RuntimeError):
    """The output folder is in use by another run."""


class RunError(MonaiMtlError, RuntimeError):
    """A child run (a fold, a trial, a baseline) failed; the message ends with the child's own last error line."""


class OutputError(MonaiMtlError, OSError):
    """An output that cannot be written (the folder is not writable, the disk is full, a file-size limit...)."""


DEBUG_VARIABLE = "MONAI_MTL_DEBUG"


def project_error(error: BaseException | None) -> MonaiMtlError | None:
    """The first :class:`MonaiMtlError` in ``error``'s chain of causes and contexts, or ``None``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, MonaiMtlError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _hook(previous):
    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        found = project_error(error)
        if found is None or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            previous(kind, error, traceback)
            return
        sys.stdout.flush()
        sys.stderr.write(f"monai-mtl: error: {found}\n")
        sys.stderr.flush()

    hook.monai_mtl = True  # type: ignore[attr-defined]
    return hook


def install_error_hook() -> None:
    """End a process that fails on a :class:`MonaiMtlError` with its message as the last line (exit status 1).

    Called first in every bundle config's ``initialize`` (``python -m monai.bundle run ...``); any
    other uncaught exception keeps Python's full traceback, and so does every error with
    ``MONAI_MTL_DEBUG=1``. Installing it twice has no further effect.
    """
    if not getattr(sys.excepthook, "monai_mtl", False):
        sys.excepthook = _hook(sys.excepthook)


__all__ = [
    "MonaiMtlError", "CohortError", "LeakageError", "CheckpointError", "ConfigError", "RunLockError", "RunError", "OutputError",
    "DEBUG_VARIABLE", "project_error", "install_error_hook",
]
