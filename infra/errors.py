"""The root of every exception infra/ raises, and its one refusal of input. Exit codes are given to
them in sqis/cli.py only; nothing here knows about the CLI."""

from __future__ import annotations


class InfraError(RuntimeError):
    """Root of infra/: the environment (broker, database, object store, local stack) failed."""


class ConfigError(InfraError):
    """The settings or the command line do not describe a usable deployment (a missing URL, a bad value)."""


class UserError(ConfigError):
    """A mistake in the user's input, found by a command: printed as one line, no traceback."""
