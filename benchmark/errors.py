"""User-facing errors: the command line prints them without a traceback and exits non-zero."""

from __future__ import annotations


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


class DataError(UserError):
    """Missing, incomplete or corrupt dataset files (names the file or the expected layout)."""


class ConfigError(UserError):
    """Unknown protocol, method, override key or an invalid value."""


class EnvironmentProblem(UserError):
    """The environment cannot do what was asked (CUDA absent, torchvision unusable)."""
