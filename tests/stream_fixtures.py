"""Helpers for the stream-processor tests: Inspection records and a producer of them."""

from __future__ import annotations

import uuid
from typing import Any

from infra.kafka import producer
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.serde import serialize


def inspection(*, line: str, cam: str, captured_at: int, fail: bool = False, cls: str = "scratch",
               part_id: str | None = None, brightness: float = 120.0, seq: int = 0,
               image_uri: str = "file:///nowhere.jpg", boxes: list[tuple[float, float, float, float]] | None = None,
               mask: dict[str, Any] | None = None) -> dict[str, Any]:
    dets = []
    if fail:
        for i, b in enumerate(boxes or [(10.0, 10.0, 40.0, 30.0)]):
            dets.append({"class_id": 1, "class_name": cls, "score": 0.9 - i / 10, "x1": b[0], "y1": b[1], "x2": b[2],
                         "y2": b[3], "mask": mask, "polygon": [], "area_mm2": None, "length_mm": None})
    return {
        "frame_id": str(uuid.uuid4()), "line_id": line, "camera_id": cam, "seq": seq, "part_id": part_id,
        "captured_at": captured_at, "inspected_at": captured_at + 20_000, "image_uri": image_uri, "width": 128,
        "height": 96, "model_name": "demo", "model_version": "1",
        "thresholds": {"default_score": 0.25, "iou": 0.45, "per_class": {}, "source": "settings", "image_score": None},
        "verdict": "FAIL" if fail else "PASS", "verdict_rules": [f"score>=0.25:{cls}"] if fail else [],
        "detections": dets, "mask_uri": None, "segmenter": None,
        "image_stats": {"brightness": brightness, "contrast": 40.0, "sharpness": 300.0, "max_score": 0.3},
        "timings": {"queue_ms": 1.0, "fetch_ms": 1.0, "decode_ms": 1.0, "infer_ms": 5.0, "postprocess_ms": 0.5,
                    "segment_ms": 0.0, "total_ms": 8.5},
        "batch_size": 1, "worker_id": "w-test", "source_partition": 0, "source_offset": seq,
    }


def produce_inspections(s: Settings, records: list[dict[str, Any]]) -> None:
    p = producer(s, client_id="test-inspections", idempotent=False)
    topic = TopicCatalog(s.topic_prefix).inspections
    for rec in records:
        value, headers = serialize("inspection", rec)
        p.produce(topic, value=value, key=rec["camera_id"].encode(), headers=headers)
        p.poll(0)
    assert p.flush(30) == 0


def read_topic(s: Settings, topic_key: str, schema: str, group: str, *, min_count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    import time

    from infra.kafka import consumer
    from schemas.serde import deserialize

    c = consumer(s, group_id=group, client_id=group)
    c.subscribe([TopicCatalog(s.topic_prefix).name(topic_key)])
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(out) < min_count:
            for m in c.consume(500, 0.5):
                if m.error() is None:
                    out.append(deserialize(schema, m.value(), m.headers()))
    finally:
        c.close()
    return out
