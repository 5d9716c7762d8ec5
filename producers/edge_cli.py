"""`sqis edge`: the gateway at the cell (capture -> preprocess -> gate -> on-disk queue -> MQTT or HTTP)."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path
from typing import Annotated

import typer

from infra.cli_common import StateDir, UserError, build_settings


def edge(
    uplink: Annotated[str, typer.Option("--uplink", help="mqtt | http")] = "mqtt",
    mqtt_url: Annotated[str | None, typer.Option("--mqtt-url", help="mqtt://user:pass@host:port [env SQIS_MQTT_URL; default: the local stack]")] = None,
    http_url: Annotated[str | None, typer.Option("--http-url", help="base URL of `sqis api` (POST /v1/frames)")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SQIS_API_KEY", help="bearer key for --uplink http [env SQIS_API_KEY]")] = None,
    device_id: Annotated[str | None, typer.Option("--device-id", help="this gateway's id (frame ids derive from it; default: hostname)")] = None,
    queue_dir: Annotated[Path | None, typer.Option("--queue-dir", help="on-disk queue (default <state>/edge/<device>)")] = None,
    queue_max_mb: Annotated[float, typer.Option("--queue-max-mb", min=0.01, help="queue bound; the oldest frames are evicted (counted) beyond it")] = 256.0,
    source: Annotated[str, typer.Option("--source", help="synthetic | folder | video | usb")] = "synthetic",
    frames: Annotated[int, typer.Option("--frames", min=0, help="frames per camera; 0 = until Ctrl-C")] = 100,
    fps: Annotated[float, typer.Option("--fps", min=0.0, help="frames per second per camera; 0 = as fast as possible")] = 0.0,
    cameras: Annotated[int, typer.Option("--cameras", min=1, help="synthetic cameras")] = 1,
    camera_id: Annotated[str | None, typer.Option("--camera-id", help="camera id (one camera)")] = None,
    line_id: Annotated[str | None, typer.Option("--line-id", help="line id (one camera)")] = None,
    path: Annotated[str | None, typer.Option("--path", help="folder, video file or rtsp:// URL")] = None,
    size: Annotated[str | None, typer.Option("--size", help="WxH (synthetic render size; others: resize)")] = None,
    max_side: Annotated[int | None, typer.Option("--max-side", min=1, help="shrink so the longer side is at most N px")] = None,
    denoise: Annotated[str, typer.Option("--denoise", help="none | gaussian | bilateral | nlmeans")] = "none",
    defect_rate: Annotated[float, typer.Option("--defect-rate", min=0.0, max=1.0, help="synthetic defect rate")] = 0.3,
    seed: Annotated[int, typer.Option("--seed", help="synthetic seed")] = 0,
    gate: Annotated[str, typer.Option("--gate", help="none | stats (image statistics: forward what it cannot call good)")] = "none",
    gate_threshold: Annotated[float, typer.Option("--gate-threshold", min=0.0, help="stats gate: suspect above this score")] = 0.0004,
    gate_sample: Annotated[float, typer.Option("--gate-sample", min=0.0, max=1.0, help="share of good frames forwarded anyway")] = 0.1,
    drain_s: Annotated[float, typer.Option("--drain-s", min=0.0, help="at the end: seconds to keep sending the queue")] = 10.0,
    json_out: Annotated[bool, typer.Option("--json", help="print the final counts as JSON")] = False,
    state_dir: StateDir = None,
) -> None:
    """Run the edge gateway: frames are queued on disk first and leave it only when the uplink acknowledged them."""
    from producers.base import InvalidSourceError
    from producers.edge import EdgeConfig, EdgeGateway, HttpUplink, MqttUplink, Uplink
    from producers.edge_gate import StatsGate
    from producers.preprocess import Preprocessor, parse_size
    from producers.run import build_sources

    if uplink not in ("mqtt", "http"):
        raise UserError(f"--uplink must be mqtt or http, got {uplink!r}")
    if gate not in ("none", "stats"):
        raise UserError(f"--gate must be none or stats, got {gate!r}")
    if uplink == "http" and not http_url:
        raise UserError("--uplink http needs --http-url")
    settings = build_settings(state_dir=state_dir)
    device = device_id or socket.gethostname()
    try:
        wh = parse_size(size) if size else None
        sources = build_sources(source, cameras=cameras, frames=frames, defect_rate=defect_rate, seed=seed,
                                size=wh, path=path, camera_id=camera_id, line_id=line_id)
    except InvalidSourceError as exc:
        raise UserError(str(exc)) from None
    pre = Preprocessor(size=None if source == "synthetic" else wh, max_side=max_side, denoise=denoise)  # type: ignore[arg-type]
    link: Uplink
    if uplink == "mqtt":
        from infra.mqtt import mqtt_url as resolve

        link = MqttUplink(mqtt_url or resolve(settings), f"sqis-edge-{device}")
    else:
        link = HttpUplink(str(http_url), api_key)
    cfg = EdgeConfig(device_id=device, queue_dir=queue_dir or settings.state_dir / "edge" / device,
                     queue_max_bytes=int(queue_max_mb * (1 << 20)), fps=fps, drain_s=drain_s,
                     gate=StatsGate(gate_threshold, gate_sample) if gate == "stats" else None)
    gw = EdgeGateway(sources, pre, link, cfg)
    health = None
    if settings.metrics_port is not None:  # /healthz, /readyz (uplink ready), /metrics
        from infra.metrics import HealthServer

        health = HealthServer(settings.metrics_port, ready=link.ready)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stats = gw.run(stop).snapshot()
    finally:
        if health is not None:
            health.close()
    typer.echo(json.dumps(stats) if json_out else " ".join(f"{k}={v}" for k, v in stats.items()))
    if stats["pending"]:
        typer.secho(f"{stats['pending']} frames stay queued in {cfg.queue_dir}; the next `sqis edge` sends them",
                    err=True, fg="yellow")
