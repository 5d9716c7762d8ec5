"""Garbage, truncated and mutated Avro on every topic the project consumes, and unknown schema
fingerprints (#8 hostile input): the serde raises SchemaError and nothing else, so every consumer
dead-letters the message with its reason instead of crashing or looping."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.serde import SCHEMA_HEADER, SchemaError, deserialize, serialize

pytestmark = pytest.mark.usefixtures("legacy_framing")  # these test the pre-#19 header framing

VALID = {
    "frame_ref": {"frame_id": str(uuid.UUID(int=1)), "line_id": "l", "camera_id": "c", "seq": 1, "captured_at": 2,
                  "uri": "file:///x.jpg", "width": 3, "height": 4, "encoding": "jpeg", "content_sha256": "0" * 64,
                  "part_id": None, "trigger_id": None, "size_bytes": 5, "truth": None},
    "inspection": {"frame_id": str(uuid.UUID(int=2)), "line_id": "l", "camera_id": "c", "seq": 1, "part_id": None,
                   "captured_at": 1, "inspected_at": 2, "image_uri": "u", "width": 1, "height": 1, "model_name": "m",
                   "model_version": "1", "thresholds": {"default_score": 0.25, "iou": 0.45, "per_class": {},
                                                        "source": "s", "image_score": None},
                   "verdict": "PASS", "detections": [], "verdict_rules": [], "mask_uri": None, "segmenter": None,
                   "image_stats": None,
                   "timings": {k: 0.0 for k in ("queue_ms", "fetch_ms", "decode_ms", "infer_ms", "postprocess_ms",
                                                "segment_ms", "total_ms")},
                   "batch_size": 1, "worker_id": "w", "source_partition": 0, "source_offset": 0},
}
CONSUMED = sorted(VALID)  # frames (workers) and inspections (sinks, stream processors)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(CONSUMED), cut=st.integers(0, 400),
       flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6))
def test_truncated_or_mutated_avro_is_schema_error_or_a_record(name: str, cut: int, flips: list[tuple[int, int]]) -> None:
    payload, headers = serialize(name, VALID[name])
    b = bytearray(payload)
    for pos, val in flips:
        if b:
            b[pos % len(b)] = val
    data = bytes(b[: max(0, len(b) - cut)])
    try:
        rec = deserialize(name, data, headers)
    except SchemaError:
        return
    assert isinstance(rec, dict) and set(rec) == set(VALID[name])


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(CONSUMED), data=st.binary(max_size=600))
def test_random_bytes_are_schema_error_or_a_record(name: str, data: bytes) -> None:
    _, headers = serialize(name, VALID[name])
    try:
        deserialize(name, data, headers)
    except SchemaError:
        pass


@given(name=st.sampled_from(CONSUMED), fp=st.binary(min_size=0, max_size=40))
def test_unknown_or_missing_fingerprint_is_schema_error(name: str, fp: bytes) -> None:
    payload, headers = serialize(name, VALID[name])
    good = dict(headers)[SCHEMA_HEADER]
    if fp == good:
        return
    for hdrs in ([(SCHEMA_HEADER, fp)], [], None, [(SCHEMA_HEADER, None)]):
        try:
            deserialize(name, payload, hdrs)
        except SchemaError as exc:
            assert name in str(exc)
        else:
            raise AssertionError(f"decoded with headers {hdrs!r}")


def test_tombstone_is_schema_error() -> None:
    _, headers = serialize("frame_ref", VALID["frame_ref"])
    try:
        deserialize("frame_ref", None, headers)
    except SchemaError as exc:
        assert "tombstone" in str(exc)
    else:
        raise AssertionError("a tombstone decoded")
