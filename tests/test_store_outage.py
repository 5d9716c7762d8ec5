"""Object-store outage through a real `sqis worker` process (#8 fault-injection suite).

The worker reads frames from a real HTTP S3 endpoint (a moto server on 127.0.0.1). Mid-run the
server is stopped (its port refuses connections) while frames keep arriving on the broker, then it
is started again on the same port; moto keeps its objects in the test process, so the same data
comes back. Two outages:

- 20 s with the production budgets (fetch retries 3, per-batch deadline 20 s, rewind backoff
  0.5-10 s): a store outage as long as the batch deadline is ridden out.
- a "long" outage, 30 s, with every store budget of the worker shortened by settings (1 retry, a 1 s
  batch deadline, rewind backoff 0.1-0.5 s): the outage outlasts the deadline 30 times, the largest
  backoff 60 times and the old cut-off (20 rewinds to one offset, then dead-lettered as
  store_unavailable), which the test checks by counting the rewinds to one offset in the worker's log.
  The rewinds of one partition must also come about one backoff apart: before, an idle poll blocked
  for up to 1 s before the paused partition was resumed, which stretched a 0.5 s backoff to 1.3 s.

Asserted: nothing on the frames DLQ; every frame inspected exactly once; nothing was inspected while
the store was down (the outage was real); the worker's `sqis_worker_store_unavailable` gauge was up
during the outage and back to 0 after; the worker logged the store reachable again.
"""

from __future__ import annotations

import itertools
import statistics
import time
import urllib.request
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from infra.stack import free_port
from sqis.bench.harness import FramePublisher, TopicCollector, WorkerPool

pytestmark = [pytest.mark.chaos]

FRAMES_BEFORE, FRAMES_DURING = 8, 24
LONG_BUDGETS = {"worker_fetch_retries": 1, "worker_fetch_deadline_s": 1.0,
                "worker_rewind_backoff_min_s": 0.1, "worker_rewind_backoff_max_s": 0.5}
OLD_CUTOFF_REWINDS = 20  # before #8 a frame was dead-lettered as store_unavailable after 20 rewinds


def _metrics(port: int) -> dict[str, float]:
    """Samples of the worker's /metrics as {'name{label="v"}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(body):
        for smp in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(smp.labels.items()))
            out[f"{smp.name}{{{labels}}}" if labels else smp.name] = smp.value
    return out


def _moto(port: int) -> Any:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.mark.parametrize(("outage_s", "budgets"), [(20.0, {}), (30.0, LONG_BUDGETS)], ids=["20s", "long"])
def test_store_outage_dead_letters_nothing_and_every_frame_is_inspected_after(
        outage_s: float, budgets: dict[str, float], settings_factory: Any, onnx_model_path: Path, tmp_path: Path,
        unique_id: str, monkeypatch: pytest.MonkeyPatch, record_property: Any) -> None:
    import boto3

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    s3_port, metrics_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    server = _moto(s3_port)
    bucket = f"sqis-outage-{unique_id}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    s = settings_factory(partitions={"frames": 2}, object_store_url=f"s3://{bucket}/plant",
                         s3_endpoint_url=endpoint, **budgets)
    pub = FramePublisher(s, cameras=2, lines=1, size=64)
    refs = pub.prepare(FRAMES_BEFORE + FRAMES_DURING)  # every object uploaded while the store is up
    assert all(r["uri"].startswith(f"s3://{bucket}/plant/") for r in refs)
    before, during = refs[:FRAMES_BEFORE], refs[FRAMES_BEFORE:]
    insp = TopicCollector(s, "inspections")
    dlq = TopicCollector(s, "frames_dlq")
    pool = WorkerPool(s, str(onnx_model_path), 1, tmp_path / "logs", max_batch=4, max_wait_ms=20, fetch_threads=2,
                      extra_args=["--metrics-port", str(metrics_port)])
    try:
        pool.wait_ready(timeout=120, settle_s=0.5)
        pub.publish(before)
        assert insp.wait_frames({r["frame_id"] for r in before}, 60), "no frame inspected before the outage"

        server.stop()  # the endpoint goes away: connections to its port are refused
        down_at = time.monotonic()
        pub.publish(during, rate_fps=FRAMES_DURING / min(5.0, outage_s / 2))  # frames keep arriving
        gauge_up = 0.0
        while time.monotonic() - down_at < outage_s:
            gauge_up = max(gauge_up, _metrics(metrics_port).get("sqis_worker_store_unavailable", 0.0))
            time.sleep(0.5)
        inspected_while_down = {r["frame_id"] for r in insp.snapshot()} & {r["frame_id"] for r in during}
        dead_while_down = len(dlq.snapshot())
        server = _moto(s3_port)  # the same endpoint, the same objects
        up_at = time.monotonic()

        assert insp.wait_frames({r["frame_id"] for r in refs}, 90), "frames not inspected after the store came back"
        recovered_s = time.monotonic() - up_at
        m = _metrics(metrics_port)
        time.sleep(1.0)  # a dead letter, if any, has reached the collector
        dead = dlq.snapshot()
        codes = pool.stop()
        inspected = insp.snapshot()
    finally:
        pool.stop()
        insp.close()
        dlq.close()
        pub.close()
        server.stop()

    rewinds = m.get('sqis_worker_partition_rewinds_total{reason="store_unavailable"}', 0.0)
    # rewinds in a row to one offset (the old cut-off counted those), from the worker's log
    rewound = [ln for ln in pool.log_lines(0)
               if ln.get("reason") == "store_unavailable" and ln.get("msg", "").endswith("rewound and paused")]
    per_offset = Counter(ln["source"] for ln in rewound)
    most = max(per_offset.values(), default=0)
    gaps = [b - a for src in per_offset for a, b in itertools.pairwise(
        [datetime.fromisoformat(ln["ts"]).timestamp() for ln in rewound if ln["source"] == src])]
    gap_s = statistics.median(gaps) if gaps else 0.0
    record_property("outage_s", outage_s)
    record_property("store_rewinds", rewinds)
    record_property("recovered_s", round(recovered_s, 1))
    print(f"store outage {outage_s:.0f} s: {rewinds:.0f} store_unavailable rewinds ({most} in a row to one offset, "
          f"median {gap_s:.2f} s apart); "
          f"every frame inspected "
          f"{recovered_s:.1f} s after the store came back")
    assert not inspected_while_down, "frames inspected while the store was down: the outage was not real"
    assert dead_while_down == 0 and dead == [], [(d["error_type"], d["error_message"]) for d in dead]
    counts = Counter(r["frame_id"] for r in inspected)
    assert set(counts) == {r["frame_id"] for r in refs} and max(counts.values()) == 1, "lost or doubled"
    assert gauge_up >= 1.0, "the store_unavailable gauge never said the store was down"
    assert m.get("sqis_worker_store_unavailable") == 0.0
    assert sum(v for k, v in m.items() if k.startswith("sqis_worker_dlq_total")) == 0
    assert rewinds >= 1
    if budgets:  # the outage outlasted every store budget of the worker, the old 20-rewind cut-off included
        assert outage_s > 20 * max(budgets["worker_fetch_deadline_s"], budgets["worker_rewind_backoff_max_s"])
        assert most > OLD_CUTOFF_REWINDS, per_offset
        # a partition is retried when its backoff runs out, not up to a second later (an idle poll blocked 1 s)
        assert gap_s < budgets["worker_rewind_backoff_max_s"] + 0.4, gaps
    assert codes == [0]
    assert any(ln.get("msg") == "object store reachable again" for ln in pool.log_lines(0))
