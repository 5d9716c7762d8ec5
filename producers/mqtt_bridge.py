"""`sqis bridge mqtt`, the frames direction: MQTT ``sqis/v1/{line}/{camera}/frames`` -> object store +
FrameRef on the frames topic.

The bridge subscribes with QoS 1 in a persistent session and acknowledges an MQTT message (manual
PUBACK) only after Kafka acknowledged its FrameRef, so a bridge killed at any point loses nothing:
mosquitto redelivers what was not acknowledged. A redelivered message maps to the same frame id
(UUIDv5 of device and sequence, producers/edge_wire.py) and the same object key, so the store write
is an overwrite and the FrameRef a duplicate that the worker's exactly-once output and the sinks'
dedupe by frame_id collapse. While Kafka or the store is down nothing is acknowledged: mosquitto
queues the messages (persistence on), the bridge retries with backoff.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import kafka
from infra.mqtt import MQTTMessage, make_client, mqtt_url, parse_frames_topic
from infra.mqtt import close as close_client
from infra.objectstore import ObjectStoreError, open_store
from infra.settings import Settings
from producers.base import Counters
from producers.edge_wire import GATE_HEADER, WireError, decode, frame_id_for
from producers.publisher import object_key
from schemas.catalog import TopicCatalog
from schemas.serde import serialize

log = logging.getLogger(__name__)

FRAMES_FILTER = "sqis/v1/+/+/frames"
BRIDGE_HEADER = "sqis-bridge"  # Kafka headers on the FrameRefs the bridge produces: its client id ...
FRAME_ID_HEADER = "sqis-frame-id"  # ... and the frame id (read back at start without decoding the record)
RETRY_S = (0.2, 5.0)  # backoff of a store write or produce that failed


@dataclass
class BridgeStats(Counters):
    received: int = 0  # MQTT messages handed to the bridge (redeliveries count again)
    redelivered: int = 0  # ... of them flagged DUP by the broker
    already_published: int = 0  # ... whose FrameRef Kafka had acknowledged before: acknowledged, not resent
    published: int = 0  # FrameRefs Kafka acknowledged (and MQTT messages acknowledged for them)
    rejected: int = 0  # unreadable messages: acknowledged and dropped, logged
    retries: int = 0  # store writes / produces retried


def frame_ref(line_id: str, camera_id: str, header: dict[str, Any], image: bytes, uri: str) -> dict[str, Any]:
    """The FrameRef of one edge message."""
    width, height = header.get("width"), header.get("height")
    if (not width or not height) and image:
        import cv2
        import numpy as np

        img = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise WireError("image bytes do not decode")
        height, width = img.shape[:2]
    return {
        "frame_id": frame_id_for(str(header["device"]), header["seq"]), "line_id": line_id,
        "camera_id": camera_id, "seq": header["seq"], "captured_at": header["captured_at"], "uri": uri,
        "width": int(width or 0), "height": int(height or 0), "encoding": str(header.get("encoding", "jpeg")),
        "content_sha256": header.get("content_sha256") or hashlib.sha256(image).hexdigest(),
        "part_id": header.get("part"), "trigger_id": header.get("trigger"),
        "size_bytes": int(header.get("size_bytes") or len(image)), "truth": header.get("truth"),
    }


class PublishedLog:
    """The frame ids whose FrameRef Kafka acknowledged, newest ``keep``, in an append-only file: a
    redelivery after a bridge restart is acknowledged to MQTT without producing the frame again.
    Written (not fsynced) before the MQTT acknowledgement, so a killed process loses none of it."""

    def __init__(self, path: Path, keep: int = 100_000) -> None:
        self.path, self.keep = path, keep
        path.parent.mkdir(parents=True, exist_ok=True)
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines()[-keep:]:
                self._ids[line.strip()] = None
        self._lines = len(self._ids)
        self._compact()

    def __contains__(self, frame_id: str) -> bool:
        return frame_id in self._ids

    def add(self, frame_id: str) -> None:
        self._ids[frame_id] = None
        if len(self._ids) > self.keep:
            self._ids.popitem(last=False)
        self._f.write(frame_id + "\n")
        self._f.flush()
        self._lines += 1
        if self._lines > 2 * self.keep:
            self._f.close()
            self._compact()

    def _compact(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{f}\n" for f in self._ids))
        os.replace(tmp, self.path)
        self._lines = len(self._ids)
        self._f = open(self.path, "a")  # noqa: SIM115 - held for the bridge's lifetime

    def close(self) -> None:
        self._f.close()


class MqttBridge:
    """MQTT frames -> store + FrameRefs. ``run(stop)`` until ``stop`` is set; ``stats`` counts."""

    def __init__(self, settings: Settings, *, client_id: str = "sqis-bridge", url: str | None = None,
                 topic_filter: str = FRAMES_FILTER) -> None:
        self.settings = settings
        self.stats = BridgeStats()
        self.topic = TopicCatalog(settings.topic_prefix).frames
        self.filter = topic_filter
        self.store = open_store(settings)
        if hasattr(self.store, "ensure_bucket"):
            self.store.ensure_bucket()
        self.producer = kafka.producer(settings, client_id=f"{client_id}-{socket.gethostname()}")
        # at most mosquitto's max_inflight_messages are unacknowledged: the queue cannot outgrow it
        self._inbox: queue.Queue[MQTTMessage] = queue.Queue(10_000)
        self._retry: list[tuple[float, MQTTMessage]] = []
        self.client_id = client_id
        self.published = PublishedLog(settings.state_dir / "bridge" / f"{client_id}.published")
        self.recovered = self._recover_recent()
        self._inflight: dict[str, list[MQTTMessage]] = {}  # frame id -> its deliveries awaiting Kafka
        self.connected = threading.Event()
        self.client = make_client(url or mqtt_url(settings), client_id, clean_session=False, manual_ack=True,
                                  on_connect=self._on_connect, on_message=self._on_message,
                                  on_disconnect=self._on_disconnect)

    def _recover_recent(self, per_partition: int = 2000, timeout_s: float = 15.0) -> int:
        """Frame ids this bridge produced just before it stopped (the tail of the frames topic, FrameRefs
        with its ``sqis-bridge`` header) join the published log: a SIGKILL between Kafka's acknowledgement
        and the log write would otherwise produce the redelivered frame again."""
        import uuid

        cons = kafka.consumer(self.settings, group_id=f"{self.client_id}-recover-{uuid.uuid4().hex[:6]}",
                              client_id=f"{self.client_id}-recover", **{"enable.auto.commit": False})
        found = 0
        try:
            md = cons.list_topics(self.topic, timeout=10).topics.get(self.topic)
            ends: dict[int, int] = {}
            starts = []
            for p in (md.partitions if md is not None else {}):
                lo, hi = cons.get_watermark_offsets(kafka.TopicPartition(self.topic, p), timeout=5)
                if hi > lo:
                    ends[p] = hi
                    starts.append(kafka.TopicPartition(self.topic, p, max(lo, hi - per_partition)))
            if not starts:
                return 0
            cons.assign(starts)
            me = self.client_id.encode()
            deadline = time.monotonic() + timeout_s
            while ends and time.monotonic() < deadline:
                for m in cons.consume(500, timeout=0.5):
                    if m.error():
                        continue
                    h = dict(m.headers() or [])
                    if h.get(BRIDGE_HEADER) == me and h.get(FRAME_ID_HEADER):
                        fid = h[FRAME_ID_HEADER].decode()
                        if fid not in self.published:
                            self.published.add(fid)
                            found += 1
                    if m.offset() >= ends.get(m.partition(), 0) - 1:
                        ends.pop(m.partition(), None)
                if ends:  # read_committed stops short of open transactions' offsets: look at positions
                    for tp in cons.position([kafka.TopicPartition(self.topic, p) for p in ends]):
                        if tp.offset >= ends[tp.partition]:
                            ends.pop(tp.partition, None)
        except kafka.KafkaException as exc:
            log.warning("could not read the frames topic's tail at start", extra={"error": str(exc)})
        finally:
            cons.close()
        if found:
            log.warning("frames produced just before the last stop were not in the published log",
                        extra={"frames": found})
        return found

    # -- MQTT callbacks (paho's network thread)
    def _on_connect(self, client: Any, _ud: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("mqtt connection refused", extra={"reason": str(reason)})
            return
        client.subscribe(self.filter, qos=1)
        self.connected.set()
        log.info("mqtt connected", extra={"filter": self.filter, "session_present": bool(flags.session_present)})

    def _on_disconnect(self, _c: Any, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connected.clear()
        log.warning("mqtt disconnected; reconnecting", extra={"reason": str(reason)})

    def _on_message(self, _c: Any, _ud: Any, msg: MQTTMessage) -> None:
        self._inbox.put(msg)

    # -- the bridge loop (caller's thread)
    def run(self, stop: threading.Event, *, drain_s: float = 10.0) -> BridgeStats:
        log.info("bridge started", extra={"filter": self.filter, "topic": self.topic, "store": self.store.url})
        try:
            while not stop.is_set():
                self._turn(0.2)
            deadline = time.monotonic() + drain_s  # what Kafka acknowledges now is acknowledged to MQTT too
            while len(self.producer) and time.monotonic() < deadline:
                self.producer.poll(0.1)
        finally:
            close_client(self.client)  # unacknowledged messages stay in the broker's session
            self.producer.flush(1.0)
            self.published.close()
        log.info("bridge stopped", extra=self.stats.snapshot())
        return self.stats

    def _turn(self, timeout: float) -> None:
        now = time.monotonic()
        due = [m for t, m in self._retry if t <= now]
        self._retry = [(t, m) for t, m in self._retry if t > now]
        for m in due:
            self._handle(m, retry=True)
        try:
            msg = self._inbox.get_nowait()
        except queue.Empty:
            # never wait on the inbox with deliveries pending: a delivery report waiting for the next
            # poll is a frame Kafka has but MQTT would redeliver after a crash (a duplicate)
            self.producer.poll(0.005 if len(self.producer) else min(timeout, 0.05))
            return
        self._handle(msg)
        self.producer.poll(0)

    def _later(self, msg: MQTTMessage, attempt: int) -> None:
        self.stats.add("retries")
        delay = min(RETRY_S[1], RETRY_S[0] * 2 ** min(attempt, 8))
        self._retry.append((time.monotonic() + delay, msg))

    def _handle(self, msg: MQTTMessage, retry: bool = False) -> None:
        attempt = getattr(msg, "_sqis_attempt", 0)
        if not retry:
            self.stats.add("received")
            if msg.dup:
                self.stats.add("redelivered")
        where = parse_frames_topic(msg.topic)
        try:
            if where is None:
                raise WireError(f"not a frames topic: {msg.topic}")
            header, image = decode(msg.payload)
            line_id, camera_id = where
            fid = frame_id_for(str(header["device"]), header["seq"])
            if fid in self.published:
                self.stats.add("already_published")
                self.client.ack(msg.mid, msg.qos)
                return
            if fid in self._inflight and not retry:  # a redelivery while the first is on its way
                self._inflight[fid].append(msg)
                return
            uri = header.get("uri")
            if not uri:
                key = object_key(line_id, camera_id, header["captured_at"], fid)
                uri = self.store.put(key, image, f"image/{header.get('encoding', 'jpeg')}")
            rec = frame_ref(line_id, camera_id, header, image, str(uri))
            value, headers = serialize("frame_ref", rec)
        except WireError as exc:
            self.stats.add("rejected")
            log.error("edge message rejected", extra={"topic": msg.topic, "mid": msg.mid, "error": str(exc)})
            self.client.ack(msg.mid, msg.qos)
            return
        except (ObjectStoreError, OSError) as exc:
            log.warning("object store write failed; retrying", extra={"topic": msg.topic, "error": str(exc)})
            msg._sqis_attempt = attempt + 1  # type: ignore[attr-defined]
            self._later(msg, attempt)
            return
        headers = [*headers, (BRIDGE_HEADER, self.client_id.encode()), (FRAME_ID_HEADER, fid.encode())]
        if header.get("gate"):
            headers.append((GATE_HEADER, json.dumps(header["gate"], separators=(",", ":")).encode()))

        self._inflight.setdefault(fid, [msg])

        def on_delivery(err: Any, _m: Any) -> None:
            if err is None:
                self.stats.add("published")
                self.published.add(fid)
                for m in self._inflight.pop(fid, [msg]):
                    self.client.ack(m.mid, m.qos)
            else:
                log.warning("frame ref not delivered; retrying", extra={"frame_id": rec["frame_id"],
                                                                        "error": str(err)})
                msg._sqis_attempt = attempt + 1  # type: ignore[attr-defined]
                self._later(msg, attempt)

        while True:
            try:
                self.producer.produce(self.topic, key=camera_id.encode(), value=value, headers=headers,
                                      on_delivery=on_delivery)
                return
            except BufferError:
                self.producer.poll(0.1)
