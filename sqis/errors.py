"""The app's own exception root; sqis/cli.py maps it (and every package's root) to exit codes."""

from __future__ import annotations


class AppError(RuntimeError):
    """Root of sqis/: the demo or a benchmark could not run."""


class CheckFailed(AppError):
    """A check ran and found what it looks for (topic drift, inspection gaps, a schema behind): exit 3."""


class DemoError(AppError):
    """The demo could not run (a part did not start, a child died during start-up)."""


class HarnessError(AppError):
    """The harness could not run (no model, workers did not start, frames never came back)."""


class RolledBack(AppError):
    """A canary ran and its challenger was rolled back (the evidence is in the alert and the tags): exit 4."""
