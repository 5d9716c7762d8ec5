"""`sqis sink ...`: long-running sinks that persist the inspections topic."""

from __future__ import annotations

import logging
import threading
from typing import Annotated, Any

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings, check_endpoints

log = logging.getLogger(__name__)

sink_app = typer.Typer(help="Sinks: inspections and stream tables (PostgreSQL), notifiers, object store.", no_args_is_help=True)


@sink_app.command("postgres")
def postgres(
    state_dir: StateDir = None,
    bootstrap: Bootstrap = None,
    topic_prefix: TopicPrefix = None,
    group: Annotated[str, typer.Option("--group", help="consumer group id")] = "sink-postgres",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="max inspections per transaction")] = 500,
    max_wait_ms: Annotated[int, typer.Option("--max-wait-ms", min=0, help="max time a batch waits to fill")] = 500,
    log_every_s: Annotated[float, typer.Option("--log-every-s", min=0.1, help="period of the counts log line")] = 10.0,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", min=0, max=65535, help="serve /metrics /healthz /readyz [env SQIS_METRICS_PORT]")] = None,
    startup_wait_s: Annotated[float, typer.Option("--startup-wait-s", min=0.0, help="wait this long for an unreachable broker or database at start, then exit 1 (outages after a good start are retried without limit)")] = 3.0,
) -> None:
    """Upsert the inspections topic into PostgreSQL (idempotent on frame_id) until SIGINT/SIGTERM."""
    import time

    from infra.metrics import lag_exporter, serve
    from infra.settings import ConfigError
    from schemas.catalog import TopicCatalog
    from sinks.postgres import PostgresSink

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix, metrics_port=metrics_port)
    try:
        s.bootstrap()
        s.dsn()
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    sink = PostgresSink(s, group_id=group, batch_size=batch_size, max_wait_ms=max_wait_ms,
                        startup_wait_s=startup_wait_s)
    sink.install_signal_handlers()

    done = threading.Event()

    def report() -> None:
        last: dict[str, float] = {}
        while not done.wait(log_every_s):
            now = sink.stats.as_dict()
            if now != last:  # quiet while nothing happens (e.g. waiting for the broker)
                log.info("sink progress", extra=now)
                last = now

    reporter = threading.Thread(target=report, name="sink-report", daemon=True)
    reporter.start()
    server = serve(s.metrics_port, live=lambda: time.monotonic() - sink.last_poll < 60,
                   ready=lambda: sink.ready)
    lag = lag_exporter(s, group, [TopicCatalog(s.topic_prefix).inspections])
    try:
        stats = sink.run()
    finally:
        done.set()
        if server is not None:
            server.close()
        if lag is not None:
            lag.close()
    log.info("sink finished", extra=stats.as_dict())


# ---- stream-processor outputs (#9) --------------------------------------------------------------------

MetricsPort = Annotated[int | None, typer.Option("--metrics-port", min=0, max=65535,
                                                help="serve /metrics /healthz /readyz [env SQIS_METRICS_PORT]")]


def _run_served(s: Any, owner: Any, lag_groups: dict[str, list[str]]) -> Any:
    """Run ``owner.run()`` with /metrics, /healthz (the consume loop turned within a minute) and /readyz
    (its consumer is up) on ``s.metrics_port`` when one is set, and the lag of ``lag_groups`` (group ->
    topics) on /metrics."""
    import time

    from infra.metrics import lag_exporter, serve

    def loop() -> Any:
        return getattr(owner, "loop", None)

    server = serve(s.metrics_port,
                   live=lambda: loop() is None or time.monotonic() - loop().last_poll < 60,
                   ready=lambda: loop() is not None and getattr(loop(), "consumer", None) is not None)
    lag = lag_exporter(s, lag_groups)
    try:
        return owner.run()
    finally:
        if server is not None:
            server.close()
        if lag is not None:
            lag.close()


def _stop_on_signals(stop: Any) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


@sink_app.command("stream-tables")
def stream_tables(
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
    group: Annotated[str, typer.Option("--group", help="consumer group id")] = "sink-stream-tables",
    metrics_port: MetricsPort = None,
) -> None:
    """Upsert defect-rates, alerts and part-verdicts into PostgreSQL until SIGINT/SIGTERM."""
    from infra.settings import ConfigError
    from sinks.stream_tables import StreamTablesSink

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix, metrics_port=metrics_port)
    try:
        s.bootstrap()
        s.dsn()
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    check_endpoints(s, postgres=True)
    sink = StreamTablesSink(s, group_id=group)
    _stop_on_signals(sink.stop)
    log.info("stream tables sink finished", extra=_run_served(s, sink, {group: list(sink.topics)}).__dict__)


@sink_app.command("notify")
def notify(
    channel: Annotated[str, typer.Option("--channel", help="webhook | smtp")],
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
    group: Annotated[str | None, typer.Option("--group", help="consumer group id (default notify-CHANNEL)")] = None,
    attempts: Annotated[int, typer.Option("--attempts", min=1, max=20, help="tries per notification")] = 5,
    rate_per_min: Annotated[float | None, typer.Option("--rate-per-min", min=0.01, help="[env SQIS_NOTIFY_RATE_PER_MIN]")] = None,
    metrics_port: MetricsPort = None,
) -> None:
    """Send alert notifications (opened, resolved) to a webhook or by e-mail until SIGINT/SIGTERM."""
    from infra.settings import ConfigError
    from sinks.notify import Notifier, channel_from_settings

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix, metrics_port=metrics_port)
    try:
        s.bootstrap()
        ch = channel_from_settings(s, channel)
    except (ConfigError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    check_endpoints(s)
    n = Notifier(s, ch, group_id=group, attempts=attempts, rate_per_min=rate_per_min)
    _stop_on_signals(n.stop)
    from schemas.catalog import TopicCatalog

    _run_served(s, n, {group or f"notify-{ch.name}": [TopicCatalog(s.topic_prefix).alerts]})


@sink_app.command("objects")
def objects(
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
    group: Annotated[str, typer.Option("--group", help="consumer group id")] = "sink-objects",
    flush_s: Annotated[float, typer.Option("--flush-s", min=0, help="how often the hourly archive is rewritten")] = 60.0,
    metrics_port: MetricsPort = None,
) -> None:
    """Overlays and crops of every FAIL, and the hourly Parquet archive, into the object store."""
    from infra.settings import ConfigError
    from sinks.objects import ObjectSink

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix, metrics_port=metrics_port)
    try:
        s.bootstrap()
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    check_endpoints(s)
    sink = ObjectSink(s, group_id=group, flush_s=flush_s)
    _stop_on_signals(sink.stop)
    from schemas.catalog import TopicCatalog

    _run_served(s, sink, {group: [TopicCatalog(s.topic_prefix).inspections]})
