"""What an edge device sends: one MQTT message (or HTTP part) per frame, and its idempotent frame id.

Payload: ``SQF1`` + a 4-byte big-endian header length + a JSON header + the encoded image (empty when
the header names an already-stored object in ``uri``). Header fields: ``device``, ``seq`` (the
device's persistent sequence), ``captured_at`` (µs UTC), ``width``, ``height``, ``encoding``,
optional ``part``, ``trigger``, ``uri``, ``content_sha256``, ``truth`` and ``gate``
(``{"decision": "good"|"suspect", "score": float, "sampled": bool}``). The frame id is a UUIDv5
of device and sequence, so a QoS 1 redelivery or a resend after a crash is the same frame.
"""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any

from producers.base import ProducerError

MAGIC = b"SQF1"
NAMESPACE = uuid.UUID("5b0e3b7e-6a53-4f3c-9d57-3c4a1f0e2a11")
GATE_HEADER = "sqis-edge-gate"  # Kafka header on the FrameRef: the edge gate's decision (JSON)
REQUIRED = ("device", "seq", "captured_at")


class WireError(ProducerError):
    """An edge message that cannot be read (bad magic, header or fields)."""


def frame_id_for(device: str, seq: int) -> str:
    """The frame id of a device's ``seq``-th frame: the same on every delivery of it."""
    return str(uuid.uuid5(NAMESPACE, f"{device}/{int(seq)}"))


def encode(header: dict[str, Any], image: bytes = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(h)) + h + image


def decode(payload: bytes) -> tuple[dict[str, Any], bytes]:
    if len(payload) < 8 or not payload.startswith(MAGIC):
        raise WireError("not an sqis edge frame (no SQF1 magic)")
    (n,) = struct.unpack(">I", payload[4:8])
    if 8 + n > len(payload):
        raise WireError(f"header length {n} beyond the payload ({len(payload)} bytes)")
    try:
        header = json.loads(payload[8:8 + n])
    except ValueError as exc:
        raise WireError(f"bad JSON header: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    missing = [k for k in REQUIRED if k not in header]
    if missing:
        raise WireError(f"header lacks {', '.join(missing)}")
    try:
        header["seq"], header["captured_at"] = int(header["seq"]), int(header["captured_at"])
    except (TypeError, ValueError):
        raise WireError("seq and captured_at must be integers") from None
    image = payload[8 + n:]
    if not image and not header.get("uri"):
        raise WireError("no image bytes and no uri")
    return header, image
