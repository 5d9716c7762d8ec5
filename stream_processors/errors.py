"""The stream processors' one exception root (the app maps it to an exit code in sqis/cli.py)."""

from __future__ import annotations


class StreamError(Exception):
    """Root of stream_processors/."""


class BaselineError(StreamError, ValueError):
    """No usable baseline for the period (no inspections, too few windows)."""
