"""Shared pieces of the `sqis` CLI: building settings from flags, clear errors for user mistakes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from infra.errors import UserError
from infra.logs import setup_logging
from infra.settings import Settings

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
    from schemas.serde import configure

    configure(s.registry_url())  # the wire format this process writes (#19): the registry's, or legacy
    return s


def check_endpoints(settings: Settings, *, kafka: bool = True, postgres: bool = False, timeout_s: float = 3.0) -> None:
    """Start-up check of a long-running command: a broker or database that does not answer now is a wrong
    address or a stack not started, said in one line within ``timeout_s`` (BrokerUnavailable,
    DatabaseUnavailable; a missing setting is a ConfigError). Outages after a good start are the
    consume loop's to ride out."""
    if kafka:
        from infra.kafka import check_broker

        check_broker(settings, timeout_s=timeout_s)
    if postgres:
        from infra.db import check_database

        check_database(settings.dsn(), timeout_s=timeout_s)


def parse_time_us(value: str, option: str) -> int:
    """An ISO time (``2026-12-01T10:00``, UTC unless it says otherwise), a date, or an age (``30m``,
    ``2h``, ``1d``) -> microseconds since the epoch; UserError naming ``option`` otherwise."""
    import re
    import time
    from datetime import UTC, datetime

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value)
    if m:
        secs = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return int((time.time() - secs) * 1e6)
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UserError(f"{option} {value!r}: expected an ISO time (2026-12-01T10:00), a date, "
                        "or an age such as 30m, 2h, 1d") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1e6)
