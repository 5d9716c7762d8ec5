"""The edge gateway's pure parts (issue #20 §3), no broker: the wire format and idempotent frame ids, the
persistent sequence, the gate, and the store-and-forward loop against a tiny local HTTP server that
speaks the `POST /v1/frames` contract (202 {"frame_id"}, Idempotency-Key, Bearer key)."""

from __future__ import annotations

import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producers.base import Backoff
from producers.edge import EdgeConfig, EdgeGateway, EdgeStats, Forwarder, HttpUplink, SeqCounter
from producers.edge_gate import GOOD, SUSPECT, StatsGate, miss_rate
from producers.edge_wire import WireError, decode, encode, frame_id_for
from producers.preprocess import Preprocessor
from producers.spool import Spool
from producers.synthetic import SyntheticSource, render_part


def test_wire_round_trip_and_refusals() -> None:
    h = {"device": "d1", "seq": 7, "captured_at": 123, "gate": {"decision": GOOD}}
    header, image = decode(encode(h, b"\xff\xd8jpeg"))
    assert header == h and image == b"\xff\xd8jpeg"
    assert decode(encode(h | {"uri": "s3://b/k"}))[1] == b""  # a reference to a stored object
    for bad in (b"nope", b"SQF1\x00\x00\x00\x09{}", encode({"device": "d"}, b"x"), encode(h)):
        with pytest.raises(WireError):
            decode(bad)


def test_frame_id_is_a_function_of_device_and_sequence() -> None:
    assert frame_id_for("dev-a", 1) == frame_id_for("dev-a", 1)
    assert len({frame_id_for("dev-a", 1), frame_id_for("dev-a", 2), frame_id_for("dev-b", 1)}) == 3


def test_sequence_survives_restarts_and_never_repeats(tmp_path: Path) -> None:
    a = SeqCounter(tmp_path / "seq", block=10)
    first = [a.next() for _ in range(15)]
    b = SeqCounter(tmp_path / "seq", block=10)  # a crash after 15: the reserved block is skipped
    second = [b.next() for _ in range(3)]
    assert first == list(range(15)) and second == [20, 21, 22]


def test_stats_gate_forwards_suspects_and_a_sample_of_good_frames() -> None:
    rng = np.random.default_rng(3)
    gate = StatsGate(sample_rate=0.5)
    flat = np.full((128, 128, 3), 120, np.uint8)
    scratched = flat.copy()
    scratched[40:44, 10:110] = 30
    assert gate.decide(flat, "f").decision == GOOD
    d = gate.decide(scratched, "f")
    assert d.decision == SUSPECT and d.forward
    sampled = [gate.decide(flat, f"id-{i}").sampled for i in range(400)]
    assert 0.4 < sum(sampled) / 400 < 0.6
    assert gate.decide(flat, "id-1").sampled == sampled[1]  # a resend makes the same choice
    defective = [render_part(rng, 160, 160, defective=True)[0] for _ in range(20)]
    assert sum(gate.decide(img, str(i)).decision == SUSPECT for i, img in enumerate(defective)) >= 15
    r = miss_rate({"a": {"decision": GOOD}, "b": {"decision": GOOD}, "c": {"decision": SUSPECT}},
                  {"a": True, "b": False, "c": False})
    assert r == {"sampled_good": 2, "misses": 1, "miss_rate": 0.5, "suspect": 1, "suspect_clean": 1}


class _Api:
    """`POST /v1/frames` as the API branch specifies it, with scripted failures."""

    def __init__(self, key: str = "k3y") -> None:
        self.key = key
        self.script: list[int] = []  # status codes answered before accepting
        self.accepted: dict[str, dict[str, Any]] = {}
        self.requests = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                api.requests += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = api.script.pop(0) if api.script else 202
                if self.path != "/v1/frames" or self.headers.get("Authorization") != f"Bearer {api.key}":
                    code = 401
                if code == 202:
                    msg = BytesParser(policy=HTTP).parsebytes(
                        f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
                    fields = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                              for p in msg.iter_parts()}
                    fid = self.headers["Idempotency-Key"]
                    api.accepted[fid] = fields
                out = json.dumps({"frame_id": self.headers.get("Idempotency-Key")}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _drain(fwd: Forwarder, queue: Spool, rounds: int = 400) -> None:
    import time

    for _ in range(rounds):
        if len(queue) == 0:
            return
        fwd.step()
        time.sleep(0.005)


def test_http_uplink_retries_failures_and_refuses_bad_frames(tmp_path: Path) -> None:
    api = _Api()
    try:
        queue = Spool(tmp_path / "q", 1 << 20)
        for seq in range(4):
            meta = {"device": "d", "seq": seq, "captured_at": 1000 + seq, "frame_id": frame_id_for("d", seq),
                    "line_id": "line-1", "camera_id": "cam-01", "part": f"p{seq}", "encoding": "jpeg",
                    "gate": {"decision": SUSPECT}}
            queue.put(meta, b"\xff\xd8img%d" % seq)
        stats = EdgeStats()
        link = HttpUplink(api.url, "k3y", backoff=Backoff(0.01, 2.0, 0.05, None))
        api.script = [503, 429, 400]  # two retried outages, then frame 0 refused for good
        fwd = Forwarder(queue, link, stats, window=1)
        _drain(fwd, queue)
        assert len(queue) == 0
        assert stats.sent == 3 and stats.rejected == 1
        got = api.accepted[frame_id_for("d", 3)]
        assert got["line"] == b"line-1" and got["camera"] == b"cam-01" and got["part"] == b"p3"
        assert got["captured_at"] == b"1003" and got["image"] == b"\xff\xd8img3"
        assert json.loads(got["gate"]) == {"decision": SUSPECT}
        # a wrong key is an outage (frames stay queued), not a refusal
        queue.put({"device": "d", "seq": 9, "captured_at": 2000, "frame_id": frame_id_for("d", 9),
                   "line_id": "line-1", "camera_id": "cam-01"}, b"x")
        bad = Forwarder(queue, HttpUplink(api.url, "wrong", backoff=Backoff(0.01, 2.0, 0.02, None)), stats)
        _drain(bad, queue, rounds=20)
        assert len(queue) == 1 and stats.rejected == 1
    finally:
        api.close()


class _NoFrames:
    reconnects = failed_reads = 0

    def __init__(self, camera_id: str, line_id: str) -> None:
        self.camera_id, self.line_id = camera_id, line_id

    def frames(self, stop: threading.Event) -> Any:
        return iter(())

    def close(self) -> None:
        pass


def test_gateway_queue_is_bounded_and_counts_evictions(tmp_path: Path) -> None:
    """With the uplink down the queue keeps the newest frames within its bound; the rest is counted."""
    api = _Api()
    api.close()  # nothing listens: every send fails, as in an outage
    src = SyntheticSource("cam-01", "line-1", size=(96, 96), count=40, seed=1)
    cfg = EdgeConfig(device_id="dev", queue_dir=tmp_path / "edge", queue_max_bytes=60_000, drain_s=0.2)
    gw = EdgeGateway([src], Preprocessor(), HttpUplink(api.url, backoff=Backoff(0.05, 2, 0.1, None)), cfg)
    stats = gw.run(threading.Event()).snapshot()
    assert stats["captured"] == 40 and stats["sent"] == 0
    assert stats["evicted"] > 0 and stats["pending"] + stats["evicted"] == stats["queued"] == 40
    # the next run (uplink back) sends exactly what was kept, under the same frame ids
    api2 = _Api()
    try:
        gw2 = EdgeGateway([_NoFrames("cam-01", "line-1")], Preprocessor(),
                          HttpUplink(api2.url, "k3y"), EdgeConfig(device_id="dev", queue_dir=tmp_path / "edge"))
        s2 = gw2.run(threading.Event()).snapshot()
        assert s2["sent"] == stats["pending"] and s2["pending"] == 0
        assert set(api2.accepted) <= {frame_id_for("dev", i) for i in range(40)}
        assert frame_id_for("dev", 39) in api2.accepted  # the newest survive eviction
    finally:
        api2.close()
