"""Promotion through the real MLflow registry hot-swaps the model of a running worker (no restart)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from inference_workers.detector import DetectorError, Thresholds
from infra.settings import Settings
from producers.run import run_producer
from sqis.bench.harness import TopicCollector, settings_env
from training.registry import client_for, ensure_experiment, list_versions, promote, register_onnx

FRAMES_PER_CAMERA = 4
CAMERAS = 2


def _register(s: Any, onnx_path: Path, name: str) -> str:
    client = client_for(s)
    run = client.create_run(ensure_experiment(client, s, "hot-reload"))
    version = register_onnx(client, run, onnx_path, name, tags={"test": "hot-reload"})
    client.set_terminated(run.info.run_id)
    return version


def _produce(s: Any, seed: int, frames_topic: TopicCollector, already: int) -> set[str]:
    """Publish CAMERAS x FRAMES_PER_CAMERA synthetic frames; returns their frame ids (read back from the topic)."""
    stats = run_producer(s, "synthetic", cameras=CAMERAS, frames=FRAMES_PER_CAMERA, size="64x64", seed=seed,
                         install_signal_handlers=False)
    n = CAMERAS * FRAMES_PER_CAMERA
    assert stats.produced == n and stats.failed == 0
    assert frames_topic.wait_for(lambda recs: len(recs) >= already + n, 60)
    return {r["frame_id"] for r in frames_topic.snapshot()[already:already + n]}


def test_cli_promotion_hot_reloads_a_running_worker(settings_factory, worker_factory, onnx_model_path,
                                                    tmp_path: Path, unique_id: str) -> None:
    s = settings_factory(partitions={"frames": 2}, state_dir=tmp_path / "state",
                         mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", onnx_providers="cpu",
                         onnx_threads=1)
    name = f"hot-{unique_id}"
    # two versions of the same untrained detector: the registered copies differ (stamped name/version)
    assert (_register(s, onnx_model_path, name), _register(s, onnx_model_path, name)) == ("1", "2")
    promote(client_for(s), name, "1", "production")

    frames = TopicCollector(s, "frames")
    insp = TopicCollector(s, "inspections")
    dlq = TopicCollector(s, "frames_dlq")
    w = worker_factory(s, model_uri=f"models:/{name}@production", model_poll_s=0.3, max_batch=4, max_wait_ms=20)
    try:
        assert w.worker.watcher.current.version == "1"
        before = _produce(s, 1, frames, 0)
        assert insp.wait_frames(before, 120)
        assert {r["model_version"] for r in insp.snapshot()} == {"1"}

        out = subprocess.run([sys.executable, "-m", "sqis", "model", "promote", name, "2",
                              "--alias", "production"], env=settings_env(s) | {"PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert [v.aliases for v in list_versions(client_for(s), name)] == [["production"], []]
        deadline = time.monotonic() + 90
        while w.worker.stats.model_reloads == 0 and time.monotonic() < deadline and w.thread.is_alive():
            time.sleep(0.1)  # the watcher thread prepares v2; the idle loop swaps it between batches
        assert w.worker.stats.model_reloads == 1 and w.worker.watcher.current.version == "2"

        after = _produce(s, 2, frames, len(before))
        assert insp.wait_frames(before | after, 120)
        assert w.thread.is_alive()  # the same worker all along
        stats = w.stop()
        recs = insp.snapshot()
    finally:
        for c in (frames, insp, dlq):
            c.close()

    assert len(before) == len(after) == CAMERAS * FRAMES_PER_CAMERA and not before & after
    counts = Counter(r["frame_id"] for r in recs)
    assert set(counts) == before | after and max(counts.values()) == 1  # every frame inspected exactly once
    by_id = {r["frame_id"]: r for r in recs}
    assert {by_id[f]["model_version"] for f in before} == {"1"}
    assert {by_id[f]["model_version"] for f in after} == {"2"}
    assert {r["model_name"] for r in recs} == {name}
    assert {r["worker_id"] for r in recs} == {w.worker.worker_id}
    assert stats.model_reloads == 1 and stats.inspected == len(recs) and stats.dead_lettered == 0
    assert dlq.snapshot() == []


def test_rejected_version_is_not_rebuilt_until_the_alias_moves(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from inference_workers import detector as detector_mod
    from inference_workers import model_loader as ml

    class Serving:
        name, version, max_det = "m", "1", 300

    alias = {"production": "2"}
    built: list[str] = []

    class FakeDetector:
        def __init__(self, session: Any, thresholds: Any, *, name: str, version: str, max_det: int, path: str) -> None:
            built.append(version)
            if version == "2":
                raise DetectorError("per-class thresholds for unknown classes ['dent']")
            self.name, self.version, self.max_det = name, version, max_det

        def warmup(self) -> None:
            if self.version == "3":
                raise RuntimeError("warmup at batch 8 failed")

    monkeypatch.setattr(ml, "load_detector", lambda *a, **k: Serving())
    monkeypatch.setattr(ml, "mlflow_client", lambda *a: object())
    monkeypatch.setattr(ml, "resolve_version", lambda client, uri: ("m", alias["production"]))
    monkeypatch.setattr(ml, "download_version", lambda s, client, name, version: tmp_path / f"{version}.onnx")
    monkeypatch.setattr(detector_mod, "make_session", lambda *a: object())
    monkeypatch.setattr(ml, "Detector", FakeDetector)
    # explicit thresholds: no calibrated-thresholds lookup in the (fake) registry
    w = ml.ModelWatcher(Settings(state_dir=tmp_path), "models:/m@production", Thresholds(), poll_s=0)

    with caplog.at_level(logging.WARNING, logger=ml.__name__):
        assert [w.maybe_reload(force=True) for _ in range(3)] == [False] * 3
    assert built == ["2"] and w.current.version == "1" and w.rejected == ("m", "2") and w.failures == 0
    assert [r.getMessage() for r in caplog.records] == [
        "model v2 rejected: per-class thresholds for unknown classes ['dent']; keeping the current model"]

    alias["production"] = "3"  # the alias moves: the new version is tried once, and rejected (warmup)
    assert [w.maybe_reload(force=True) for _ in range(2)] == [False] * 2
    assert built == ["2", "3"] and w.rejected == ("m", "3")
    alias["production"] = "4"
    assert w.maybe_reload(force=True) is True and w.current.version == "4" and w.rejected is None
    alias["production"] = "2"  # moved back to the version rejected before: tried again
    assert w.maybe_reload(force=True) is False and built == ["2", "3", "4", "2"]


def test_version_the_worker_cannot_serve_is_rejected_by_the_watcher(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """The worker's check (its served form: detector + segmenter) runs on every new version before the
    swap: a detect-only model promoted while segmenter=yolo-seg is rejected, the current one keeps serving."""
    from inference_workers import detector as detector_mod
    from inference_workers import model_loader as ml

    class Serving:
        name, version, max_det = "m", "1", 300

    class FakeDetector:
        def __init__(self, session: Any, thresholds: Any, *, name: str, version: str, max_det: int, path: str) -> None:
            self.name, self.version, self.max_det = name, version, max_det

        def warmup(self) -> None:
            pass

    def check(det: Any) -> None:
        if det.version == "2":
            raise DetectorError("model is not a segmentation model (needs a prototype output)")

    alias = {"production": "2"}
    monkeypatch.setattr(ml, "load_detector", lambda *a, **k: Serving())
    monkeypatch.setattr(ml, "mlflow_client", lambda *a: object())
    monkeypatch.setattr(ml, "resolve_version", lambda client, uri: ("m", alias["production"]))
    monkeypatch.setattr(ml, "download_version", lambda s, client, name, version: tmp_path / f"{version}.onnx")
    monkeypatch.setattr(detector_mod, "make_session", lambda *a: object())
    monkeypatch.setattr(ml, "Detector", FakeDetector)
    w = ml.ModelWatcher(Settings(state_dir=tmp_path), "models:/m@production", Thresholds(), poll_s=0, check=check)
    assert w.maybe_reload(force=True) is False and w.current.version == "1" and w.rejected == ("m", "2")
    alias["production"] = "3"
    assert w.maybe_reload(force=True) is True and w.current.version == "3"
