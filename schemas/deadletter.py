"""DeadLetter records (schemas/avro/frame_dlq.avsc) and their plain headers, built in one place.

The reason is also carried in plain headers (``sqis-error-type``, ``sqis-error-message``,
``sqis-source``) so tools can filter without Avro. Pure functions: no Kafka, no I/O.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from typing import Any

from schemas.serde import serialize

__all__ = [
    "ERROR_MESSAGE_HEADER", "ERROR_TYPE_HEADER", "SOURCE_HEADER", "dead_letter", "dead_letter_record",
    "source_label",
]

ERROR_TYPE_HEADER = "sqis-error-type"
ERROR_MESSAGE_HEADER = "sqis-error-message"
SOURCE_HEADER = "sqis-source"

MAX_RECORD_MESSAGE = 4000  # characters of the error message kept in the record
MAX_HEADER_MESSAGE = 512  # ... and in the sqis-error-message header
# Bounds that keep a DLQ record far below the frames.dlq topic's max.message.bytes (schemas/catalog.py),
# whatever arrived: a record that cannot be produced would stall the partition it came from.
MAX_ORIGINAL_VALUE = 256 * 1024  # bytes of the original value kept (the whole value is hashed)
MAX_ORIGINAL_KEY = 1024
MAX_ORIGINAL_HEADERS = 32  # header entries kept ...
MAX_ORIGINAL_HEADER_VALUE = 1024  # ... and bytes of each
TRUNCATED_HEADER = "sqis-original-truncated"


def source_label(topic: str, partition: int, offset: int) -> str:
    """topic[partition]@offset, for logs, errors and the sqis-source header."""
    return f"{topic}[{partition}]@{offset}"


def dead_letter_record(
    *, source_topic: str, source_partition: int, source_offset: int, key: bytes | None, value: bytes | None,
    headers: Iterable[tuple[str, bytes | None]] | None, error_type: str, error_message: str, worker_id: str,
    frame_id: str | None = None, failed_at_us: int | None = None,
) -> dict[str, Any]:
    """A DeadLetter record holding the original key, value and headers of the failed message.

    Oversized parts are truncated (value, key, header values, header count) so the record always fits
    the DLQ topic; ``original_size`` and ``original_sha256`` describe the whole original value.
    """
    kept_headers: dict[str, bytes] = {}
    for k, v in headers or ():
        if len(kept_headers) >= MAX_ORIGINAL_HEADERS:
            break
        kept_headers[k[:256]] = (v if v is not None else b"")[:MAX_ORIGINAL_HEADER_VALUE]
    return {
        "source_topic": source_topic,
        "source_partition": int(source_partition),
        "source_offset": int(source_offset),
        "original_key": key[:MAX_ORIGINAL_KEY] if key is not None else None,
        "original_value": value[:MAX_ORIGINAL_VALUE] if value is not None else None,
        "original_headers": kept_headers,
        "error_type": error_type,
        "error_message": error_message[:MAX_RECORD_MESSAGE],
        "frame_id": frame_id,
        "failed_at": failed_at_us if failed_at_us is not None else time.time_ns() // 1000,
        "worker_id": worker_id,
        "original_size": len(value) if value is not None else None,
        "original_sha256": hashlib.sha256(value).hexdigest() if value is not None else None,
    }


def dead_letter(
    *, source_topic: str, source_partition: int, source_offset: int, key: bytes | None, value: bytes | None,
    headers: Iterable[tuple[str, bytes | None]] | None, error_type: str, error_message: str, worker_id: str,
    frame_id: str | None = None, failed_at_us: int | None = None,
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """(value bytes, headers) of the DLQ message: the Avro DeadLetter plus the plain error headers."""
    rec = dead_letter_record(
        source_topic=source_topic, source_partition=source_partition, source_offset=source_offset, key=key,
        value=value, headers=headers, error_type=error_type, error_message=error_message, worker_id=worker_id,
        frame_id=frame_id, failed_at_us=failed_at_us,
    )
    out, out_headers = serialize("frame_dlq", rec)
    truncated = value is not None and len(value) > MAX_ORIGINAL_VALUE
    return out, [
        *out_headers,
        *([(TRUNCATED_HEADER, str(len(value or b"")).encode())] if truncated else []),
        (ERROR_TYPE_HEADER, error_type.encode("utf-8", "replace")),
        (ERROR_MESSAGE_HEADER, error_message[:MAX_HEADER_MESSAGE].encode("utf-8", "replace")),
        (SOURCE_HEADER, source_label(source_topic, source_partition, source_offset).encode("utf-8", "replace")),
    ]
