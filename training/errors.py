"""The training package's one exception root (the app maps it to exit code 2)."""

from __future__ import annotations


class TrainingError(Exception):
    """Training, evaluation, datasets or the registry refused the user's input (bad path, bad value)."""
