"""A canary survives a restart of its controller (sqis/canary.py, canary_runs): a controller stopped
mid-way is resumed by the next one (same route, policy and start, counters rebuilt from the topics, one
decision, one ``canary`` switch row); a canary whose lease expired while no controller ran is rolled back
with rule ``controller_lost``. Inspections are produced directly (no worker): the controller only reads them."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from infra import kafka
from schemas.catalog import TopicCatalog
from schemas.serde import serialize
from sqis.canary import CanaryBusy, CanaryController, CanaryPolicy, Outcome, on_restart
from tests.model_fixtures import COMMITTED_MODEL
from training.registry import client_for, ensure_experiment, promote, register_onnx

US = 1_000_000


def _setup(settings_factory: Any, tmp_path: Path, name: str) -> Any:
    s = settings_factory(state_dir=tmp_path / "state", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = client_for(s)
    for _ in range(2):
        run = client.create_run(ensure_experiment(client, s, "canary-restart"))
        register_onnx(client, run, COMMITTED_MODEL, name)
        client.set_terminated(run.info.run_id)
    promote(client, name, "1", "production")
    promote(client, name, "2", "challenger")
    return s


def _inspections(s: Any, name: str, version: str, line: str, n: int) -> None:
    now = time.time_ns() // 1000
    base = {"seq": 0, "part_id": None, "inspected_at": now, "image_uri": "file:///x.jpg", "width": 64, "height": 64,
            "model_name": name, "model_version": version,
            "thresholds": {"default_score": 0.25, "iou": 0.45, "per_class": {}, "source": "", "image_score": None},
            "verdict_rules": [], "mask_uri": None, "segmenter": None,
            "image_stats": {"brightness": 120.0, "contrast": 40.0, "sharpness": 300.0, "max_score": 0.1},
            "timings": {k: 1.0 for k in ("queue_ms", "fetch_ms", "decode_ms", "infer_ms", "postprocess_ms",
                                         "segment_ms", "total_ms")},
            "batch_size": 1, "worker_id": "test", "source_partition": 0, "source_offset": 0}
    p = kafka.producer(s, client_id="test-canary-restart")
    for i in range(n):
        rec = base | {"frame_id": str(uuid.uuid4()), "line_id": line, "camera_id": f"{line}-cam", "captured_at": now + i,
                      "verdict": "PASS", "detections": []}
        value, headers = serialize("inspection", rec)
        p.produce(TopicCatalog(s.topic_prefix).inspections, value=value, key=rec["camera_id"].encode(), headers=headers)
    assert p.flush(10) == 0


def _start(ctl: CanaryController, stop: threading.Event, max_s: float = 40.0) -> tuple[threading.Thread, list[Outcome]]:
    out: list[Outcome] = []
    t = threading.Thread(target=lambda: out.append(ctl.run(stop, max_s=max_s)), daemon=True)
    t.start()
    return t, out


def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def _runs(pg_conn: Any, name: str) -> list[tuple[str, ...]]:
    return pg_conn.execute("SELECT status, version FROM canary_runs WHERE model_name = %s", (name,)).fetchall()


def _switches(pg_conn: Any, name: str) -> list[str]:
    return [r[0] for r in pg_conn.execute("SELECT action FROM model_switches WHERE model_name = %s ORDER BY at",
                                          (name,)).fetchall()]


def test_a_restarted_controller_resumes_the_canary_and_decides_once(
        settings_factory: Any, tmp_path: Path, unique_id: str, pg_dsn: str, pg_conn: Any) -> None:
    name = f"restart-{unique_id}"
    s = _setup(settings_factory, tmp_path, name)
    policy = CanaryPolicy(min_frames=6, min_pairs=1000, latency_budget_ms=60_000, clean_s=5.0)
    stop1 = threading.Event()
    ctl1 = CanaryController(s, name, lines=["line-1"], policy=policy, dsn=pg_dsn, poll_s=0.2, lease_s=30)
    t1, out1 = _start(ctl1, stop1)
    assert _wait(lambda: _runs(pg_conn, name) == [("open", "2")], 20)
    _inspections(s, name, "2", "line-1", 3)
    _inspections(s, name, "1", "line-2", 5)
    assert _wait(lambda: ctl1.state.canary_n == 3 and ctl1.state.production_n == 5, 20)
    # a second controller of a live canary is kept out
    with pytest.raises(CanaryBusy):
        CanaryController(s, name, lines=["line-1"], policy=policy, dsn=pg_dsn, lease_s=30).run(max_s=1)
    stop1.set()
    t1.join(20)
    assert out1 and out1[0].action == "stopped"  # no decision: the canary stays open
    assert _runs(pg_conn, name) == [("open", "2")] and _switches(pg_conn, name) == ["canary"]

    # the next controller asks for other lines and the default (1 h) clean period: the open canary's win
    ctl2 = CanaryController(s, name, lines=["line-2"], dsn=pg_dsn, poll_s=0.2, lease_s=30)
    t2, out2 = _start(ctl2, threading.Event())
    assert _wait(lambda: ctl2.resumed, 20)
    assert ctl2.lines == ["line-1"] and ctl2.policy == policy
    assert ctl2.state.started_at == pytest.approx(ctl1.state.started_at, abs=1e-5)  # via timestamptz (µs)
    _inspections(s, name, "2", "line-1", 3)
    t2.join(40)
    assert out2 and out2[0].action == "promote", out2
    assert out2[0].evidence["canary"]["frames"] == 6  # the 3 before the restart re-read from the topic
    assert out2[0].decided_after_s >= policy.clean_s
    assert _switches(pg_conn, name) == ["canary", "promote"]
    assert _runs(pg_conn, name) == [("promote", "2")]
    assert str((client_for(s).get_registered_model(name).aliases or {}).get("production")) == "2"


def test_an_expired_lease_is_rolled_back_as_controller_lost(
        settings_factory: Any, tmp_path: Path, unique_id: str, pg_dsn: str, pg_conn: Any) -> None:
    name = f"lost-{unique_id}"
    s = _setup(settings_factory, tmp_path, name)
    stop = threading.Event()
    ctl1 = CanaryController(s, name, lines=["line-1"], policy=CanaryPolicy(min_frames=100), dsn=pg_dsn,
                            poll_s=0.2, lease_s=1.0)
    t1, out1 = _start(ctl1, stop)
    assert _wait(lambda: _runs(pg_conn, name) == [("open", "2")], 20)
    _inspections(s, name, "2", "line-1", 2)
    assert _wait(lambda: ctl1.state.canary_n == 2, 20)
    time.sleep(0.5)  # a renewal (every lease/3) persists the evidence
    stop.set()
    t1.join(20)
    time.sleep(1.2)  # the lease runs out with no controller
    client = client_for(s)
    assert json.loads(client.get_registered_model(name).tags["sqis.canary"])["state"] == "canary"  # nothing wrote it

    out = CanaryController(s, name, lines=["line-1"], dsn=pg_dsn, lease_s=1.0).run(max_s=10)
    assert (out.action, out.rule) == ("rollback", "controller_lost")
    assert "lease expired" in out.message and out.evidence["canary"]["frames"] == 2
    assert _switches(pg_conn, name) == ["canary", "rollback"]
    assert _runs(pg_conn, name) == [("rollback", "2")]
    rm = client.get_registered_model(name)
    assert json.loads(rm.tags["sqis.canary"])["state"] == "rolled_back" and "challenger" not in (rm.aliases or {})
    assert client.get_model_version(name, "2").tags["sqis.canary.state"] == "rollback"
    # nothing open any more: the next controller needs a challenger again
    with pytest.raises(ValueError, match="no @challenger"):
        CanaryController(s, name, lines=["line-1"], dsn=pg_dsn)


def test_on_restart_decides_from_the_open_row() -> None:
    from datetime import UTC, datetime

    now = time.time()
    assert on_restart(None, now) == "start"
    assert on_restart({"expires_at": None}, now) == "resume"  # no lease: never lost
    assert on_restart({"expires_at": datetime.fromtimestamp(now + 5, UTC)}, now) == "resume"
    assert on_restart({"expires_at": datetime.fromtimestamp(now - 5, UTC)}, now) == "lost"
    assert CanaryPolicy.from_dict(CanaryPolicy(clean_s=7.0).to_dict() | {"future": 1}) == CanaryPolicy(clean_s=7.0)


def test_the_controller_reconnects_when_its_database_connection_dies(
        settings_factory: Any, tmp_path: Path, unique_id: str, pg_dsn: str, pg_conn: Any) -> None:
    """PostgreSQL drops the controller's session mid-canary (a restart, a failover): it reconnects, takes the
    model's lock again and records its decision; a newer @challenger set meanwhile is left alone."""
    name = f"reconnect-{unique_id}"
    s = _setup(settings_factory, tmp_path, name)
    policy = CanaryPolicy(min_frames=3, min_pairs=1000, latency_budget_ms=60_000, clean_s=2.0)
    ctl = CanaryController(s, name, lines=["line-1"], policy=policy, dsn=pg_dsn, poll_s=0.2, lease_s=30)
    t, out = _start(ctl, threading.Event())
    assert _wait(lambda: _runs(pg_conn, name) == [("open", "2")] and ctl._conn is not None, 20)
    pid = ctl._conn.info.backend_pid
    pg_conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    client = client_for(s)  # a retrain passes meanwhile: @challenger moves to a newer version
    run = client.create_run(ensure_experiment(client, s, "canary-restart"))
    register_onnx(client, run, COMMITTED_MODEL, name)
    promote(client, name, "3", "challenger")
    _inspections(s, name, "2", "line-1", 3)
    _inspections(s, name, "1", "line-2", 3)
    t.join(40)
    assert out and out[0].action == "promote", out
    # recorded through a new session: the first one was terminated before the decision
    assert _runs(pg_conn, name) == [("promote", "2")] and _switches(pg_conn, name) == ["canary", "promote"]
    aliases = {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}
    assert aliases.get("production") == "2" and aliases.get("challenger") == "3"
