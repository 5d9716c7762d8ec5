"""`sqis worker`, `sqis dlq show`."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from datetime import UTC, datetime
from typing import Annotated

import typer

from inference_workers.detector import Thresholds
from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings
from infra.settings import Settings

dlq_app = typer.Typer(help="The dead-letter topic: frames that could not be inspected, and why.", no_args_is_help=True)

def default_model_uri(settings: Settings) -> str:
    """settings.model_uri, else (local stack only) the committed demo model found next to the package;
    UserError otherwise: a production worker never serves the demo model by accident."""
    from inference_workers.model_loader import DEMO_MODEL, demo_model_path

    if settings.model_uri:
        return settings.model_uri
    if not settings.local:
        raise UserError("no model: pass --model PATH.onnx or --model models:/NAME@production, or set "
                        "SQIS_MODEL_URI (the demo model serves only under `sqis demo|bench` or `sqis --local`)")
    found = demo_model_path()
    if found is not None:
        return str(found)
    raise UserError(
        f"no model: pass --model PATH.onnx or --model models:/NAME@production, set SQIS_MODEL_URI, "
        f"or put the demo model at {DEMO_MODEL} (train one with `sqis train`)")


def _from_settings(field: str) -> str:
    """The --help default of an option that falls back to a setting: "settings, 8" (the field's default)."""
    return f"settings, {Settings.model_fields[field].default}"


def _parse_class_scores(values: list[str] | None) -> dict[str, float]:
    """Same syntax as `sqis eval --class-conf` (Thresholds.parse_per_class)."""

    try:
        return Thresholds.parse_per_class(values, "--class-score")
    except ValueError as exc:
        raise UserError(str(exc)) from None


# A stop request ends the process within this bound even when the broker hangs (SIGSTOPped, partitioned):
# the worker gives hung deliveries STOP_GRACE_S, then closes; a close that still blocks is cut here.
SHUTDOWN_BOUND_S = 15.0
# A broker that does not answer at start is a wrong address or a stack not started: said within seconds.
# Outages after a good start are retried by the worker (infra.consume_loop), not here.
STARTUP_WAIT_S = 3.0


def _install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set ``stop``; a watchdog thread ends the process SHUTDOWN_BOUND_S later if it is
    still running. The watchdog learns of the signal from the wakeup fd, which the C-level handler writes
    at once: the Python handler only runs when the main thread leaves a blocking client call, and a
    transaction call can block for as long as the broker hangs."""
    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watchdog() -> None:
        while not set(os.read(r, 64)) & {signal.SIGTERM, signal.SIGINT}:
            pass
        stop.set()
        time.sleep(SHUTDOWN_BOUND_S)
        logging.getLogger("inference_workers.cli").error(
            "worker did not stop within %.0f s of the stop request (broker unresponsive?); exiting now: "
            "its uncommitted frames are redone by the next owner", SHUTDOWN_BOUND_S)
        os._exit(1)

    threading.Thread(target=watchdog, name="stop-watchdog", daemon=True).start()


def worker(
    model: Annotated[str | None, typer.Option("--model", help="PATH.onnx or models:/NAME@alias [env SQIS_MODEL_URI]")] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", min=1, max=256, show_default=_from_settings("worker_max_batch"), help="frames per detector batch [env SQIS_WORKER_MAX_BATCH]")] = None,
    max_wait_ms: Annotated[float | None, typer.Option("--max-wait-ms", min=0, max=60_000, show_default=_from_settings("worker_max_wait_ms"), help="max wait from a batch's first frame [env SQIS_WORKER_MAX_WAIT_MS]")] = None,
    fetch_threads: Annotated[int | None, typer.Option("--fetch-threads", min=1, max=64, show_default=_from_settings("worker_fetch_threads"), help="parallel fetch+decode threads [env SQIS_WORKER_FETCH_THREADS]")] = None,
    group: Annotated[str, typer.Option("--group", help="consumer group")] = "inference-workers",
    worker_id: Annotated[str | None, typer.Option("--worker-id", help="id in logs and Inspections (default host-pid)")] = None,
    score: Annotated[float | None, typer.Option("--score", min=0.0, max=1.0, help=(
        "default score threshold; without --score/--class-score the model's calibrated operating point "
        "(sqis calibrate) is used, else 0.25"))] = None,
    iou: Annotated[float, typer.Option("--iou", min=0.0, max=1.0, help="NMS IoU threshold")] = 0.45,
    class_score: Annotated[list[str] | None, typer.Option("--class-score", "--class-conf", help="per-class threshold NAME=SCORE (repeatable, or NAME=S,NAME=S); same syntax as `sqis eval`")] = None,
    max_frame_mb: Annotated[float, typer.Option("--max-frame-mb", min=0.001, help="larger frames go to the DLQ")] = 32.0,
    model_poll_s: Annotated[float, typer.Option("--model-poll-s", min=0.1, help="how often to check the model alias")] = 30.0,
    pipeline_depth: Annotated[int | None, typer.Option("--pipeline-depth", min=1, max=16, show_default=_from_settings("worker_pipeline_depth"), help="batches in flight (fetch of the next overlaps inference of the current) [env SQIS_WORKER_PIPELINE_DEPTH]")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", min=0, max=65535, help="serve /metrics [env SQIS_METRICS_PORT]")] = None,
    tile: Annotated[int | None, typer.Option("--tile", min=32, help=(
        "run each frame as overlapping SIZE x SIZE tiles (small defects in large frames); one Inspection per frame"))] = None,
    overlap: Annotated[float, typer.Option("--overlap", min=0.0, max=0.89, help="tile overlap, a fraction of SIZE")] = 0.2,
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """Run an inference worker: frames -> micro-batches -> detector -> inspections (bad frames -> DLQ)."""
    from inference_workers.detector import DetectorError, Thresholds
    from inference_workers.tiling import TileSpec
    from inference_workers.worker import InferenceWorker

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix, metrics_port=metrics_port)
    uri = model or default_model_uri(s)
    # An option not given falls back to its SQIS_WORKER_* setting (env, .env), so a deployment configured
    # by environment is not overridden by a CLI default.
    max_batch = s.worker_max_batch if max_batch is None else max_batch
    max_wait_ms = s.worker_max_wait_ms if max_wait_ms is None else max_wait_ms
    fetch_threads = s.worker_fetch_threads if fetch_threads is None else fetch_threads
    pipeline_depth = s.worker_pipeline_depth if pipeline_depth is None else pipeline_depth
    try:
        per_class = _parse_class_scores(class_score)
        thresholds = None if score is None and not per_class and iou == 0.45 else Thresholds(
            default_score=0.25 if score is None else score, iou=iou, per_class=per_class, source="cli")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # Until the worker is built (model download + warmup can be long) Ctrl-C interrupts right away;
    # only then does a signal ask the loop to finish the batch, flush and commit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = threading.Event()
    try:
        w = InferenceWorker(s, uri, thresholds, max_batch=max_batch, max_wait_ms=max_wait_ms,
                            fetch_threads=fetch_threads, worker_id=worker_id, group_id=group,
                            max_frame_bytes=int(max_frame_mb * 1024 * 1024), model_poll_s=model_poll_s,
                            pipeline_depth=pipeline_depth, tile=None if tile is None else TileSpec(tile, overlap))
        _install_stop_handlers(stop)
    except DetectorError as exc:
        raise UserError(f"cannot load model {uri}: {exc}") from None
    except KeyboardInterrupt:
        typer.secho("interrupted while starting; nothing consumed", err=True)
        raise
    from infra.kafka import wait_for_broker
    from infra.metrics import lag_exporter
    from schemas.catalog import TopicCatalog

    wait_for_broker(s, STARTUP_WAIT_S, stop=stop)  # unreachable at start: one error line within seconds, exit 1
    lag = lag_exporter(s, group, [TopicCatalog(s.topic_prefix).frames], registry=w.metrics.registry)
    try:
        w.run(stop)  # WorkerError: one line, exit 1 (sqis/cli.py)
    finally:
        if lag is not None:
            lag.close()


@dlq_app.command("show")
def dlq_show(
    limit: Annotated[int, typer.Option("--limit", min=1, help="show at most this many records")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line instead of a table")] = False,
    idle_s: Annotated[float, typer.Option("--idle-s", min=0.1, help="give up (with a warning) when the broker delivers nothing for this long before the end offsets taken at the start")] = 3.0,
    state_dir: StateDir = None, bootstrap: Bootstrap = None, topic_prefix: TopicPrefix = None,
) -> None:
    """Print the newest dead letters first (throwaway group, nothing committed)."""
    from inference_workers.dlq import newest_dead_letters

    s = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)
    records = newest_dead_letters(s, limit=limit, idle_s=idle_s)
    if as_json:
        for r in records:
            out = {k: v for k, v in r.items() if k not in ("original_value", "original_key", "original_headers")}
            out["original_value_bytes"] = len(r.get("original_value") or b"")
            typer.echo(json.dumps(out, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    reason_w = min(24, max([len("reason"), *(len(r["error_type"]) for r in records)]))
    t = Table(title=f"{len(records)} newest dead letters", show_lines=False)
    t.add_column("failed at (UTC)", no_wrap=True)
    t.add_column("reason", no_wrap=True, min_width=reason_w, overflow="ellipsis")
    t.add_column("source", no_wrap=True, overflow="ellipsis", max_width=28)
    t.add_column("frame", no_wrap=True, max_width=8, overflow="ellipsis")
    t.add_column("message", overflow="fold", ratio=1, min_width=12)
    for r in records:
        ts = datetime.fromtimestamp(r["failed_at"] / 1e6, UTC).strftime("%m-%d %H:%M:%S") if r["failed_at"] else "?"
        t.add_row(ts, r["error_type"], f"{r['source_topic']}[{r['source_partition']}]@{r['source_offset']}",
                  (r.get("frame_id") or "-")[:8], r["error_message"])
    Console().print(t)
