"""The one module that touches the MQTT client (paho-mqtt 2.x): endpoint resolution and client factory.

Every client is MQTT 3.1.1 with a fixed client id; subscribers take a persistent session
(``clean_session=False``) so QoS 1 messages published while they are away are queued by the broker.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote, urlsplit

from infra.settings import ConfigError, Settings

log = logging.getLogger(__name__)

try:
    import paho.mqtt.client as _paho
    from paho.mqtt.enums import CallbackAPIVersion
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("MQTT needs paho-mqtt: pip install 'sqis[edge]'") from exc

MQTTMessage = _paho.MQTTMessage
Client = _paho.Client
TOPIC_ROOT = "sqis/v1"


def frames_topic(line_id: str, camera_id: str) -> str:
    return f"{TOPIC_ROOT}/{line_id}/{camera_id}/frames"


def verdict_topic(line_id: str, station: str) -> str:
    return f"{TOPIC_ROOT}/{line_id}/{station}/verdict"


def parse_frames_topic(topic: str) -> tuple[str, str] | None:
    """(line, camera) of ``sqis/v1/{line}/{camera}/frames``; None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT or parts[4] != "frames" or not parts[2] or not parts[3]:
        return None
    return parts[2], parts[3]


def mqtt_url(settings: Settings) -> str:
    """SQIS_MQTT_URL, else (only where the local stack stands in: ``settings.local``) its mosquitto."""
    if settings.mqtt_url is not None:
        return settings.mqtt_url.get_secret_value()
    info = settings.stack_info().get("mqtt") if settings.local else None
    if info:
        return str(info["url"])
    raise settings._missing("mqtt_url", " or --mqtt-url", "MQTT broker (is mosquitto installed?)")


def make_client(url: str, client_id: str, *, clean_session: bool = True, manual_ack: bool = False,
                max_inflight: int = 100, keepalive: int = 30, **callbacks: Any) -> Client:
    """A connected-asynchronously client (network loop in its own thread; reconnects with backoff).

    ``callbacks``: ``on_connect``, ``on_message``, ``on_publish``, ``on_disconnect`` (paho's version-2
    signatures). ``manual_ack``: received QoS 1 messages are acknowledged only by ``client.ack``."""
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "tcp") or not u.hostname:
        raise ConfigError(f"MQTT URL must be mqtt://[user:password@]host[:port], got {u.scheme}://...")
    c = _paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                     protocol=_paho.MQTTv311, manual_ack=manual_ack)
    if u.username:
        c.username_pw_set(unquote(u.username), unquote(u.password or ""))
    c.max_inflight_messages_set(max_inflight)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(0.2, 5)
    for name, fn in callbacks.items():
        setattr(c, name, fn)
    c.connect_async(u.hostname, u.port or 1883, keepalive=keepalive)
    c.loop_start()
    return c


def close(client: Client) -> None:
    try:
        client.disconnect()
    finally:
        client.loop_stop()
