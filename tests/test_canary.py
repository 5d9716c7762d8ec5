"""Shadow, canary, rollback (issue #21 section 4) on the local stack: a worker serving NAME@production
also follows NAME@challenger; ``CanaryController`` (``sqis model canary``) routes line-1 to it.

- a bad challenger (inverted class scores) is rolled back within the configured window, and no verdict of
  it reaches ``inspections`` outside the canary line; after the rollback every frame is production's;
- a good challenger (the same weights) agrees with production in shadow and is promoted after the clean
  period.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dashboard.model_queries import agreement, switches
from dashboard.queries import Filters
from inference_workers.challenger import Route, bucket
from producers.run import run_producer
from sqis.bench.canary import invert_scores
from sqis.bench.harness import TopicCollector
from sqis.canary import CanaryController, CanaryPolicy, CanaryState, Outcome, judge
from stream_processors.shadow import ShadowJoin, match_boxes
from tests.model_fixtures import COMMITTED_MODEL
from training.registry import client_for, ensure_experiment, promote, register_onnx

pytest.importorskip("onnx")

log = logging.getLogger(__name__)
CAMERAS, LINES = 4, 2  # cam-01/03 on line-1 (canary), cam-02/04 on line-2
CANARY = ["line-1"]
DECISION_WINDOW_S = 40.0  # the configured window: past it the controller stops undecided (outcome "stopped")


def _register(s: Any, path: Path, name: str) -> str:
    client = client_for(s)
    run = client.create_run(ensure_experiment(client, s, "canary"))
    v = register_onnx(client, run, path, name)
    client.set_terminated(run.info.run_id)
    return v


def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def _setup(settings_factory: Any, worker_factory: Any, tmp_path: Path, name: str, challenger: Path,
           share: float) -> tuple[Any, Any]:
    s = settings_factory(partitions={"frames": 2}, state_dir=tmp_path / "state",
                         mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", onnx_providers="cpu",
                         onnx_threads=1, shadow_share=share, challenger_poll_s=0.3)
    assert _register(s, COMMITTED_MODEL, name) == "1"
    assert _register(s, challenger, name) == "2"
    promote(client_for(s), name, "1", "production")
    promote(client_for(s), name, "2", "challenger")
    w = worker_factory(s, model_uri=f"models:/{name}@production", model_poll_s=0.3, max_batch=8, max_wait_ms=20)
    return s, w


def _controller(s: Any, name: str, pg_dsn: str, policy: CanaryPolicy) -> tuple[CanaryController, threading.Thread,
                                                                               list[Outcome]]:
    ctl = CanaryController(s, name, lines=CANARY, policy=policy, dsn=pg_dsn, poll_s=0.3, window_s=3600)
    out: list[Outcome] = []
    t = threading.Thread(target=lambda: out.append(ctl.run(max_s=DECISION_WINDOW_S)), daemon=True)
    t.start()
    return ctl, t, out


def _produce(s: Any, frames: int, seed: int) -> None:
    st = run_producer(s, "synthetic", cameras=CAMERAS, lines=LINES, frames=frames, size="64x64", seed=seed,
                      install_signal_handlers=False)
    assert st.produced == CAMERAS * frames


def test_bad_challenger_is_rolled_back_and_never_fails_frames_outside_its_lines(
        settings_factory, worker_factory, tmp_path: Path, unique_id: str, pg_dsn: str, pg_conn: Any) -> None:
    name = f"canary-bad-{unique_id}"
    bad = invert_scores(COMMITTED_MODEL, tmp_path / "inverted.onnx")
    s, w = _setup(settings_factory, worker_factory, tmp_path, name, bad, 0.5)
    insp, alerts = TopicCollector(s, "inspections"), TopicCollector(s, "alerts")
    try:
        policy = CanaryPolicy(min_frames=8, min_pairs=6, latency_budget_ms=60_000, clean_s=600)
        ctl, t, out = _controller(s, name, pg_dsn, policy)
        ch = w.worker.challenger
        assert _wait(lambda: ch.canary_model() is not None, 30), "worker never picked up the canary route"
        _produce(s, 6, seed=1)
        t.join(DECISION_WINDOW_S + 10)
        assert out and out[0].action == "rollback", out
        log.info(f"rollback after {out[0].decided_after_s:.2f} s ({out[0].rule})")
        assert out[0].rule in ("fail_rate", "agreement")
        # the workers stop routing: every frame after that is production's
        assert _wait(lambda: ch.canary_model() is None and ch.served is None, 10)
        n_before = len(insp.snapshot())
        _produce(s, 2, seed=2)
        assert insp.wait_for(lambda r: len(r) >= n_before + CAMERAS * 2, 60)
        recs = insp.snapshot()
        by_chal = [r for r in recs if r["model_version"] == "2"]
        assert by_chal and all(r["line_id"] in CANARY for r in by_chal)  # the canary happened, on line-1 only
        assert all(r["verdict"] == "FAIL" for r in by_chal)  # it is bad indeed
        assert {r["model_version"] for r in recs[n_before:]} == {"1"}
        assert w.worker.stats.dead_lettered == 0
        # evidence: MLflow tags, an alert on the alerts topic, the switch and agreement rows in PostgreSQL
        mv = client_for(s).get_model_version(name, "2")
        assert mv.tags["sqis.canary.state"] == "rollback"
        ev = json.loads(mv.tags["sqis.canary.evidence"])
        assert ev["canary"]["frames"] >= policy.min_frames and ev["canary"]["outside_lines"] == 0
        assert "challenger" not in (client_for(s).get_registered_model(name).aliases or {})
        assert alerts.wait_for(lambda r: any(a["rule"].startswith("canary_rollback") for a in r), 30)
        rows = pg_conn.execute("SELECT action FROM model_switches WHERE model_name = %s ORDER BY at",
                               (name,)).fetchall()
        assert [r[0] for r in rows] == ["canary", "rollback"]
        agree = pg_conn.execute("SELECT sum(frames), sum(verdict_agree), sum(challenger_fail) FROM shadow_agreement "
                                "WHERE model_name = %s AND challenger_version = '2'", (name,)).fetchone()
        if agree[0]:  # shadow pairs seen before the decision
            assert agree[2] == agree[0]  # the inverted challenger FAILs every shadowed frame
        w.stop()
    finally:
        insp.close()
        alerts.close()


def test_good_challenger_is_promoted_after_the_clean_period(
        settings_factory, worker_factory, tmp_path: Path, unique_id: str, pg_dsn: str, pg_conn: Any) -> None:
    name = f"canary-good-{unique_id}"
    s, w = _setup(settings_factory, worker_factory, tmp_path, name, COMMITTED_MODEL, 1.0)  # every frame shadowed
    insp, alerts = TopicCollector(s, "inspections"), TopicCollector(s, "alerts")
    shadow = TopicCollector(s, "inspections_shadow")
    try:
        policy = CanaryPolicy(min_frames=8, min_pairs=4, latency_budget_ms=60_000, clean_s=3.0, require_shadow=True)
        ctl, t, out = _controller(s, name, pg_dsn, policy)
        ch = w.worker.challenger
        assert _wait(lambda: ch.canary_model() is not None, 30)
        _produce(s, 6, seed=3)
        t.join(DECISION_WINDOW_S + 10)
        assert out and out[0].action == "promote", out
        log.info(f"promotion after {out[0].decided_after_s:.2f} s")
        assert out[0].evidence["shadow"]["verdict_agreement"] == 1.0  # same weights: same verdicts
        aliases = client_for(s).get_registered_model(name).aliases or {}
        assert str(aliases.get("production")) == "2" and "challenger" not in aliases
        assert client_for(s).get_model_version(name, "2").tags["sqis.canary.state"] == "promote"
        assert alerts.wait_for(lambda r: any(a["rule"].startswith("canary_promote") for a in r), 30)
        recs = insp.snapshot()
        assert all(r["line_id"] in CANARY for r in recs if r["model_version"] == "2")
        row = pg_conn.execute("SELECT sum(frames), sum(verdict_agree) FROM shadow_agreement WHERE model_name = %s",
                              (name,)).fetchone()
        assert row[0] and row[0] == row[1]
        # shadow: the challenger's records of sampled production-served frames, on their own topic only
        shadowed = shadow.snapshot()
        served_by = {r["frame_id"]: r for r in recs}
        assert shadowed and {r["model_version"] for r in shadowed} == {"2"}
        reg = w.worker.metrics.registry
        assert reg.get_sample_value("sqis_worker_shadow_total", {"outcome": "produced"}) == ch.stats.shadowed > 0
        assert reg.get_sample_value("sqis_worker_canary_frames_total") == ch.stats.canary_frames > 0
        assert all(served_by[r["frame_id"]]["model_version"] == "1" for r in shadowed if r["frame_id"] in served_by)
        # the dashboard's Models page reads both tables
        mine = [r for r in agreement(pg_conn, Filters()) if r["model_name"] == name]
        assert mine and all(r["frames"] == r["agree"] for r in mine)
        assert [x["action"] for x in switches(pg_conn) if x["model_name"] == name] == ["promote", "canary"]
        # the production watcher follows the moved alias
        assert _wait(lambda: w.worker.watcher.current.version == "2", 20)
        w.stop()
    finally:
        shadow.close()
        insp.close()
        alerts.close()


def test_agreement_pairs_frames_and_matches_boxes() -> None:
    def rec(fid: str, version: str, verdict: str, boxes: list[tuple[str, float]]) -> dict[str, Any]:
        dets = [{"class_name": c, "x1": x, "y1": 0.0, "x2": x + 10, "y2": 10.0, "score": 0.9} for c, x in boxes]
        return {"frame_id": fid, "line_id": "line-1", "model_name": "m", "model_version": version,
                "captured_at": 5_000_000, "verdict": verdict, "detections": dets}

    j = ShadowJoin(window_s=60)
    assert j.add_shadow(rec("f1", "2", "FAIL", [("dent", 1.0), ("spot", 50.0)])) is None  # waits for its pair
    assert j.add_production(rec("f1", "1", "FAIL", [("dent", 0.0)])) is not None
    j.add_production(rec("f2", "1", "PASS", []))
    j.add_shadow(rec("f2", "2", "FAIL", [("scratch", 0.0)]))
    j.add_shadow(rec("f2", "2", "FAIL", [("scratch", 0.0)]))  # a shadow redone: counted once
    a = j.total(challenger_version="2")
    assert (a.frames, a.verdict_agree, a.matched, a.challenger_fail) == (2, 1, 1, 2)
    assert a.iou_mean == pytest.approx(9 / 11)  # boxes shifted by 1 px of 10
    assert a.challenger_classes == {"dent": 1, "spot": 1, "scratch": 1} and a.champion_classes == {"dent": 1}
    assert match_boxes([{"class_name": "a", "x1": 0, "y1": 0, "x2": 10, "y2": 10}],
                       [{"class_name": "b", "x1": 0, "y1": 0, "x2": 10, "y2": 10}]) == []  # other class


def test_shadow_sample_and_route_are_stable_shares() -> None:
    ids = [f"frame-{i}" for i in range(4000)]
    assert 0.45 < sum(bucket(i) < 0.5 for i in ids) / len(ids) < 0.55
    assert [bucket(i) for i in ids[:5]] == [bucket(i) for i in ids[:5]]  # the same on every worker
    r = Route("2", frozenset({"line-1"}), 0.0)
    assert r.serves("line-1", "cam-01") and not r.serves("line-2", "cam-02")
    assert not Route("2", frozenset({"line-1"}), 0.0, state="rolled_back").serves("line-1", "cam-01")
    assert Route.from_json(r.to_json()) == r and Route.from_json("{not json") is None
    assert not Route("2", frozenset({"line-1"}), expires_at=time.time() - 1).serves("line-1", "cam-01")  # lease over
    assert Route("2", frozenset({"line-1"}), expires_at=time.time() + 60).serves("line-1", "cam-01")


def test_judge_rules_without_a_broker() -> None:
    p = CanaryPolicy(min_frames=10, min_pairs=5, latency_budget_ms=100, clean_s=60, min_agreement=0.9)
    st = CanaryState(started_at=0.0, production_n=100, production_fail=10, canary_n=10, canary_fail=1)
    st.latencies.extend([10.0] * 10)
    assert judge(st, p, 30.0) is None
    assert (v := judge(st, p, 61.0)) is not None and v.action == "promote"
    st.canary_fail = 8
    assert (v := judge(st, p, 30.0)) is not None and (v.action, v.rule) == ("rollback", "fail_rate")
    st.canary_fail = 1
    st.latencies.extend([500.0] * 10)
    assert (v := judge(st, p, 30.0)) is not None and v.rule == "latency"


def test_canary_cli_needs_lines_or_a_share(capsys: pytest.CaptureFixture[str]) -> None:
    from sqis.cli import run

    assert run(["model", "canary", "some-model"]) != 0
    assert "--lines" in capsys.readouterr().err
    assert run(["model", "canary", "some-model", "--share", "1.5"]) != 0


class _FakeDetector:
    def __init__(self, version: str, fail: bool = False) -> None:
        self.name, self.version, self.fail = "m", version, fail

    def detect(self, images: Any) -> list[list[Any]]:
        from inference_workers.detections import Detection

        if self.fail:
            raise RuntimeError("challenger broken")
        return [[Detection(0, "dent", 0.9, 0, 0, 1, 1)] for _ in images]


def test_routed_batch_keeps_frame_order_and_falls_back_to_production() -> None:
    import numpy as np

    from inference_workers.challenger import RoutedBatch
    from inference_workers.inference import OnnxDetector

    imgs = [np.zeros((8, 8, 3), np.uint8)] * 3
    prod = OnnxDetector(_FakeDetector("1"))
    rb = RoutedBatch(prod, OnnxDetector(_FakeDetector("2")), [True, False, True])
    out = rb.run(imgs)
    assert not out.all_failed and [rb.frame_model(i).version for i in range(3)] == ["2", "1", "2"]
    broken = RoutedBatch(prod, OnnxDetector(_FakeDetector("2", fail=True)), [False, True, True])
    out = broken.run(imgs)
    assert not any(isinstance(r, Exception) for r in out.results)  # never dead-lettered for the challenger
    assert [broken.frame_model(i).version for i in range(3)] == ["1", "1", "1"]
