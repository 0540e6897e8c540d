"""The two error types of edge-mote.

``EdgeMoteError`` is any failure of the library; ``UserError`` is a failure caused by the user's input (a bad
path, a malformed steering string, a layer out of range, ...). The CLI turns a ``UserError`` into one line,
``error: <message>`` plus an optional ``hint: ...`` line, and exits with status 2; other errors exit 1.
Tracebacks are shown only with ``EDGE_MOTE_DEBUG=1``.
"""

from __future__ import annotations


class EdgeMoteError(Exception):
    """A failure inside edge-mote or the native library."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UserError(EdgeMoteError):
    """Bad input from the user: the message names the problem, the hint says what to do."""
