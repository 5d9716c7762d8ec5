"""`sqis db ...` (migrations on any PostgreSQL), `sqis lag` and `sqis metrics ...` (consumer lag, the lag exporter)."""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Annotated, Any

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings
from sqis.errors import AppError, CheckFailed

log = logging.getLogger(__name__)

db_app = typer.Typer(help="PostgreSQL schema: migrate, status.", no_args_is_help=True)
metrics_app = typer.Typer(help="Operational metrics: consumer lag, the lag exporter.", no_args_is_help=True)

Dsn = Annotated[str | None, typer.Option("--dsn", help="postgresql://... [env SQIS_POSTGRES_DSN]")]
Json = Annotated[bool, typer.Option("--json", help="print JSON")]


def _dsn(state_dir: object, dsn: str | None) -> str:
    from infra.settings import ConfigError

    s = build_settings(state_dir=state_dir, postgres_dsn=dsn)
    try:
        return s.dsn()
    except ConfigError as exc:
        raise UserError(str(exc)) from exc


def _db_error(exc: Exception) -> Exception:
    from infra.db import DatabaseUnavailable

    return DatabaseUnavailable(" ".join(str(exc).split()))


@db_app.command("migrate")
def db_migrate(state_dir: StateDir = None, dsn: Dsn = None, json_out: Json = False) -> None:
    """Apply the migrations not applied yet (idempotent; concurrent runs serialise on a lock)."""
    import psycopg

    from infra.db import MigrationError, migrate, required_version

    target = _dsn(state_dir, dsn)
    try:
        applied = migrate(target)
    except (MigrationError, psycopg.Error) as exc:
        raise _db_error(exc) from exc
    if json_out:
        typer.echo(json.dumps({"applied": applied, "version": required_version()}))
    else:
        typer.echo(f"applied {len(applied)}: {', '.join(applied) or '-'}; schema at version {required_version()}")


@db_app.command("status")
def db_status(state_dir: StateDir = None, dsn: Dsn = None, json_out: Json = False) -> None:
    """The applied schema version and the pending migrations; exit 3 when the database is behind."""
    import psycopg

    from infra.db import required_version, schema_status

    try:
        current, pending = schema_status(_dsn(state_dir, dsn))
    except psycopg.Error as exc:
        raise _db_error(exc) from exc
    doc = {"version": current, "required": required_version(), "pending": pending}
    typer.echo(json.dumps(doc) if json_out else
               f"schema version {current}, this build needs {doc['required']}; pending: {', '.join(pending) or '-'}")
    if pending:
        raise CheckFailed(f"the database schema is behind: {len(pending)} migration(s) pending; `sqis db migrate`")


def parse_groups(spec: str, prefix: str = "") -> dict[str, list[str]]:
    """'inference-workers:frames,sink-postgres:inspections' -> {group: [prefixed topic names]}."""
    from schemas.catalog import TOPICS

    by_name = {t.name: t for t in TOPICS.values()} | {t.key: t for t in TOPICS.values()}
    out: dict[str, list[str]] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        group, sep, topics = item.partition(":")
        if not sep or not group or not topics:
            raise UserError(f"consumer group spec {item!r}: expected group:topic[+topic]")
        names = []
        for t in topics.split("+"):
            if t not in by_name:
                raise UserError(f"consumer group spec {item!r}: unknown topic {t!r} (catalog: {', '.join(sorted(by_name))})")
            names.append(by_name[t].full_name(prefix))
        out[group] = names
    if not out:
        raise UserError("no consumer groups given")
    return out


Groups = Annotated[str | None, typer.Option("--groups", help="group:topic[+topic],... [env SQIS_CONSUMER_GROUPS]")]


GroupFilter = Annotated[list[str] | None, typer.Option("--group", help="only this consumer group (repeatable)")]


def lag_table(lags: list[Any]) -> list[str]:
    """The lines `sqis lag` prints: one per group/topic/partition, then a total per group."""
    if not lags:
        return ["no consumer group has committed offsets on this deployment's topics"]
    gw = max(5, *(len(p.group) for p in lags))
    tw = max(5, *(len(p.topic) for p in lags))
    lines = [f"{'GROUP':<{gw}}  {'TOPIC':<{tw}}  {'PART':>4}  {'COMMITTED':>10}  {'END':>10}  {'LAG':>8}"]
    totals: dict[str, int] = {}
    for p in lags:
        c = "-" if p.committed is None else str(p.committed)
        lines.append(f"{p.group:<{gw}}  {p.topic:<{tw}}  {p.partition:>4}  {c:>10}  {p.high:>10}  {p.lag:>8}")
        totals[p.group] = totals.get(p.group, 0) + p.lag
    lines += [f"{g:<{gw}}  {'(all)':<{tw}}  {'':>4}  {'':>10}  {'':>10}  {n:>8}" for g, n in totals.items()]
    return lines


def lag(state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
        groups: Annotated[str | None, typer.Option("--groups", help=(
            "group:topic[+topic],... (default: every group that committed on this deployment's topics)"))] = None,
        group: GroupFilter = None, json_out: Json = False) -> None:
    """Consumer lag per group, topic and partition: end (last stable offset) - committed offset."""
    from infra.kafka import admin_client, check_broker
    from infra.metrics import discover_groups, read_lag
    from schemas.catalog import TopicCatalog

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)
    check_broker(s)  # unreachable: one line, exit 1
    admin = admin_client(s)
    if groups:
        wanted = parse_groups(groups, s.topic_prefix)
    else:
        wanted = discover_groups(s, [n for n, _ in TopicCatalog(s.topic_prefix).all()], only=group or (),
                                 admin=admin)
    if group:
        for g in sorted(set(group) - set(wanted)):
            typer.echo(f"note: group {g!r} has no committed offset on these topics (name it in --groups "
                       "group:topic to count everything retained as its lag)", err=True)
        wanted = {g: t for g, t in wanted.items() if g in group}
    lags = read_lag(s, wanted, admin=admin)
    if json_out:
        typer.echo(json.dumps([p.__dict__ for p in lags]))
        return
    for line in lag_table(lags):
        typer.echo(line)


metrics_app.command("lag")(lag)


@metrics_app.command("exporter")
def exporter(state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
             groups: Groups = None,
             metrics_port: Annotated[int | None, typer.Option("--metrics-port", min=0, max=65535, help="[env SQIS_METRICS_PORT]")] = None,
             interval_s: Annotated[float, typer.Option("--interval-s", min=1.0, help="how often the broker is asked")] = 5.0,
             ) -> None:
    """Serve sqis_consumer_lag{group,topic,partition} on /metrics (plus /healthz, /readyz) until SIGTERM."""
    from infra.metrics import LagExporter, serve

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix,
                       consumer_groups=groups, metrics_port=metrics_port)
    if s.metrics_port is None:
        raise UserError("set --metrics-port or SQIS_METRICS_PORT")
    lags = LagExporter(s, parse_groups(s.consumer_groups, s.topic_prefix), interval_s=interval_s)
    server = serve(s.metrics_port, ready=lambda: lags.samples > 0 and lags.last_error is None)
    if server is None:
        lags.close()
        raise AppError(f"cannot serve /metrics on port {s.metrics_port} (in use?)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("lag exporter running", extra={"port": server.port, "groups": list(lags.groups)})
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.close()
        lags.close()


@metrics_app.command("sizing")
def sizing(
    cameras: Annotated[int, typer.Option("--cameras", min=1, help="cameras in the plant")] = 24,
    fps: Annotated[float, typer.Option("--fps", min=0.01, help="frames per second per camera")] = 5.0,
    size: Annotated[str, typer.Option("--size", help="camera frame WxH")] = "1280x1024",
    jpeg_quality: Annotated[int, typer.Option("--jpeg-quality", min=1, max=100)] = 90,
    defect_share: Annotated[float, typer.Option("--defect-share", min=0.0, max=1.0, help="share of FAIL frames")] = 0.1,
    dsn: Dsn = None,
    state_dir: StateDir = None,
) -> None:
    """Measured bytes per frame / FrameRef / Inspection / PostgreSQL row, scaled to GB per day (JSON)."""
    from infra.settings import ConfigError
    from producers.base import InvalidSourceError
    from producers.preprocess import parse_size
    from sqis.bench.sizing import measure

    try:
        w, h = parse_size(size)
    except InvalidSourceError as exc:
        raise UserError(str(exc)) from None
    s = build_settings(state_dir=state_dir, postgres_dsn=dsn)
    try:
        target: str | None = s.dsn()
    except ConfigError:
        target = None  # no database: the PostgreSQL figures are left out
    typer.echo(measure(cameras, fps, w, h, jpeg_quality=jpeg_quality, defect_share=defect_share, dsn=target).as_json())
