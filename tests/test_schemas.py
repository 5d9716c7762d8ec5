"""The contracts: Avro round trips, schema evolution, fingerprint headers, the topic catalog."""

from __future__ import annotations

import io
import json
import uuid
from importlib import resources

import fastavro
import pytest
from fastavro.schema import parse_schema
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.catalog import TOPICS, TopicCatalog
from schemas.serde import (
    SCHEMA_HEADER,
    SchemaError,
    Serde,
    deserialize,
    history,
    schema_fingerprint,
    serialize,
)

pytestmark = pytest.mark.usefixtures("legacy_framing")  # these test the pre-#19 header framing

text = st.text(max_size=40)
i32 = st.integers(-(2**31), 2**31 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)

truth_box = st.fixed_dictionaries({"class_name": text, "x1": f32, "y1": f32, "x2": f32, "y2": f32})
frame_refs = st.fixed_dictionaries({
    "frame_id": st.uuids().map(str), "line_id": text, "camera_id": text, "seq": i64, "captured_at": i64,
    "uri": text, "width": i32, "height": i32, "encoding": st.sampled_from(["jpeg", "png"]),
    "content_sha256": text, "part_id": st.none() | text, "trigger_id": st.none() | text,
    "size_bytes": i64, "truth": st.none() | st.lists(truth_box, max_size=4),
})
masks = st.fixed_dictionaries({"height": i32, "width": i32, "counts": st.lists(i32, max_size=8), "area": i64})
detections = st.fixed_dictionaries({
    "class_id": i32, "class_name": text, "score": f32, "x1": f32, "y1": f32, "x2": f32, "y2": f32,
    "mask": st.none() | masks, "polygon": st.lists(f32, max_size=8),
    "area_mm2": st.none() | f32, "length_mm": st.none() | f32,
})
image_stats = st.fixed_dictionaries({k: f32 for k in ("brightness", "contrast", "sharpness", "max_score")})
inspections = st.fixed_dictionaries({
    "frame_id": st.uuids().map(str), "line_id": text, "camera_id": text, "seq": i64, "part_id": st.none() | text,
    "captured_at": i64, "inspected_at": i64, "image_uri": text, "width": i32, "height": i32,
    "model_name": text, "model_version": text,
    "thresholds": st.fixed_dictionaries({"default_score": f32, "iou": f32, "per_class": st.dictionaries(text, f32, max_size=3),
                                       "source": text, "image_score": st.none() | f32}),
    "verdict": st.sampled_from(["PASS", "FAIL"]), "detections": st.lists(detections, max_size=5),
    "verdict_rules": st.lists(text, max_size=3), "mask_uri": st.none() | text, "segmenter": st.none() | text,
    "image_stats": st.none() | image_stats,
    "timings": st.fixed_dictionaries({k: f32 for k in ("queue_ms", "fetch_ms", "decode_ms", "infer_ms",
                                                       "postprocess_ms", "segment_ms", "total_ms")}),
    "batch_size": i32, "worker_id": text, "source_partition": i32, "source_offset": i64,
})
dead_letters = st.fixed_dictionaries({
    "source_topic": text, "source_partition": i32, "source_offset": i64,
    "original_key": st.none() | st.binary(max_size=20), "original_value": st.none() | st.binary(max_size=200),
    "original_headers": st.dictionaries(text, st.binary(max_size=10), max_size=3),
    "error_type": text, "error_message": text, "frame_id": st.none() | text, "failed_at": i64, "worker_id": text,
    "original_size": st.none() | i64, "original_sha256": st.none() | text,
})


@settings(max_examples=60, deadline=None)
@given(frame_refs)
def test_frame_ref_round_trip(rec: dict) -> None:
    payload, headers = serialize("frame_ref", rec)
    assert deserialize("frame_ref", payload, headers) == rec


@settings(max_examples=60, deadline=None)
@given(inspections)
def test_inspection_round_trip(rec: dict) -> None:
    payload, headers = serialize("inspection", rec)
    assert deserialize("inspection", payload, headers) == rec


@settings(max_examples=40, deadline=None)
@given(dead_letters)
def test_dead_letter_round_trip(rec: dict) -> None:
    payload, headers = serialize("frame_dlq", rec)
    assert deserialize("frame_dlq", payload, headers) == rec


def _v1_frame_ref_schema() -> dict:
    path = resources.files("schemas") / "avro" / "history" / "frame_ref.v1.avsc"
    return parse_schema(json.loads(path.read_text()))


def _sample_frame_ref() -> dict:
    return {
        "frame_id": str(uuid.uuid4()), "line_id": "line-1", "camera_id": "cam-01", "seq": 7,
        "captured_at": 1_764_000_000_000_000, "uri": "file:///x/y.jpg", "width": 320, "height": 240,
        "encoding": "jpeg", "content_sha256": "ab" * 32, "part_id": "P-1", "trigger_id": None,
        "size_bytes": 1234, "truth": [{"class_name": "spot", "x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0}],
    }


def test_reader_of_previous_version_reads_the_new_one() -> None:
    """Forward compatibility: a consumer still on v1 decodes what a v2 producer writes."""
    rec = _sample_frame_ref()
    payload, headers = serialize("frame_ref", rec)
    old_reader = Serde("frame_ref", reader_schema=_v1_frame_ref_schema())
    got = old_reader.decode(payload, headers)
    assert set(got) == {f["name"] for f in _v1_frame_ref_schema()["fields"]}
    assert {k: rec[k] for k in got} == got


def test_new_reader_reads_the_previous_version() -> None:
    """Backward compatibility: the current reader decodes v1 messages, new fields take defaults."""
    v1 = _v1_frame_ref_schema()
    rec = {k: v for k, v in _sample_frame_ref().items() if k not in ("size_bytes", "truth")}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v1, rec)
    got = deserialize("frame_ref", buf.getvalue(), [(SCHEMA_HEADER, schema_fingerprint(v1).encode())])
    assert got == rec | {"size_bytes": 0, "truth": None}


def test_every_schema_version_resolves_against_the_current_one() -> None:
    # frame_ref and inspection have a v1 in schemas/avro/history: the loop below must not be empty for them
    assert len(history("frame_ref")) >= 2 and len(history("inspection")) >= 2
    for name in ("frame_ref", "inspection", "frame_dlq"):
        versions = history(name)
        for old in versions[:-1]:
            new_fields = {f["name"]: f for f in versions[-1]["fields"]}
            old_fields = {f["name"] for f in old["fields"]}
            added = set(new_fields) - old_fields
            assert all("default" in new_fields[f] for f in added), f"{name}: new fields need defaults: {added}"


@pytest.mark.parametrize("headers, payload, match", [
    (None, b"\x00", "no sqis-schema header"),
    ([(SCHEMA_HEADER, b"0123456789abcdef")], b"\x00", "unknown writer schema"),
    ("valid", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", "corrupt Avro"),
    ("valid", None, "empty message"),
])
def test_bad_messages_raise_schema_error(headers, payload, match: str) -> None:
    if headers == "valid":
        headers = Serde("frame_ref").headers()
    with pytest.raises(SchemaError, match=match):
        deserialize("frame_ref", payload, headers)


def test_trailing_bytes_are_rejected() -> None:
    payload, headers = serialize("frame_ref", _sample_frame_ref())
    with pytest.raises(SchemaError, match="trailing"):
        deserialize("frame_ref", payload + b"junk", headers)


def test_catalog_keys_are_fields_of_their_schemas() -> None:
    names = [t.name for t in TOPICS.values()]
    assert len(names) == len(set(names))
    for t in TOPICS.values():
        fields = {f["name"] for f in history(t.schema)[-1]["fields"]}
        assert t.key_field in fields, t
        assert t.partitions >= 1
    cat = TopicCatalog("t1.")
    assert cat.frames == "t1.frames" and cat.frames_dlq == "t1.frames.dlq"


def test_dead_letter_builds_record_and_plain_headers() -> None:
    from schemas.deadletter import dead_letter

    value, headers = dead_letter(
        source_topic="t.inspections", source_partition=2, source_offset=41, key=b"cam-1", value=b"\x00bad",
        headers=[("a", b"1"), ("b", None)], error_type="SchemaError", error_message="x" * 5000,
        worker_id="sink-1", frame_id=None, failed_at_us=7,
    )
    h = dict(headers)
    assert h["sqis-error-type"] == b"SchemaError"
    assert h["sqis-source"] == b"t.inspections[2]@41"
    assert h["sqis-error-message"] == b"x" * 512
    assert SCHEMA_HEADER in h
    rec = deserialize("frame_dlq", value, headers)
    assert (rec["source_topic"], rec["source_partition"], rec["source_offset"]) == ("t.inspections", 2, 41)
    assert rec["original_value"] == b"\x00bad" and rec["original_key"] == b"cam-1"
    assert rec["original_headers"] == {"a": b"1", "b": b""}
    assert len(rec["error_message"]) == 4000 and rec["failed_at"] == 7 and rec["worker_id"] == "sink-1"


def test_oversized_dead_letter_is_truncated_hashed_and_fits_the_dlq_topic() -> None:
    """#8 item 5: a DLQ record never exceeds the frames.dlq topic's max.message.bytes, whatever arrived."""
    import hashlib

    from schemas.catalog import TOPICS
    from schemas.deadletter import MAX_ORIGINAL_VALUE, TRUNCATED_HEADER, dead_letter

    big = bytes(range(256)) * (20 * 4096)  # 20 MiB
    value, headers = dead_letter(
        source_topic="t.frames", source_partition=0, source_offset=9, key=b"k" * 100_000, value=big,
        headers=[(f"h{i}", b"v" * 100_000) for i in range(500)], error_type="oversized_frame",
        error_message="m" * 100_000, worker_id="w-1", frame_id="f-1",
    )
    limit = TOPICS["frames_dlq"].max_message_bytes
    assert len(value) + sum(len(k) + len(v) for k, v in headers) < limit
    rec = deserialize("frame_dlq", value, headers)
    assert rec["original_value"] == big[:MAX_ORIGINAL_VALUE]
    assert rec["original_size"] == len(big)
    assert rec["original_sha256"] == hashlib.sha256(big).hexdigest()
    assert dict(headers)[TRUNCATED_HEADER] == str(len(big)).encode()
    small, small_headers = dead_letter(
        source_topic="t.frames", source_partition=0, source_offset=1, key=None, value=b"abc", headers=None,
        error_type="x", error_message="y", worker_id="w")
    rec = deserialize("frame_dlq", small, small_headers)
    assert rec["original_value"] == b"abc" and rec["original_size"] == 3
    assert TRUNCATED_HEADER not in dict(small_headers)


def test_every_topic_declares_a_max_message_size() -> None:
    from schemas.catalog import TOPICS

    for t in TOPICS.values():
        assert 64 * 1024 <= t.max_message_bytes <= 16 * 1024 * 1024, t


@settings(max_examples=40, deadline=None)
@given(inspections)
def test_inspection_history_resolves_both_ways(rec: dict) -> None:
    """Every historical Inspection schema: an old reader decodes what the current writer writes, and the
    current reader decodes what the old writer wrote (added fields, nested ones too, take their defaults)."""
    versions = history("inspection")
    assert len(versions) >= 2
    current_fields = {f["name"] for f in versions[-1]["fields"]}
    for old in versions[:-1]:
        old_reader = Serde("inspection", reader_schema=old)
        old_rec = old_reader.decode(*serialize("inspection", rec))
        assert set(old_rec) == {f["name"] for f in old["fields"]}
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, old, old_rec)
        new_rec = deserialize("inspection", buf.getvalue(), [(SCHEMA_HEADER, schema_fingerprint(old).encode())])
        assert set(new_rec) == current_fields
        added = current_fields - set(old_rec)
        defaults = {f["name"]: f["default"] for f in versions[-1]["fields"] if f["name"] in added}
        assert {k: new_rec[k] for k in added} == defaults
        assert all(d.get("polygon") == [] and d.get("area_mm2") is None for d in new_rec["detections"])
        assert old_reader.decode(*serialize("inspection", new_rec)) == old_rec


# ---- stream processor topics (#9) ---------------------------------------------------------------------

f64 = st.floats(allow_nan=False, allow_infinity=False)
defect_rates = st.fixed_dictionaries({
    "line_id": text, "camera_id": text, "class_name": text, "window_start": i64, "window_s": i32, "frames": i32,
    "fails": i32, "defects": i32, "late": i32, "rate": f64, "p95_latency_ms": st.none() | f32, "final": st.booleans(),
    "example_frame_ids": st.lists(text, max_size=3),
})
alerts = st.fixed_dictionaries({
    "alert_id": text, "kind": st.sampled_from(["spc", "threshold", "drift"]), "rule": text,
    "state": st.sampled_from(["open", "acknowledged", "resolved"]), "severity": text, "line_id": text,
    "camera_id": text, "class_name": text, "window_start": i64, "window_end": i64, "value": f64,
    "center": st.none() | f64, "lcl": st.none() | f64, "ucl": st.none() | f64, "message": text, "opened_at": i64,
    "updated_at": i64, "resolved_at": st.none() | i64, "fired": i32, "example_frame_ids": st.lists(text, max_size=3),
    "details_json": text,
})
part_views = st.fixed_dictionaries({"camera_id": text, "frame_id": text, "verdict": text,
                                    "worst_class": st.none() | text, "worst_score": st.none() | f32})
part_verdicts = st.fixed_dictionaries({
    "part_id": text, "line_id": text, "verdict": st.sampled_from(["OK", "NG", "INCOMPLETE"]), "expected_views": i32,
    "views": st.lists(part_views, max_size=4), "missing_cameras": st.lists(text, max_size=3),
    "worst_class": st.none() | text, "worst_score": st.none() | f32, "worst_camera": st.none() | text,
    "first_seen_at": i64, "decided_at": i64, "reason": text,
})


@pytest.mark.parametrize(("name", "strategy"), [("defect_rate", defect_rates), ("alert", alerts),
                                                ("part_verdict", part_verdicts)])
def test_stream_topic_schemas_round_trip(name: str, strategy: st.SearchStrategy) -> None:
    @settings(max_examples=40, deadline=None)
    @given(strategy)
    def check(rec: dict) -> None:
        payload, headers = serialize(name, rec)
        assert deserialize(name, payload, headers) == rec

    check()


def test_stream_topics_in_catalog_with_their_keys() -> None:
    cat = TopicCatalog("p.")
    assert (cat.defect_rates, cat.alerts, cat.part_verdicts) == ("p.defect-rates", "p.alerts", "p.part-verdicts")
    for key, field_name in (("defect_rates", "line_id"), ("alerts", "alert_id"), ("part_verdicts", "part_id")):
        t = TOPICS[key]
        assert t.key_field == field_name


def test_stream_records_from_the_processors_are_valid() -> None:
    """What the processors emit encodes with the topic schemas (no field drift between code and contract)."""
    from stream_processors.alerts import AlertManager
    from stream_processors.parts import PartTracker
    from stream_processors.windows import RateWindows

    w = RateWindows(60, 0)
    base = {"line_id": "L1", "camera_id": "C1", "verdict": "FAIL", "timings": {"total_ms": 5.0},
            "detections": [{"class_name": "scratch", "score": 0.9}]}
    out = w.add({**base, "frame_id": "f1", "captured_at": 0}) + w.add({**base, "frame_id": "f2", "captured_at": 61_000_000})
    assert out
    for r in out:
        payload, headers = serialize("defect_rate", r.to_avro())
        assert deserialize("defect_rate", payload, headers)["frames"] == r.frames
    a = AlertManager().fire(("drift", "L1", "C1", "brightness"), rule="cusum_brightness", window_start_us=0,
                            window_end_us=60_000_000, value=1.0, details={"z": 5})[0]
    payload, headers = serialize("alert", a.to_avro())
    assert deserialize("alert", payload, headers)["alert_id"] == a.alert_id
    pv = PartTracker(expected_views=1).add({**base, "frame_id": "f3", "captured_at": 1, "part_id": "P1"}, 0.0)[0]
    payload, headers = serialize("part_verdict", pv.to_avro())
    assert deserialize("part_verdict", payload, headers)["verdict"] == "NG"
