"""`sqis bridge mqtt`: MQTT frames from edge devices -> FrameRefs, and part verdicts -> MQTT for PLCs."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from infra.cli_common import Bootstrap, StateDir, TopicPrefix, UserError, build_settings

bridge_app = typer.Typer(help="Bridges between the line's protocols and Kafka.", no_args_is_help=True)


def parse_stations(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        cam, sep, station = item.partition("=")
        if not sep or not cam.strip() or not station.strip() or "/" in station or "+" in station or "#" in station:
            raise UserError(f"--stations is CAMERA=STATION[,CAMERA=STATION...] (no / + #), got {item!r}")
        out[cam.strip()] = station.strip()
    return out


@bridge_app.command("mqtt")
def bridge_mqtt(
    client_id: Annotated[str, typer.Option("--client-id", help="MQTT client id of the persistent session")] = "sqis-bridge",
    mqtt_url: Annotated[str | None, typer.Option("--mqtt-url", help="mqtt://user:pass@host:port [env SQIS_MQTT_URL; default: the local stack]")] = None,
    stations: Annotated[str | None, typer.Option("--stations", help="CAMERA=STATION,... (verdict topics; default: one station per camera)")] = None,
    verdicts: Annotated[bool, typer.Option("--verdicts/--no-verdicts", help="publish part verdicts to sqis/v1/{line}/{station}/verdict")] = True,
    frames: Annotated[bool, typer.Option("--frames/--no-frames", help="bridge sqis/v1/+/+/frames to the frames topic")] = True,
    state_dir: StateDir = None,
    bootstrap: Bootstrap = None,
    topic_prefix: TopicPrefix = None,
) -> None:
    """Run the MQTT bridge until SIGINT/SIGTERM (what is not acknowledged yet stays in mosquitto)."""
    from infra.mqtt import mqtt_url as resolve

    settings = build_settings(state_dir=state_dir, bootstrap=bootstrap, topic_prefix=topic_prefix)
    url = mqtt_url or resolve(settings)
    st = parse_stations(stations)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threads = []
    health = None
    bridge = None
    if settings.metrics_port is not None:  # /healthz, /readyz (MQTT connected), /metrics
        from infra.metrics import HealthServer

        health = HealthServer(settings.metrics_port, ready=lambda: bridge is None or bridge.connected.is_set())
    if verdicts:
        from sinks.mqtt_verdicts import VerdictPublisher

        vp = VerdictPublisher(settings, url=url, client_id=f"{client_id}-verdicts", stations=st, stop_event=stop)
        threads.append(threading.Thread(target=vp.run, name="mqtt-verdicts", daemon=True))
    for t in threads:
        t.start()
    if frames:
        from producers.mqtt_bridge import MqttBridge

        bridge = MqttBridge(settings, client_id=client_id, url=url)
        stats = bridge.run(stop)
        typer.echo(" ".join(f"{k}={v}" for k, v in stats.snapshot().items()))
    else:
        stop.wait()
    for t in threads:
        t.join(30)
    if health is not None:
        health.close()
