"""Uploads: validate an image like the worker will, store it, publish its FrameRef, wait for the ack.

A 202 is sent only after the object is stored and the broker acknowledged the FrameRef (acks=all),
so every accepted upload reaches the line. Idempotency keys live in PostgreSQL (``api_idempotency``):
a retry gets the first request's frame_id and publishes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from api.errors import ApiError
from inference_workers.fetch import (
    CorruptImage,
    FrameError,
    ImageHeader,
    ImageTooLarge,
    UnsupportedEncoding,
    check_container,
    probe_image,
)
from infra.kafka import KafkaException
from infra.kafka import producer as make_producer
from infra.objectstore import ObjectStoreError
from infra.settings import Settings
from producers.publisher import object_key
from schemas.serde import serialize

log = logging.getLogger(__name__)

SOURCE_HEADER = ("sqis-source", b"api")  # on every record the API publishes (the schema has no source field yet)
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
_ID = re.compile(ID_PATTERN)  # ids go into object keys: no '/', no '..'
_EXT = {"jpeg": "jpg", "png": "png", "bmp": "bmp"}
_MIME = {"jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp"}


def check_id(name: str, value: str | None, *, required: bool = True) -> str | None:
    if value is None or value == "":
        if required:
            raise ApiError(422, "invalid-field", f"{name} is required")
        return None
    if not _ID.match(value):
        raise ApiError(422, "invalid-field", f"{name} must match {_ID.pattern} (letters, digits, . _ : -; at most 64)")
    return value


def validate_image(data: bytes, *, max_bytes: int, max_pixels: int, encodings: tuple[str, ...]) -> ImageHeader:
    """The worker's checks, before anything is stored: size, real format (allow-list), pixel budget
    from the header (no decoding), container structure (truncated files)."""
    if len(data) > max_bytes:
        raise ApiError(413, "image-too-large", f"image of {len(data)} B exceeds the limit of {max_bytes} B")
    try:
        header = probe_image(data, max_pixels=max_pixels, encodings=encodings)
        check_container(data, header.encoding)
    except UnsupportedEncoding as exc:
        raise ApiError(415, "unsupported-encoding", str(exc)) from None
    except ImageTooLarge as exc:
        raise ApiError(413, "pixel-budget", str(exc)) from None
    except (CorruptImage, FrameError) as exc:
        raise ApiError(422, "corrupt-image", str(exc)) from None
    return header


def frame_key(line_id: str, camera_id: str, captured_at_us: int, frame_id: str, encoding: str) -> str:
    """The producers' object key (frames/<line>/<camera>/<date>/<frame_id>.jpg) with the right extension."""
    return object_key(line_id, camera_id, captured_at_us, frame_id).removesuffix(".jpg") + "." + _EXT.get(encoding, "img")


def mime(encoding: str) -> str:
    return _MIME.get(encoding, "application/octet-stream")


def request_digest(data: bytes, meta: Mapping[str, Any]) -> str:
    h = hashlib.sha256(data)
    for k in sorted(meta):
        h.update(f"\x00{k}={meta[k]}".encode())
    return h.hexdigest()


class Delivery:
    """One idempotent producer shared by the request threads; ``send`` returns once acknowledged."""

    def __init__(self, settings: Settings, client_id: str) -> None:
        # linger 1 ms: a request waits for its own ack, so batching buys little and costs latency
        self.producer = make_producer(settings, client_id=client_id, **{"linger.ms": 1})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="api-delivery", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.1)

    def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]], timeout_s: float,
             ident: str) -> None:
        """Produce and wait for the acknowledgement; ApiError 503 when the broker does not take it."""
        fut: Future[None] = Future()

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(RuntimeError(err.str()))

        try:
            self.producer.produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
        except BufferError:
            raise ApiError(503, "broker-busy", "the producer queue is full; retry later",
                           headers={"Retry-After": "1"}) from None
        except KafkaException as exc:
            log.warning("produce refused", extra={"frame_id": ident, "error": str(exc)})
            raise ApiError(503, "broker-unavailable", "the broker refused the record; retry later",
                           headers={"Retry-After": "2"}) from None
        try:
            fut.result(timeout_s)
        except FutureTimeout:
            log.warning("no acknowledgement in time", extra={"frame_id": ident, "timeout_s": timeout_s})
            raise ApiError(503, "broker-timeout", f"the broker did not acknowledge within {timeout_s:g} s; "
                           "retry (with the same Idempotency-Key)", headers={"Retry-After": "2"}) from None
        except RuntimeError as exc:
            log.warning("delivery failed", extra={"frame_id": ident, "error": str(exc)})
            raise ApiError(503, "broker-unavailable", "the broker did not take the record; retry later",
                           headers={"Retry-After": "2"}) from None

    def ready(self, topic: str, timeout_s: float = 2.0) -> str | None:
        """None when the broker answers and knows ``topic``, else why not."""
        try:
            md = self.producer.list_topics(topic, timeout=timeout_s)
        except KafkaException as exc:
            return f"broker: {exc}"
        t = md.topics.get(topic)
        if t is None or t.error is not None:
            return f"topic {topic} missing"
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.producer.flush(5)


def store_put(store: Any, key: str, data: bytes, content_type: str, ident: str) -> str:
    try:
        return str(store.put(key, data, content_type))
    except (ObjectStoreError, OSError) as exc:
        log.warning("object store write failed", extra={"frame_id": ident, "error": str(exc)})
        raise ApiError(503, "store-unavailable", "the object store refused the image; retry later",
                       headers={"Retry-After": "2"}) from None


def frame_ref(meta: Mapping[str, Any], uri: str, header: ImageHeader, data: bytes) -> dict[str, Any]:
    return {"frame_id": meta["frame_id"], "line_id": meta["line_id"], "camera_id": meta["camera_id"],
            "seq": int(meta["seq"]), "captured_at": int(meta["captured_at"]), "uri": uri, "width": header.width,
            "height": header.height, "encoding": header.encoding, "content_sha256": hashlib.sha256(data).hexdigest(),
            "part_id": meta.get("part_id"), "trigger_id": meta.get("trigger_id"), "size_bytes": len(data),
            "truth": None}


def publish_frame(store: Any, delivery: Delivery, topic: str, meta: Mapping[str, Any], header: ImageHeader,
                  data: bytes, timeout_s: float) -> dict[str, Any]:
    """Store the image, publish its FrameRef (header sqis-source: api), wait for the ack; the FrameRef."""
    fid = str(meta["frame_id"])
    key = frame_key(meta["line_id"], meta["camera_id"], int(meta["captured_at"]), fid, header.encoding)
    uri = store_put(store, key, data, mime(header.encoding), fid)
    ref = frame_ref(meta, uri, header, data)
    value, headers = serialize("frame_ref", ref)
    delivery.send(topic, ref["camera_id"].encode(), value, headers + [SOURCE_HEADER], timeout_s, fid)
    return ref


# ---- idempotency keys ------------------------------------------------------------------------------


def claim(conn: Any, key_id: str, idem: str, digest: str, stale_s: float) -> tuple[str, str]:
    """('new' | 'replay', frame_id) for an Idempotency-Key; ApiError 409 while the first request runs,
    422 when the key was used with another request. A 'pending' claim older than ``stale_s`` (its
    request died) is taken over with the same frame_id."""
    fid = str(uuid.uuid4())
    row = conn.execute(
        "INSERT INTO api_idempotency (key_id, idempotency_key, request_sha256, frame_id) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (key_id, idempotency_key) DO NOTHING RETURNING frame_id", (key_id, idem, digest, fid)).fetchone()
    if row is not None:
        return "new", fid
    row = conn.execute(
        "SELECT request_sha256, frame_id::text, state, extract(epoch FROM now() - updated_at) FROM api_idempotency "
        "WHERE key_id = %s AND idempotency_key = %s", (key_id, idem)).fetchone()
    if row is None:  # released in between: try once more
        return claim(conn, key_id, idem, digest, stale_s)
    if row[0] != digest:
        raise ApiError(422, "idempotency-key-reused", "this Idempotency-Key was used with a different request")
    if row[2] == "done":
        return "replay", row[1]
    if float(row[3]) < stale_s:
        raise ApiError(409, "request-in-progress", "a request with this Idempotency-Key is still running; retry",
                       headers={"Retry-After": "1"})
    took = conn.execute("UPDATE api_idempotency SET updated_at = now() WHERE key_id = %s AND idempotency_key = %s "
                        "AND state = 'pending' AND updated_at < now() - make_interval(secs => %s) RETURNING 1",
                        (key_id, idem, stale_s)).fetchone()
    if took is None:
        raise ApiError(409, "request-in-progress", "a request with this Idempotency-Key is still running; retry",
                       headers={"Retry-After": "1"})
    return "new", row[1]


def settle(conn: Any, key_id: str, idem: str, ok: bool) -> None:
    """Mark the claim done, or release it so that a retry runs the request again."""
    if ok:
        conn.execute("UPDATE api_idempotency SET state = 'done', updated_at = now() WHERE key_id = %s "
                     "AND idempotency_key = %s", (key_id, idem))
    else:
        conn.execute("DELETE FROM api_idempotency WHERE key_id = %s AND idempotency_key = %s AND state = 'pending'",
                     (key_id, idem))
