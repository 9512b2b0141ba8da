"""Which exceptions are the user's doing: the boundary in ``qmambair.cli`` prints these as one line.

Besides :class:`qmambair.errors.UserError` (and the exceptions below, defined by the parts that raise them),
every ``OSError`` (a missing, unreadable or unwritable file) and every ``ValueError`` raised by qmambair's own
code (its checks of arguments and files) is taken as the user's; anything else is a bug.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

__all__ = ["describe_user_error", "user_error_types"]

_PACKAGE = str(Path(__file__).resolve().parents[1]) + os.sep  # .../qmambair/


def user_error_types() -> tuple[type[BaseException], ...]:
    """The project's exceptions that report a problem with the user's input, files or data."""
    from ..data.io import ImageReadError, ProtectedPathError
    from ..data.photos import PhotosNotFetchedError
    from ..errors import UserError
    from ..models.checkpoint import CheckpointError
    from ..quant.pack import PackedFileError
    from ..train.trainer import TrainingDiverged

    return (UserError, CheckpointError, PackedFileError, ImageReadError, ProtectedPathError,
            PhotosNotFetchedError, TrainingDiverged)


def _raised_by_qmambair(exc: BaseException) -> bool:
    """True when the innermost frame of the traceback is in qmambair's code (a deliberate ``raise``)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE)


def _os_message(exc: OSError) -> str:
    if exc.filename is None or not exc.strerror:
        return str(exc)
    what = exc.strerror[:1].lower() + exc.strerror[1:]
    if exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {what}"
    return f"{exc.filename}: {what}"


def describe_user_error(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) when ``exc`` is the user's doing; None for a bug."""
    import yaml

    from ..errors import UserError

    if isinstance(exc, UserError):
        message, code = str(exc), exc.exit_code
    elif isinstance(exc, OSError):
        message, code = _os_message(exc), 1
    elif isinstance(exc, user_error_types() + (yaml.YAMLError,)):
        message, code = str(exc), 1
    elif isinstance(exc, ValueError) and _raised_by_qmambair(exc):
        message, code = str(exc), 1
    else:
        return None
    return " ".join(message.split()) or type(exc).__name__, code
