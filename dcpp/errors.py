"""Errors the user can fix, raised by dcpp's lower layers for the command line to report."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment (a missing vLLM, an engine that cannot
    start, a rejected fit): `dcpp.cli.main` prints the message as one line on stderr, no
    traceback, and exits with `exit_code` (2: a bad argument or input file; 1: the run
    failed)."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = int(exit_code)
