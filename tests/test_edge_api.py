"""The edge gateway's HTTP uplink against the real `sqis api` (POST /v1/frames): every queued frame
accepted once, and a resend of the same queue entries (same Idempotency-Key) creates no new frame."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from producers.edge import EdgeConfig, EdgeGateway, EdgeStats, Forwarder, HttpUplink
from producers.edge_wire import frame_id_for
from producers.preprocess import Preprocessor
from producers.spool import Spool
from producers.synthetic import SyntheticSource
from sqis.bench.harness import render_jpegs
from tests.api_fixtures import ApiStack, api_stack  # noqa: F401 (the fixture)


def test_edge_http_uplink_against_the_api(api_stack: ApiStack, tmp_path: Path) -> None:  # noqa: F811
    st = api_stack
    cam = f"cam-{uuid.uuid4().hex[:6]}"
    src = SyntheticSource(cam, "line-edge", size=(96, 96), count=20, seed=2)
    gw = EdgeGateway([src], Preprocessor(), HttpUplink(st.base_url, st.keys["ingest"]),
                     EdgeConfig(device_id=f"dev-{cam}", queue_dir=tmp_path / "edge"))
    stats = gw.run(threading.Event()).snapshot()
    assert stats["sent"] == 20 and stats["pending"] == 0 and stats["rejected"] == 0, stats
    assert st.frames.wait_for(lambda r: sum(x["camera_id"] == cam for x in r) >= 20, 30)
    refs = [r for r in st.frames.snapshot() if r["camera_id"] == cam]
    assert sorted(r["seq"] for r in refs) == list(range(20))  # the device's sequence is the FrameRef's
    # a resend of the same frame (a crash after the POST, before the queue entry was removed) carries the
    # same Idempotency-Key: the API answers with the first frame id and publishes nothing new
    jpeg = render_jpegs(1, 96)[0]
    for attempt in range(2):
        queue = Spool(tmp_path / f"resend-{attempt}", 1 << 24)
        for i in range(5):
            queue.put({"device": f"dev2-{cam}", "seq": i, "captured_at": 1_700_000_000_000_000 + i,
                       "frame_id": frame_id_for(f"dev2-{cam}", i), "line_id": "line-edge", "camera_id": cam}, jpeg)
        sent = EdgeStats()
        fwd = Forwarder(queue, HttpUplink(st.base_url, st.keys["ingest"]), sent)
        for _ in range(500):
            if len(queue) == 0:
                break
            fwd.step()
            time.sleep(0.01)
        assert sent.sent == 5, sent
    time.sleep(1.0)
    assert sum(x["camera_id"] == cam for x in st.frames.snapshot()) == 25
