"""`sqis bridge mqtt`, the verdicts direction: part verdicts -> MQTT ``sqis/v1/{line}/{station}/verdict``.

Each verdict is published retained with QoS 1, so a PLC or HMI that (re)subscribes gets the latest
verdict of its station at once. A camera belongs to the station ``stations`` maps it to (default: a
station named after the camera); a part seen by cameras of two stations is published to both. The
consumed offsets are committed only after mosquitto acknowledged every publish of the batch; while
the broker is unreachable the loop pauses and retries (infra/consume_loop.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from infra.consume_loop import ConsumeLoop, LoopStats, RetryLater
from infra.mqtt import close as close_client
from infra.mqtt import make_client, mqtt_url, verdict_topic
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.serde import SchemaError, deserialize

log = logging.getLogger(__name__)

PUBACK_WAIT_S = 10.0


def stations_of(verdict: Mapping[str, Any], stations: Mapping[str, str]) -> list[str]:
    cams = [v["camera_id"] for v in verdict.get("views") or []] + list(verdict.get("missing_cameras") or [])
    return sorted({stations.get(c, c) for c in cams}) or ["line"]


def verdict_message(verdict: Mapping[str, Any], station: str) -> bytes:
    """The JSON a PLC reads: OK | NG | INCOMPLETE with the part and its worst finding."""
    return json.dumps({
        "part_id": verdict["part_id"], "line_id": verdict["line_id"], "station": station,
        "verdict": verdict["verdict"], "worst_class": verdict.get("worst_class"),
        "worst_score": verdict.get("worst_score"), "worst_camera": verdict.get("worst_camera"),
        "frame_ids": [v["frame_id"] for v in verdict.get("views") or []],
        "missing_cameras": list(verdict.get("missing_cameras") or []), "decided_at": verdict.get("decided_at"),
        "reason": verdict.get("reason", ""),
    }, separators=(",", ":")).encode()


class VerdictPublisher:
    """Consumes the part-verdicts topic and publishes each verdict retained to its stations."""

    def __init__(self, settings: Settings, *, url: str | None = None, client_id: str = "sqis-bridge-verdicts",
                 group_id: str = "mqtt-verdicts", stations: Mapping[str, str] | None = None,
                 stop_event: threading.Event | None = None) -> None:
        self.stations = dict(stations or {})
        self.published = 0
        self.client = make_client(url or mqtt_url(settings), client_id, clean_session=True)
        self.loop = ConsumeLoop(settings, topics=[TopicCatalog(settings.topic_prefix).part_verdicts],
                                group_id=group_id, client_id=client_id, on_batch=self._on_batch,
                                with_producer=False, stop_event=stop_event, max_wait_s=0.05, name="mqtt-verdicts")

    def _on_batch(self, messages: list[Any], _loop: Any) -> None:
        if not self.client.is_connected():
            raise RetryLater("mqtt broker unreachable")
        infos = []
        for m in messages:
            try:
                v = deserialize("part_verdict", m.value(), m.headers())
            except SchemaError as exc:
                log.error("undecodable part verdict skipped", extra={
                    "where": f"{m.topic()}[{m.partition()}]@{m.offset()}", "error": str(exc)})
                continue
            for st in stations_of(v, self.stations):
                infos.append(self.client.publish(verdict_topic(v["line_id"], st), verdict_message(v, st),
                                                 qos=1, retain=True))
        deadline = time.monotonic() + PUBACK_WAIT_S
        while not all(i.is_published() for i in infos):
            if time.monotonic() > deadline:
                raise RetryLater("mqtt broker did not acknowledge the verdicts")
            time.sleep(0.01)
        self.published += len(infos)

    def run(self) -> LoopStats:
        try:
            return self.loop.run()
        finally:
            close_client(self.client)
