"""Errors shared by every stage's command line."""


class CLIError(Exception):
    """A user-facing error: printed as one line naming the flag or file at fault, exit status 2."""
