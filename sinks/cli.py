"""`sqis sink ...`: long-running sinks that persist the inspections topic."""

from __future__ import annotations

import logging
import threading
from typing import Annotated

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings

log = logging.getLogger(__name__)

sink_app = typer.Typer(help="Sinks that persist inspections (PostgreSQL).", no_args_is_help=True)


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
    startup_wait_s: Annotated[float, typer.Option("--startup-wait-s", min=0.0, help="wait this long for an unreachable broker or database at start, then exit 1")] = 30.0,
) -> None:
    """Upsert the inspections topic into PostgreSQL (idempotent on frame_id) until SIGINT/SIGTERM."""
    import time

    from infra.metrics import serve
    from infra.settings import ConfigError
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
                   ready=lambda: sink._consumer is not None)
    try:
        stats = sink.run()
    finally:
        done.set()
        if server is not None:
            server.close()
    log.info("sink finished", extra=stats.as_dict())
