"""#17 item 4: a stuck producer is never silent and never outlives SIGTERM. A real `sqis worker` on a
broker of the test's own, which is SIGSTOPped while results are in flight (deliveries hang, nothing
fails): the worker logs one warning, /readyz turns unready, and after SIGCONT deliveries resume and it
is ready again. Then, hung once more with results in flight, SIGTERM ends it within the bound
(inference_workers.cli.SHUTDOWN_BOUND_S). About 40 s."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from inference_workers.cli import SHUTDOWN_BOUND_S
from infra.kafka import create_topics
from infra.settings import Settings
from infra.stack import free_port
from schemas.catalog import TopicCatalog
from sqis.bench.harness import FramePublisher, TopicCollector, WorkerPool
from tests.test_sink_faults import _wait

pytestmark = [pytest.mark.chaos]

STALL_S = 3.0


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except urllib.error.HTTPError:
        return False


def _msgs(pool: WorkerPool, text: str) -> list[dict[str, Any]]:
    return [ln for ln in pool.log_lines(0) if ln.get("msg", "").startswith(text)]


def test_hung_broker_warns_unready_resumes_and_sigterm_is_bounded(private_kafka: Any, onnx_model_path: Path,
                                                                   tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path / "state", kafka_bootstrap=private_kafka.bootstrap, topic_prefix="st.",
                 object_store_url=(tmp_path / "objects").as_uri(), onnx_threads=1,
                 worker_delivery_stall_s=STALL_S, kafka_session_timeout_ms=6000)
    create_topics(s, TopicCatalog(s.topic_prefix), partitions={"frames": 2})
    port = free_port()
    pool = WorkerPool(s, str(onnx_model_path), 1, tmp_path / "logs", max_batch=4, fetch_threads=1,
                      extra_args=["--metrics-port", str(port)])
    stopped = False

    def hang() -> None:
        nonlocal stopped
        os.kill(private_kafka.pid, signal.SIGSTOP)
        stopped = True

    def resume() -> None:
        nonlocal stopped
        if stopped:
            os.kill(private_kafka.pid, signal.SIGCONT)
            stopped = False

    try:
        with FramePublisher(s, cameras=2, size=96) as pub, contextlib.closing(TopicCollector(s)) as coll:
            pool.wait_ready(timeout=120, settle_s=1)
            assert _wait(lambda: _ready(port), 10)
            # 1. hung with results in flight: one warning, unready; back after SIGCONT
            refs = pub.prepare(400)
            pub.publish(refs)
            ids = {r["frame_id"] for r in refs}
            assert coll.wait_for(lambda recs: len(recs) >= 4, 60)
            hang()
            assert _wait(lambda: _msgs(pool, "deliveries stalled"), STALL_S + 10), "no warning while deliveries hang"
            assert not _ready(port), "ready while its deliveries hang"
            time.sleep(2)
            resume()
            assert coll.wait_frames(ids, 90), "deliveries did not resume after the broker came back"
            assert _wait(lambda: _msgs(pool, "deliveries resumed"), 10)
            assert _wait(lambda: _ready(port), 10), "still unready after deliveries resumed"
            assert len(_msgs(pool, "deliveries stalled")) == 1  # one warning, not one per result
            # 2. hung again with results in flight: SIGTERM still ends the worker within the bound
            more = pub.prepare(400)
            pub.publish(more)
            n = len(coll.snapshot())
            assert coll.wait_for(lambda recs: len(recs) >= n + 4, 60)
            hang()
            time.sleep(1)
            t0 = time.monotonic()
            pool.kill(0, signal.SIGTERM)
            with contextlib.suppress(Exception):
                pool.procs[0].wait(SHUTDOWN_BOUND_S + 5)
            took = time.monotonic() - t0
            assert pool.procs[0].poll() is not None, f"worker still running {took:.0f} s after SIGTERM"
            assert took <= SHUTDOWN_BOUND_S + 3, took
    finally:
        resume()
        pool.stop(timeout=10)
