"""User-facing errors: the command line prints them without a traceback and exits non-zero."""

from __future__ import annotations

import sys


class UserError(Exception):
    """An error the user can fix: bad arguments, missing data, wrong environment.

    ``hint`` says how to fix it; the CLI prints ``error: <message>`` then ``hint: <hint>``.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    def report(self, stream=None) -> int:
        """Print ``error: ...`` and ``hint: ...`` (to stderr) for a command's user; returns the exit code."""
        stream = sys.stderr if stream is None else stream
        print(f"error: {self.message}", file=stream)
        if self.hint:
            print(f"hint: {self.hint}", file=stream)
        return self.exit_code


class DataError(UserError):
    """Missing, incomplete or corrupt dataset files (names the file or the expected layout)."""


class ConfigError(UserError):
    """Unknown protocol, method, override key or an invalid value."""


class EnvironmentProblem(UserError):
    """The environment cannot do what was asked (CUDA absent, torchvision unusable)."""
