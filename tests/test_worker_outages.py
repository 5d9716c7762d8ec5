"""#8 items 4 and 5 against a real broker: the worker rides out a broker crash (its own Apache Kafka,
SIGKILLed and started again on the same port with its data), and a dead letter too large for the
broker does not crash the worker."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from inference_workers.model_loader import demo_model_path
from infra.kafka import create_topics
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from sqis.bench.harness import FramePublisher, TopicCollector


def _create(s: Settings) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            create_topics(s, TopicCatalog(s.topic_prefix), partitions={"frames": 2})
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _model() -> str:
    path = demo_model_path()
    if path is None:
        pytest.skip("the committed demo model is not in this checkout")
    return str(path)


def test_worker_rides_out_a_broker_restart(private_kafka: Any, tmp_path: Path) -> None:
    from inference_workers.worker import InferenceWorker
    from tests.model_fixtures import RunningWorker

    s = Settings(state_dir=tmp_path / "state", kafka_bootstrap=private_kafka.bootstrap, topic_prefix="o.",
                 object_store_url=(tmp_path / "objects").as_uri(), kafka_session_timeout_ms=2000,
                 kafka_heartbeat_interval_ms=500, onnx_threads=1)
    _create(s)
    w = RunningWorker(InferenceWorker(s, _model(), max_batch=4, max_wait_ms=10, fetch_threads=2,
                                      group_id="iw-outage", rewind_backoff_s=(0.2, 1.0), delivery_timeout_ms=4000))
    try:
        with FramePublisher(s, cameras=2, size=96) as pub, contextlib.closing(TopicCollector(s)) as before:
            refs = pub.prepare(8)
            pub.publish(refs)
            assert before.wait_frames({r["frame_id"] for r in refs}, 120)
            more = pub.prepare(8)
            pub.publish(more)  # in flight while the broker dies
        private_kafka.kill()
        time.sleep(6)  # longer than the delivery timeout: results in flight now fail
        assert w.thread.is_alive(), f"worker exited during the outage: {w.error!r}"
        private_kafka.start()  # same port, same data: topics, offsets and producer state survive
        with FramePublisher(s, cameras=2, size=96) as pub, contextlib.closing(TopicCollector(s)) as after:
            refs = pub.prepare(8)
            pub.publish(refs)
            assert after.wait_frames({r["frame_id"] for r in refs}, 120), "frames after the restart not inspected"
        assert w.thread.is_alive(), f"worker exited after the restart: {w.error!r}"
    finally:
        stats = w.stop(timeout=90) if w.thread.is_alive() else None
    assert stats is not None


def test_dead_letter_too_large_for_the_broker_does_not_crash_the_worker(settings_factory, tmp_path: Path) -> None:
    """A message just under the size limit is undecodable; its dead letter (which embeds it) is over
    the limit. On main the KafkaException escaped and the worker crash-looped on that offset."""
    from inference_workers.worker import InferenceWorker
    from tests.model_fixtures import RunningWorker

    limit = 64 * 1024
    s = settings_factory(partitions={"frames": 1}, kafka_max_message_bytes=limit)
    dlq = TopicCollector(s, "frames_dlq")
    insp = TopicCollector(s, "inspections")
    w = RunningWorker(InferenceWorker(s, _model(), max_batch=2, max_wait_ms=10, fetch_threads=1,
                                      group_id="iw-big-dlq"))
    try:
        with FramePublisher(s, cameras=1, size=64) as pub:
            pub.send_raw(b"c1", b"\x00" * (limit - 256), None)  # not Avro: dead-lettered as undecodable
            good = pub.prepare(3)
            pub.publish(good)
        assert insp.wait_frames({r["frame_id"] for r in good}, 120), "frames after the big one not inspected"
        assert dlq.wait_for(lambda recs: len(recs) >= 1, 30)
        rec: dict[str, Any] = dlq.snapshot()[0]
        assert rec["error_type"] == "undecodable_message" and rec["source_offset"] == 0
        assert "not embedded" in rec["error_message"] and not rec["original_value"]
        assert w.thread.is_alive()
    finally:
        dlq.close()
        insp.close()
        w.stop()
