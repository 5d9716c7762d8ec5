"""Shared pieces of the `sqis` CLI: building settings from flags, clear errors for user mistakes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from infra.logs import setup_logging
from infra.settings import Settings


class UserError(Exception):
    """A mistake in the user's input: printed as one clear line, exit code 2, no traceback."""


StateDir = Annotated[Path | None, typer.Option("--state-dir", help="local stack state directory [env SQIS_STATE_DIR]")]
Bootstrap = Annotated[str | None, typer.Option("--bootstrap", help="Kafka host:port [env SQIS_KAFKA_BOOTSTRAP]")]
TopicPrefix = Annotated[str | None, typer.Option("--topic-prefix", help="prefix of topic names [env SQIS_TOPIC_PREFIX]")]


def build_settings(**overrides: Any) -> Settings:
    """Settings from env/.env with the non-None CLI flags on top; bad values -> UserError."""
    mapping = {"bootstrap": "kafka_bootstrap"}
    kw = {mapping.get(k, k): v for k, v in overrides.items() if v is not None}
    try:
        s = Settings(**kw)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "settings"
            flag = {v: k for k, v in mapping.items()}.get(loc, loc).replace("_", "-")
            lines.append(f"{loc} (flag --{flag} or env SQIS_{loc.upper()}): {e['msg']}")
        raise UserError("invalid settings:\n  " + "\n  ".join(lines)) from None
    setup_logging(s.log_level, s.log_format)
    return s
