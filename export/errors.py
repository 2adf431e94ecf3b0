"""Export errors. Every failure a user can cause is an ``ExportError`` whose message names the file, flag or
graph at fault; the CLI prints it as one line."""

from __future__ import annotations


class ExportError(ValueError):
    """The checkpoint, the target repository or the request cannot be exported as asked."""


class ParityError(ExportError):
    """An exported graph does not reproduce the eager model within tolerance."""
