"""Errors a user can cause (a bad option, a missing or damaged file), as opposed to bugs.

Every part of the package may raise :class:`UserError`; the command line (``qmambair.cli``) turns it into one
line ``qmambair: error: ...`` and exit code 1 (:class:`UsageError`: 2, as argparse uses for a bad option),
while any other exception is shown with its traceback as a bug to report.
"""

from __future__ import annotations

__all__ = ["UserError", "UsageError"]


class UserError(Exception):
    """Something the user can fix: the message names the file or option and says what is wrong."""

    exit_code = 1


class UsageError(UserError):
    """A bad command-line option or combination of options (exit code 2, like argparse's own errors)."""

    exit_code = 2
