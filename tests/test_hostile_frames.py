"""Hostile FrameRefs through a real worker and broker (#8 hostile input): an oversized garbage message
(tansu stores max.message.bytes but does not enforce it), URIs outside the store, a frame_id that is
not a UUID, a lying image bomb and a wrong image format each end in the DLQ with their reason; the
good frames around them are inspected and the partition moves on."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from typing import Any

from schemas.serde import serialize
from sqis.harness import FramePublisher, TopicCollector
from tests.test_dlq import _send


def _png_header_bomb(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_hostile_frames_are_dead_lettered_with_their_reason(settings_factory: Any, worker_factory: Any,
                                                            request: Any) -> None:
    s = settings_factory(partitions={"frames": 1})
    pub = FramePublisher(s, cameras=1, size=96)
    request.addfinalizer(pub.close)
    refs = pub.prepare(3)
    store = pub.store
    bomb = _png_header_bomb(30000, 30000)
    gif = b"GIF89a" + b"\x01\x00\x01\x00\x80\x00\x00" + b"\x00" * 6 + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"

    def stored(ref: dict[str, Any], name: str, data: bytes, enc: str) -> dict[str, Any]:
        return dict(ref, uri=store.put(f"frames/{name}", data), size_bytes=len(data), encoding=enc,
                    content_sha256=hashlib.sha256(data).hexdigest())

    plan: list[tuple[str, dict[str, Any] | None]] = [
        ("ok", refs[0]),
        ("undecodable_message", None),  # 2 MiB of garbage
        ("outside_store", dict(refs[1], uri="file:///etc/passwd", size_bytes=0, content_sha256="")),
        ("outside_store", dict(refs[1], uri=store.url.rstrip("/") + "/../../escape.jpg", size_bytes=0,
                               content_sha256="")),
        ("invalid_frame_ref", dict(refs[1], frame_id="not-a-uuid")),
        ("image_too_large", stored(refs[1], "bomb.png", bomb, "png")),  # the FrameRef still says 96x96
        ("unsupported_encoding", stored(refs[1], "x.gif", gif, "gif")),
        ("ok", refs[2]),
    ]
    garbage = os.urandom(2 * 1024 * 1024)
    offsets: list[int] = []
    for _kind, ref in plan:
        if ref is None:
            _send(pub, b"cam-01", garbage, [("sqis-schema", b"0123456789abcdef")], offsets)
        else:
            value, headers = serialize("frame_ref", dict(ref, captured_at=1_700_000_000_000_000))
            _send(pub, ref["camera_id"].encode(), value, headers, offsets)

    dlq = TopicCollector(s, "frames_dlq")
    insp = TopicCollector(s, "inspections")
    w = worker_factory(s, max_batch=4, max_wait_ms=20)
    try:
        assert dlq.wait_for(lambda r: len(r) >= 6, 90), [d["error_type"] for d in dlq.snapshot()]
        assert insp.wait_for(lambda r: len(r) >= 2, 60)
        w.stop()
        dead, inspected = dlq.snapshot(), insp.snapshot()
    finally:
        dlq.close()
        insp.close()
    want = {off: kind for (kind, _), off in zip(plan, offsets, strict=True) if kind != "ok"}
    assert {d["source_offset"]: d["error_type"] for d in dead} == want
    big = next(d for d in dead if d["error_type"] == "undecodable_message")
    assert big["original_size"] == len(garbage) and len(big["original_value"]) == 256 * 1024
    assert big["original_sha256"] == hashlib.sha256(garbage).hexdigest()
    for d in dead:
        if d["error_type"] == "outside_store":
            assert d["error_message"].startswith("refused: outside the store")
    assert sorted(i["frame_id"] for i in inspected) == sorted([refs[0]["frame_id"], refs[2]["frame_id"]])
