"""The sinks package's one exception root (the app maps it to an exit code in sqis/cli.py)."""

from __future__ import annotations


class SinkError(RuntimeError):
    """Root of sinks/: a sink cannot start or go on (database unreachable at start, schema too old)."""


class RecordError(SinkError, ValueError):
    """One record cannot be turned into rows (carries the reason for the DLQ)."""


class NotifyError(SinkError):
    """A channel could not deliver a message (retryable)."""
