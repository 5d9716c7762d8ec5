"""The training package's one exception root (the app maps it to exit codes in sqis/cli.py)."""

from __future__ import annotations


class TrainingError(Exception):
    """Training, evaluation, datasets or the registry refused the user's input (bad path, bad value)."""


class ParityBlocked(TrainingError):
    """The ONNX/PyTorch parity check failed (or was unverified): the model was not registered."""


class TrainingStopped(KeyboardInterrupt):
    """Training was stopped by SIGTERM (Ctrl-C raises KeyboardInterrupt itself): the run ends KILLED.
    A KeyboardInterrupt, not a TrainingError, so that it cuts through every handler on its way out."""


class RunKilled(TrainingError):
    """What the CLI makes of TrainingStopped: the run is marked KILLED and can be resumed (exit 143)."""
